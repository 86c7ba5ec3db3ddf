"""The MongoDB store, on Tock's `web_channel_event` collection as Tock writes and reads it.

`documents.py` owns the schema: which `_id` and `status` forms are read, the one update the
sidecar makes in a document (`status` int32 0 -> int32 1, same size), and the collection
`sidecar_delivery` that holds what Tock's `status` cannot (DELIVERED, and SENT for
documents whose `status` is not int32 0). This module sends those queries and updates.

pymongo's synchronous client does the I/O; every blocking call runs in a trio worker thread.
The client has short timeouts so that, when MongoDB cannot be reached, every call raises
`StoreUnavailable` within a few seconds instead of hanging.

The feed tails a change stream on the collection (inserts of the configured connectors
only), in one dedicated thread per `run_feed` call. It survives network faults and server
restarts by reopening the stream from its last resume token, and reports `HistoryLost` when
the server cannot resume from there any more.
"""

from __future__ import annotations

import datetime
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import trio
from bson.timestamp import Timestamp
from pymongo import ASCENDING, MongoClient, UpdateOne, monitoring
from pymongo.change_stream import CollectionChangeStream
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    CollectionInvalid,
    ConnectionFailure,
    CursorNotFound,
    OperationFailure,
    PyMongoError,
)
from pymongo.write_concern import WriteConcern

from sidecar.config import Settings
from sidecar.protocol.delivery import Replay
from sidecar.protocol.message import Message, State
from sidecar.store import documents
from sidecar.store.base import FeedItem, HistoryLost, StoreUnavailable
from sidecar.store.documents import COLLECTION, DELIVERY, Document

T = TypeVar("T")

log = logging.getLogger("sidecar.store.mongo")

DEFAULT_DATABASE = "tock_bot"
DEFAULT_TTL_DAYS = 7.0

# Short enough that the send API answers 503 within a few seconds when MongoDB is down,
# long enough for a healthy server under load. Applied unless the caller overrides them.
CLIENT_DEFAULTS: dict[str, Any] = {
    "serverSelectionTimeoutMS": 2500,
    "connectTimeoutMS": 2000,
    "socketTimeoutMS": 5000,
    "appname": "tock-sse-sidecar",
}
# A save is durable once a majority has it; the server gives up before the socket does.
INSERT_WRITE_CONCERN = WriteConcern(w="majority", wtimeout=4000)

DUPLICATE_KEY = 11000
NAMESPACE_EXISTS = 48
INDEX_CONFLICTS = (85, 86)  # IndexOptionsConflict, IndexKeySpecsConflict
# The server no longer has the change stream's resume point (or rejects it outright).
HISTORY_LOST_CODES = frozenset({136, 260, 280, 286})
# Server errors a change stream may be resumed after (the driver's own list, for servers
# that do not label them ResumableChangeStreamError).
RESUMABLE_CODES = frozenset(
    {6, 7, 43, 63, 89, 91, 133, 150, 189, 234, 262, 9001, 10107, 11600, 11602, 13388,
     13435, 13436}
)  # fmt: skip

# The feed: how long one getMore may wait server-side, how long to pause after an empty
# batch that came back at once (servers that ignore maxAwaitTimeMS, such as
# mongo-java-server, would otherwise be polled in a busy loop), and the retry backoff.
FEED_AWAIT_MS = 300
FEED_EMPTY_PAUSE = 0.15
FEED_BACKOFF_FIRST = 0.1
FEED_BACKOFF_MAX = 2.0
# How often a waiting feed thread checks whether the trio side was cancelled.
CANCEL_CHECK_INTERVAL = 0.1
# Documents read at a time while looking for the oldest unsent message (capped headroom).
HEADROOM_PAGE = 200
# Without any better "now" from the server, start this many seconds back (repeats are fine).
WALL_CLOCK_MARGIN = 3


def _int32_zero(status: object) -> bool:
    # pymongo decodes int32 as int and int64 as its subclass Int64.
    return type(status) is int and status == 0


def _message(doc: Mapping[str, Any], delivery: Mapping[str, int]) -> Message | None:
    """`doc` as a message, or None (logged) when it is not one a browser can be sent."""
    try:
        return documents.to_message(doc, delivery)
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("skipping malformed %s document %r: %r", COLLECTION, doc.get("_id"), exc)
        return None


def _is_unavailable(exc: PyMongoError) -> bool:
    """True for errors meaning 'MongoDB cannot do this right now' (network, server
    selection, timeouts, server-side refusals); False for programming errors."""
    return isinstance(exc, ConnectionFailure | OperationFailure) or exc.timeout


def _resumable(exc: PyMongoError) -> bool:
    if isinstance(exc, ConnectionFailure | CursorNotFound):
        return True
    if isinstance(exc, OperationFailure):
        return exc.has_error_label("ResumableChangeStreamError") or exc.code in RESUMABLE_CODES
    return exc.timeout


def _history_lost(exc: PyMongoError) -> bool:
    return isinstance(exc, OperationFailure) and exc.code in HISTORY_LOST_CODES


def _pause(seconds: float) -> None:
    """Wait in a feed thread, returning early (by raising trio.Cancelled) when the trio
    side is cancelled, so a waiting thread stops within CANCEL_CHECK_INTERVAL."""
    deadline = time.monotonic() + seconds
    waiter = threading.Event()
    while True:
        trio.from_thread.check_cancelled()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        waiter.wait(min(remaining, CANCEL_CHECK_INTERVAL))


def _close_quietly(stream: CollectionChangeStream[Document] | None) -> None:
    if stream is None:
        return
    try:
        stream.close()
    except PyMongoError as exc:  # the server may be gone; the cursor dies with it
        log.debug("closing change stream: %r", exc)


class _ChangeStreamOpens(monitoring.CommandListener):
    """Counts the change streams opened on a client (`aggregate` with `$changeStream`),
    including the driver's automatic resumes, which the feed does not see otherwise."""

    def __init__(self) -> None:
        self.count = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "aggregate":
            pipeline = event.command.get("pipeline")
            if pipeline and isinstance(pipeline[0], Mapping) and "$changeStream" in pipeline[0]:
                self.count += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


class MongoStore:
    def __init__(
        self,
        client: MongoClient[Document],
        collection: Collection[Document],
        connector_ids: Sequence[str],
        capped: bool,
    ) -> None:
        self._client = client
        self._collection = collection
        self._delivery = collection.database[DELIVERY]
        self._inserts = collection.with_options(write_concern=INSERT_WRITE_CONCERN)
        self._connector_ids = list(connector_ids)
        self.capped = capped
        self._readers_lock = threading.Lock()
        self._readers = 0
        # Change streams opened on this client, and how many of those the feed opened to
        # start: the rest are resumes (see `feed_resumes`).
        self._change_streams = _ChangeStreamOpens()
        self._feed_starts = 0

    @classmethod
    async def open(
        cls, settings: Settings, *, client_options: Mapping[str, Any] | None = None
    ) -> MongoStore:
        """Connect to `settings.store`, create `web_channel_event` when it is missing (an
        existing one is used as is) and log whether it is capped.

        `client_options` are extra MongoClient keyword arguments (tests pass
        `event_listeners`). Raises StoreUnavailable, with the client closed, when MongoDB
        cannot be reached or the collection cannot be set up."""
        options = {**CLIENT_DEFAULTS, **(client_options or {}), "tz_aware": True}
        opens = _ChangeStreamOpens()
        options["event_listeners"] = [*options.get("event_listeners", ()), opens]

        def connect() -> MongoStore:
            client: MongoClient[Document] = MongoClient(settings.store, **options)
            try:
                if settings.mongo_database:
                    db: Database[Document] = client[settings.mongo_database]
                else:
                    db = client.get_default_database(DEFAULT_DATABASE)
                capped = _ensure_collection(db, settings)
                _ensure_delivery(db, settings)
                store = cls(client, db[COLLECTION], [c.id for c in settings.connectors], capped)
                store._change_streams = opens
                return store
            except BaseException:
                client.close()
                raise

        try:
            return await trio.to_thread.run_sync(connect)
        except PyMongoError as exc:
            if not _is_unavailable(exc):
                raise
            raise StoreUnavailable(f"cannot open MongoDB store: {exc}") from exc

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run blocking `fn` in a worker thread; MongoDB failures become StoreUnavailable.
        Not abandoned on cancel: the client timeouts bound how long it can take."""

        def guarded() -> T:
            try:
                return fn()
            except PyMongoError as exc:
                if not _is_unavailable(exc):
                    raise
                raise StoreUnavailable(f"MongoDB: {exc}") from exc

        return await trio.to_thread.run_sync(guarded)

    async def save(self, messages: Sequence[Message]) -> list[str]:
        """Insert `messages` with write concern majority, in order. Ids already stored are
        left as they are (a retried save succeeds) and returned. MongoDB has no all-or-none
        here without a transaction: on StoreUnavailable some may be stored, and the retry
        inserts the rest."""
        docs = [documents.to_document(m) for m in messages]
        if not docs:
            return []

        def save() -> list[str]:
            try:
                self._inserts.insert_many(docs, ordered=False)
            except BulkWriteError as exc:
                details = exc.details
                errors = details.get("writeErrors", [])
                if details.get("writeConcernErrors") or any(
                    e.get("code") != DUPLICATE_KEY for e in errors
                ):
                    raise
                return [docs[e["index"]]["_id"] for e in errors]
            return []

        return await self._run(save)

    def _delivery_of(self, docs: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """The `sidecar_delivery` records of `docs` (in a worker thread)."""
        ids = [i for i in (documents.message_id(d.get("_id")) for d in docs) if i is not None]
        if not ids:
            return {}
        found = self._delivery.find({"_id": {"$in": ids}}, projection={"state": 1})
        return documents.delivery_states(found)

    def _page(self, query: Document, after: str | None, limit: int) -> tuple[list[Document], bool]:
        """Up to `limit` documents matching `query` with a message id after `after`, in id
        order across both id types (in a worker thread); and whether more may follow."""
        pages = [
            list(
                self._collection.find({"$and": [query, documents.id_filter(kind, gt=after)]})
                .sort("_id", ASCENDING)
                .limit(limit)
            )
            for kind in documents.ID_KINDS
        ]
        return documents.merge_by_id(pages, limit)

    async def pending(
        self, connector_id: str, recipient_id: str, replay: Replay, *, after: str | None, limit: int
    ) -> list[Message]:
        # The query finds every document `replay` may select by its `status`; the delivery
        # records then decide (`Replay.selects` on the state `documents.state_of` gives).
        unsent = documents.status_forms(State.ENQUEUED)
        if not replay.sent:
            forms = unsent
        elif replay.sent_after is None:
            forms = documents.status_forms(State.ENQUEUED, State.SENT)
        else:
            sent_after = [
                documents.id_filter(kind, gt=replay.sent_after) for kind in documents.ID_KINDS
            ]
            sent = documents.status_forms(State.SENT)
            forms = [*unsent, *({**form, "$or": sent_after} for form in sent)]
        query: Document = {"appId": connector_id, "recipientId": recipient_id, "$or": forms}

        def page(after: str | None, wanted: int) -> tuple[list[Document], bool, dict[str, int]]:
            docs, more = self._page(query, after, wanted)
            return docs, more, self._delivery_of(docs)

        # Documents that are not messages, or that their delivery records leave out, are
        # skipped, and the page is filled past them: fewer than `limit` must mean no more.
        messages: list[Message] = []
        while True:
            docs, more, delivery = await self._run(
                functools.partial(page, after, limit - len(messages))
            )
            for doc in docs:
                message = _message(doc, delivery)
                if message is not None and replay.selects(message.state, message.id):
                    messages.append(message)
            if not more or len(messages) == limit:
                return messages
            after = str(docs[-1]["_id"])

    def _move(self, docs: Sequence[Mapping[str, Any]], state: State) -> int:
        """Record `state` for `docs`, messages in a lower state (in a worker thread): SENT
        in the document itself where its `status` is int32 0 (DELIVERED implies it), and
        in `sidecar_delivery` for DELIVERED and for the documents whose `status` cannot be
        written. Returns how many moved."""
        in_place = [d["_id"] for d in docs if _int32_zero(d.get("status"))]
        marked = 0
        if in_place:
            marked = self._collection.update_many(
                {"_id": {"$in": in_place}, **documents.SENT_MARK_FILTER}, documents.SENT_MARK
            ).modified_count
        recorded = [d for d in docs if state == State.DELIVERED or d["_id"] not in in_place]
        if not recorded:
            return marked
        now = datetime.datetime.now(datetime.UTC)
        writes = [
            UpdateOne(*documents.delivery_update(d, state, now), upsert=True) for d in recorded
        ]
        try:
            result = self._delivery.bulk_write(writes, ordered=False)
            moved = result.upserted_count + result.modified_count
        except BulkWriteError as exc:
            # Two writers upserting one record at once: one insert loses; retry it as an
            # update of the record the other made.
            details = exc.details
            if any(e.get("code") != DUPLICATE_KEY for e in details.get("writeErrors", ())):
                raise
            moved = details.get("nUpserted", 0) + details.get("nModified", 0)
            again = self._delivery.bulk_write(
                [writes[e["index"]] for e in details["writeErrors"]], ordered=False
            )
            moved += again.upserted_count + again.modified_count
        return moved if state == State.DELIVERED else moved + marked

    def _still(self, query: Document, states: tuple[State, ...]) -> list[Document]:
        """The message documents matching `query` whose state is one of `states` (in a
        worker thread)."""
        docs = list(
            self._collection.find(query, projection={"appId": 1, "recipientId": 1, "status": 1})
        )
        delivery = self._delivery_of(docs)
        return [d for d in docs if documents.state_of(d, delivery) in states]

    async def mark_sent(self, ids: Sequence[str]) -> int:
        values = documents.id_values(ids)
        if not values:
            return 0

        def mark() -> int:
            # Most documents hold int32 0: one update, as Tock's own mark is.
            marked = self._collection.update_many(
                {"_id": {"$in": values}, **documents.SENT_MARK_FILTER}, documents.SENT_MARK
            ).modified_count
            if marked == len(values) // 2:
                return marked
            rest = self._still(
                {"_id": {"$in": values}, "$or": documents.status_forms(State.ENQUEUED)},
                (State.ENQUEUED,),
            )
            return marked + self._move(rest, State.SENT)

        return await self._run(mark)

    async def ack(self, connector_id: str, recipient_id: str, ids: Sequence[str]) -> int:
        values = documents.id_values(ids)
        if not values:
            return 0
        query = {"appId": connector_id, "recipientId": recipient_id, "_id": {"$in": values}}
        return await self._run(
            lambda: self._move(self._still(query, (State.ENQUEUED, State.SENT)), State.DELIVERED)
        )

    async def ack_through(self, connector_id: str, recipient_id: str, last_event_id: str) -> int:
        through = [documents.id_filter(kind, lte=last_event_id) for kind in documents.ID_KINDS]
        query = {
            "appId": connector_id,
            "recipientId": recipient_id,
            "$and": [
                {"$or": through},
                {"$or": documents.status_forms(State.ENQUEUED, State.SENT)},
            ],
        }
        return await self._run(
            lambda: self._move(self._still(query, (State.SENT,)), State.DELIVERED)
        )

    async def get(self, message_id: str) -> Message | None:
        values = documents.id_values([message_id])
        if not values:
            return None

        def get() -> tuple[Document | None, dict[str, int]]:
            doc = self._collection.find_one({"_id": {"$in": values}})
            return doc, self._delivery_of([doc] if doc is not None else [])

        doc, delivery = await self._run(get)
        return None if doc is None else _message(doc, delivery)

    async def ping(self) -> dict[str, Any]:
        """Also says whether the collection is capped and, when it is, how many inserts the
        oldest undelivered message has left before eviction."""
        await self._run(lambda: self._client.admin.command("ping"))
        details: dict[str, Any] = {"kind": "mongodb", "capped": self.capped}
        if self.capped:
            details["evictionHeadroom"] = await self.eviction_headroom()
        return details

    async def eviction_headroom(self) -> int | None:
        """For a capped collection, how many more inserts the oldest message not yet
        written to any stream (ENQUEUED) survives before the collection evicts it (the
        limit when there is none); None when the collection is not capped. Approximate:
        capped collections evict in insertion order, counted here in id order. Raises
        StoreUnavailable."""
        if not self.capped:
            return None

        def headroom() -> int | None:
            coll = self._collection
            options = coll.options()
            limits: list[int] = []
            if options.get("max"):
                limits.append(int(options["max"]))
            try:
                stats = coll.database.command("collStats", coll.name)
            except OperationFailure:  # deprecated on recent servers; the count limit remains
                stats = {}
            if options.get("size") and stats.get("avgObjSize"):
                limits.append(int(options["size"]) // int(stats["avgObjSize"]))
            if not limits:
                return None
            behind = self._newer_than_oldest_unsent()
            return min(limits) if behind is None else min(limits) - 1 - behind

        return await self._run(headroom)

    def _newer_than_oldest_unsent(self) -> int | None:
        """How many message documents have an id after the oldest one no stream was written
        (ENQUEUED); None when there is none (in a worker thread)."""
        unsent = {"$or": documents.status_forms(State.ENQUEUED)}
        after: str | None = None
        while True:  # past documents that only their delivery records say were sent
            docs, more = self._page(unsent, after, HEADROOM_PAGE)
            delivery = self._delivery_of(docs)
            oldest = next(
                (d for d in docs if documents.state_of(d, delivery) == State.ENQUEUED), None
            )
            if oldest is not None:
                since = [
                    documents.id_filter(kind, gt=str(oldest["_id"])) for kind in documents.ID_KINDS
                ]
                return self._collection.count_documents({"$or": since})
            if not more:
                return None
            after = str(docs[-1]["_id"])

    @property
    def feed_resumes(self) -> int:
        """How many times a change stream of the feed was reopened after an interruption,
        by the driver's automatic resume or by the feed itself (for /metrics)."""
        return max(self._change_streams.count - self._feed_starts, 0)

    @property
    def feed_readers(self) -> int:
        """How many feed reader threads are running (for tests and observability)."""
        with self._readers_lock:
            return self._readers

    # -- the feed ---------------------------------------------------------------------

    def _pipeline(self) -> list[Document]:
        # Filtered server-side: only inserts of our connectors cross the network.
        return [
            {
                "$match": {
                    "operationType": "insert",
                    "fullDocument.appId": {"$in": self._connector_ids},
                }
            }
        ]

    def _now(self) -> Timestamp:
        """A change stream start point at which everything committed so far is behind.

        Real MongoDB puts the `operationTime` in command replies; mongo-java-server does
        not, but has a readable `local.oplog.rs`; failing both, the wall clock a few seconds
        back (repeats are fine, consumers drop them by id)."""
        reply = self._client.admin.command("ping")
        latest = reply.get("operationTime")
        if not isinstance(latest, Timestamp):
            try:
                entry = self._client.local["oplog.rs"].find_one(
                    {}, projection={"ts": 1}, sort=[("$natural", -1)]
                )
            except OperationFailure:  # not allowed to read it: fall through
                entry = None
            latest = entry.get("ts") if entry is not None else None
        if not isinstance(latest, Timestamp):
            return Timestamp(max(int(time.time()) - WALL_CLOCK_MARGIN, 1), 0)
        # startAtOperationTime is inclusive: start just after the latest operation.
        if latest.inc >= 0xFFFFFFFF:
            return Timestamp(latest.time + 1, 0)
        return Timestamp(latest.time, latest.inc + 1)

    def _watch(
        self, resume_token: Mapping[str, Any] | None, start: Timestamp | None
    ) -> CollectionChangeStream[Document]:
        if resume_token is not None:
            return self._collection.watch(
                self._pipeline(), resume_after=resume_token, max_await_time_ms=FEED_AWAIT_MS
            )
        # An explicit start point: mongo-java-server sends no operationTime, without which
        # a plain watch() fails.
        return self._collection.watch(
            self._pipeline(),
            start_at_operation_time=start or self._now(),
            max_await_time_ms=FEED_AWAIT_MS,
        )

    async def run_feed(
        self,
        send: trio.MemorySendChannel[FeedItem],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Open a change stream from now (retrying with backoff while MongoDB is down),
        call `task_status.started()`, then tail it in one dedicated thread until cancelled.

        The thread blocks on `send` when the channel is full and stops within a fraction
        of a second of cancellation; it closes its stream on the way out. Errors never end
        the feed: transient ones reopen the stream from the last resume token; a lost
        resume point sends `HistoryLost` and restarts from now."""
        backoff = FEED_BACKOFF_FIRST
        while True:
            try:
                start = await self._run(self._now)
                self._feed_starts += 1
                stream = await self._run(functools.partial(self._watch, None, start))
                break
            except StoreUnavailable as exc:
                log.warning("cannot open the change stream, retrying in %.1fs: %s", backoff, exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, FEED_BACKOFF_MAX)
        taken = threading.Event()
        try:
            task_status.started()
            await trio.to_thread.run_sync(
                self._tail,
                stream,
                start,
                send,
                taken,
                abandon_on_cancel=False,
                # Its own token: the reader lives as long as the feed and must not hold one
                # of the default limiter's, which the store calls share.
                limiter=trio.CapacityLimiter(1),
            )
        finally:
            if not taken.is_set():  # cancelled before the thread took the stream over
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_close_quietly, stream)

    def _tail(
        self,
        stream: CollectionChangeStream[Document],
        start: Timestamp,
        send: trio.MemorySendChannel[FeedItem],
        taken: threading.Event,
    ) -> None:
        """The reader thread: owns `stream` (and its replacements) and closes it on exit.
        Leaves by trio.Cancelled, raised by check_cancelled/from_thread when the trio side
        is cancelled."""
        taken.set()
        with self._readers_lock:
            self._readers += 1
        current: CollectionChangeStream[Document] | None = stream
        token: Mapping[str, Any] | None = None
        backoff = FEED_BACKOFF_FIRST
        try:
            while True:
                trio.from_thread.check_cancelled()
                if current is None:
                    try:
                        current = self._watch(token, start)
                    except PyMongoError as exc:
                        if _history_lost(exc) or (token is not None and not _resumable(exc)):
                            # The server rejects our resume point: what was written since
                            # is unknown.
                            log.warning("change stream cannot resume (%r): history lost", exc)
                            trio.from_thread.run(send.send, HistoryLost())
                            token, start = None, self._fresh_start(start)
                        else:
                            log.warning("reopening the change stream failed: %r", exc)
                        _pause(backoff)
                        backoff = min(backoff * 2, FEED_BACKOFF_MAX)
                        continue
                    where = "from its resume token" if token is not None else f"at {start}"
                    log.warning("change stream resumed %s", where)
                began = time.monotonic()
                try:
                    change = current.try_next()
                except PyMongoError as exc:
                    token = current.resume_token or token
                    _close_quietly(current)
                    current = None
                    if _history_lost(exc):
                        log.warning("change stream history lost (%r): restarting from now", exc)
                        trio.from_thread.run(send.send, HistoryLost())
                        token, start = None, self._fresh_start(start)
                    else:
                        log.warning("change stream interrupted (%r): resuming", exc)
                    # A server that fails every getMore must not be hammered in a loop.
                    _pause(backoff)
                    backoff = min(backoff * 2, FEED_BACKOFF_MAX)
                    continue
                token = current.resume_token or token
                backoff = FEED_BACKOFF_FIRST
                if change is None:
                    if time.monotonic() - began < FEED_EMPTY_PAUSE:
                        _pause(FEED_EMPTY_PAUSE)
                    continue
                document = change.get("fullDocument")
                # A new document has no delivery record yet.
                message = _message(document, {}) if isinstance(document, Mapping) else None
                if message is not None:
                    trio.from_thread.run(send.send, message)
        finally:
            _close_quietly(current)
            with self._readers_lock:
                self._readers -= 1

    def _fresh_start(self, previous: Timestamp) -> Timestamp:
        """A new start point after the history was lost: now, or (server unreachable) the
        previous one, which the reopen will then report lost again if it still is."""
        try:
            return self._now()
        except PyMongoError:
            return previous

    async def aclose(self) -> None:
        # Shielded: a store closed while its owner is being cancelled (a failing test, a
        # crash) must still close its client, or its monitor threads and sockets leak.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._client.close)


def _ensure_collection(db: Database[Document], settings: Settings) -> bool:
    """Create `web_channel_event` with its indexes when missing; return whether it is
    capped. Losing a creation race to another instance is fine."""
    if COLLECTION not in db.list_collection_names(filter={"name": COLLECTION}):
        try:
            if settings.mongo_capped:
                # As Tock creates it: size in bytes from the KB setting, max documents.
                size_kb = settings.queue_max_size_kb or 2 * settings.queue_max_count
                db.create_collection(
                    COLLECTION,
                    capped=True,
                    size=size_kb * 1000,
                    max=settings.queue_max_count,
                    check_exists=False,
                )
            else:
                db.create_collection(COLLECTION, check_exists=False)
        except CollectionInvalid:
            pass
        except OperationFailure as exc:
            if exc.code != NAMESPACE_EXISTS:
                raise
        else:
            _create_indexes(db[COLLECTION], settings)
    options = db[COLLECTION].options()
    capped = bool(options.get("capped"))
    if capped:
        log.info(
            "%s.%s is capped (max %s documents, %s bytes): undelivered messages are evicted "
            "when it is full",
            db.name, COLLECTION, options.get("max"), options.get("size"),
        )  # fmt: skip
    else:
        log.info("%s.%s is not capped", db.name, COLLECTION)
    return capped


def _ttl_seconds(settings: Settings) -> int | None:
    ttl_days = DEFAULT_TTL_DAYS if settings.queue_ttl_days is None else settings.queue_ttl_days
    return int(ttl_days * 86400) if ttl_days > 0 else None


def _create_indexes(collection: Collection[Document], settings: Settings) -> None:
    """The indexes of a `web_channel_event` the sidecar created. None has the keys of one of
    Tock's (`{appId, recipientId, status}`, `{enqueuedAt: 1}` with Tock's TTL), whose index
    helper would drop it and make its own: the TTL index is on `{enqueuedAt: -1}`, so when
    Tock adds its own, both apply and the shorter time wins."""
    specs: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
        ([("appId", 1), ("recipientId", 1), ("status", 1), ("_id", 1)], {})
    ]
    ttl = _ttl_seconds(settings)
    # MongoDB refuses TTL indexes on capped collections; the cap bounds those instead.
    if ttl is not None and not settings.mongo_capped:
        specs.append(([("enqueuedAt", -1)], {"expireAfterSeconds": ttl}))
    _ensure_indexes(collection, specs)


def _ensure_delivery(db: Database[Document], settings: Settings) -> None:
    """`sidecar_delivery`'s TTL index: a record goes when its message would (with no TTL,
    records stay as long as the messages may)."""
    ttl = _ttl_seconds(settings)
    if ttl is not None:
        _ensure_indexes(db[DELIVERY], [([("at", 1)], {"expireAfterSeconds": ttl})])


def _ensure_indexes(
    collection: Collection[Document], specs: list[tuple[list[tuple[str, int]], dict[str, Any]]]
) -> None:
    for keys, extra in specs:
        try:
            collection.create_index(keys, **extra)
        except OperationFailure as exc:
            if exc.code not in INDEX_CONFLICTS:
                raise
            log.warning("index %s on %s exists with other options: kept", keys, collection.name)
