"""The MongoDB store, on Tock's `web_channel_event` collection as Tock writes and reads it.

`documents.py` owns the schema: which `_id` and `status` forms are read, the one update the
sidecar makes in a document (`status` int32 0 -> int32 1, same size), and the collection
`sidecar_delivery` that holds what Tock's `status` cannot (DELIVERED, and SENT for
documents whose `status` is not int32 0). This module sends those queries and updates.

pymongo's synchronous client does the I/O; every blocking call runs in a trio worker thread.
The client has short timeouts so that, when MongoDB cannot be reached, every call raises
`StoreUnavailable` within a few seconds instead of hanging. `store_error` sorts pymongo's
errors: an outage is `StoreUnavailable` (retry), a refusal a retry will not change (an
authorisation failure, a command or query the server rejects) a `StoreError` (answered 500).

The feed tails a change stream on the collection (inserts of the configured connectors
only), in one dedicated thread per `run_feed` call. It survives network faults and server
restarts by reopening the stream from its last resume token, and reports `HistoryLost` when
the server cannot resume from there any more.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import trio
from bson.timestamp import Timestamp
from pymongo import ASCENDING, MongoClient, monitoring
from pymongo.change_stream import CollectionChangeStream
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    CollectionInvalid,
    ConfigurationError,
    ConnectionFailure,
    CursorNotFound,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from sidecar.protocol.delivery import Position, Replay
from sidecar.protocol.feed import FeedItem, HistoryLost
from sidecar.protocol.message import Message, State
from sidecar.store import documents
from sidecar.store.base import StoreError, StoreOptions, StoreUnavailable
from sidecar.store.documents import COLLECTION, DELIVERY, FEED, Document

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
# The feeds' checkpoint is written at most this often (seconds).
CHECKPOINT_INTERVAL = 1.0
# Adoption reads this many documents at a time, from this many seconds before the last
# point known logged (enqueuedAt is the writer's clock).
ADOPTION_PAGE = 200
ADOPTION_MARGIN = 60
# What a feed remembers of users' log heads (see `_Heads`), and of this store's saves.
HEAD_MEMORY = 30.0
HEADS_KEPT = 10000
OWN_SAVES_KEPT = 10000
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


def _by_ids(values: Sequence[Any]) -> Document:
    """The filter of a point query or update: `_id` alone, any other condition checked on
    what it returns, and a state moved with `$max` rather than a condition on it. MongoDB
    reads the same documents either way (through the `_id` index); mongo-java-server uses
    an index only for a filter on its keys alone, and scans the collection otherwise (its
    `AbstractUniqueIndex.canHandle`), which the acks and SENT marks of every stream would
    do several times a second."""
    return {"_id": {"$in": list(values)}}


# Server errors that mean "not now" (the retryable writes spec's list, which pymongo
# retries by): the server is shutting down, not primary any more, or could not reach
# another member in time. Any other OperationFailure is a refusal (18 AuthenticationFailed,
# 13 Unauthorized, 2 BadValue, 59 CommandNotFound, 121 DocumentValidationFailure...).
UNAVAILABLE_CODES = frozenset(
    {
        6,  # HostUnreachable
        7,  # HostNotFound
        89,  # NetworkTimeout
        91,  # ShutdownInProgress
        134,  # ReadConcernMajorityNotAvailableYet
        189,  # PrimarySteppedDown
        262,  # ExceededTimeLimit
        9001,  # SocketException
        10058,  # LegacyNotPrimary
        10107,  # NotWritablePrimary
        11600,  # InterruptedAtShutdown
        11602,  # InterruptedDueToReplStateChange
        13435,  # NotPrimaryNoSecondaryOk
        13436,  # NotPrimaryOrSecondary
    }
)


def store_error(exc: PyMongoError) -> type[StoreError] | None:
    """What a store call that raised `exc` raises instead: StoreUnavailable when MongoDB
    cannot do it now (network errors and server selection, NotPrimaryError included; a
    timeout, 50 MaxTimeMSExpired and 64 WriteConcernFailed by wtimeout among them; a code
    of UNAVAILABLE_CODES, or a `RetryableWriteError` label), StoreError for any other
    OperationFailure (the server refused), None for the rest (a bug here: raised as is)."""
    if isinstance(exc, ConnectionFailure) or exc.timeout:
        return StoreUnavailable
    if isinstance(exc, OperationFailure):
        if exc.code in UNAVAILABLE_CODES or exc.has_error_label("RetryableWriteError"):
            return StoreUnavailable
        return StoreError
    return None


class FeedStep(enum.Enum):
    """What the feed does after its change stream failed (`feed_step`)."""

    RESUME = "resume"  # reopen where it was: from the resume token, else the start point
    LOST = "lost"  # the server has no history from there: adopt, HistoryLost, from now


# Wire version 9 is MongoDB 4.4, from which the server labels the errors a change stream
# may be resumed after; before it, the driver goes by their codes (RESUMABLE_CODES).
LABELLED_WIRE_VERSION = 9


def feed_step(exc: PyMongoError, *, at_token: bool, wire_version: int | None) -> FeedStep:
    """The feed's one rule for a failure of its change stream: `exc`, raised opening it
    from a resume token (`at_token`) or otherwise (opening it at a start point, or reading
    it), by a server of `wire_version` (None: unknown).

    A code of HISTORY_LOST_CODES means the resume point is gone. A resumable error (the
    driver's rule: network errors, a lost cursor, timeouts; a server error labelled
    `ResumableChangeStreamError` from wire version 9, one of RESUMABLE_CODES before it or
    when the version is unknown) is resumed after. Any other error is resumed after too,
    unless the server refused to open the stream at our resume token: then what was
    written since that point is unknown, as if the history were lost."""
    if isinstance(exc, OperationFailure) and exc.code in HISTORY_LOST_CODES:
        return FeedStep.LOST
    if at_token and not _resumable(exc, wire_version):
        return FeedStep.LOST
    return FeedStep.RESUME


def _resumable(exc: PyMongoError, wire_version: int | None) -> bool:
    if isinstance(exc, ConnectionFailure | CursorNotFound):
        return True
    if isinstance(exc, OperationFailure):
        if wire_version is not None and wire_version >= LABELLED_WIRE_VERSION:
            return exc.has_error_label("ResumableChangeStreamError")
        return exc.code in RESUMABLE_CODES
    return exc.timeout


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


class _Heads:
    """The last log place a feed saw per user, each good for `HEAD_MEMORY` seconds, at
    most `HEADS_KEPT` users (the oldest go). A hint: a claim at a stale one is refused by
    the log's unique index."""

    def __init__(self) -> None:
        self._places: OrderedDict[tuple[str, str], tuple[float, Document]] = OrderedDict()

    def get(self, user: tuple[str, str], now: float) -> Document | None:
        found = self._places.get(user)
        return found[1] if found is not None and now - found[0] < HEAD_MEMORY else None

    def put(self, user: tuple[str, str], head: Document, now: float) -> None:
        self._places[user] = (now, head)
        self._places.move_to_end(user)
        while len(self._places) > HEADS_KEPT:
            self._places.popitem(last=False)

    def forget(self, user: tuple[str, str]) -> None:
        self._places.pop(user, None)


class _RecentIds:
    """The last `size` ids added, from any thread."""

    def __init__(self, size: int) -> None:
        self._lock = threading.Lock()
        self._order: deque[str] = deque()
        self._ids: set[str] = set()
        self._size = size

    def add(self, ids: Iterable[str]) -> None:
        with self._lock:
            for i in ids:
                if i not in self._ids:
                    self._ids.add(i)
                    self._order.append(i)
            while len(self._order) > self._size:
                self._ids.discard(self._order.popleft())

    def __contains__(self, message_id: object) -> bool:
        with self._lock:
            return message_id in self._ids


@dataclasses.dataclass(frozen=True, slots=True)
class _Adoption:
    """What a starting feed logs without the oplog: the messages stored since `since`, or
    every one when it is None (`MongoStore._adopt`)."""

    since: Timestamp | None


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
        # Claims: majority writes, and reads of what a majority has (a claim another feed
        # made that a failover would roll back must not be built on).
        self._log_writes = self._delivery.with_options(write_concern=INSERT_WRITE_CONCERN)
        self._log_reads = self._delivery.with_options(read_concern=ReadConcern("majority"))
        self._feeds = collection.database[FEED]
        self._feed_key = documents.feed_key(connector_ids)
        self._heads = _Heads()
        self._own_saves = _RecentIds(OWN_SAVES_KEPT)
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
        cls, options: StoreOptions, *, client_options: Mapping[str, Any] | None = None
    ) -> MongoStore:
        """Connect to `options.url`, create `web_channel_event` when it is missing (an
        existing one is used as is) and log whether it is capped.

        `client_options` are extra MongoClient keyword arguments (tests pass
        `event_listeners`). Raises StoreUnavailable, with the client closed, when MongoDB
        cannot be reached, and StoreError when it refuses (the credentials, the rights to
        set the collection up, a collection it cannot create)."""
        client_kwargs = {**CLIENT_DEFAULTS, **(client_options or {}), "tz_aware": True}
        opens = _ChangeStreamOpens()
        client_kwargs["event_listeners"] = [*client_kwargs.get("event_listeners", ()), opens]

        def connect() -> MongoStore:
            client: MongoClient[Document] = MongoClient(options.url, **client_kwargs)
            try:
                if options.mongo_database:
                    db: Database[Document] = client[options.mongo_database]
                else:
                    db = client.get_default_database(DEFAULT_DATABASE)
                capped = _ensure_collection(db, options)
                _ensure_delivery(db, options)
                store = cls(client, db[COLLECTION], options.connector_ids, capped)
                store._change_streams = opens
                return store
            except BaseException:
                client.close()
                raise

        try:
            return await trio.to_thread.run_sync(connect)
        except PyMongoError as exc:
            # A ConfigurationError here is about the URL that only DNS could tell (a
            # mongodb+srv:// name without SRV records): the URL parsed.
            error = StoreUnavailable if isinstance(exc, ConfigurationError) else store_error(exc)
            if error is None:
                raise
            raise error(f"cannot open MongoDB store: {exc}") from exc

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run blocking `fn` in a worker thread; MongoDB failures become StoreUnavailable or
        StoreError (`store_error`). Not abandoned on cancel: the client timeouts bound how
        long it can take."""

        def guarded() -> T:
            try:
                return fn()
            except PyMongoError as exc:
                error = store_error(exc)
                if error is None:
                    raise
                raise error(f"MongoDB: {exc}") from exc

        return await trio.to_thread.run_sync(guarded)

    async def save(self, messages: Sequence[Message]) -> list[str]:
        """Insert `messages` with write concern majority, in their order (an ordered insert:
        the feed logs them in that order). Ids already stored are left as they are (a
        retried save succeeds) and returned. MongoDB has no all-or-none here without a
        transaction: on StoreUnavailable some may be stored, and the retry inserts the
        rest."""
        docs = [documents.to_document(m) for m in messages]
        self._own_saves.add(m.id for m in messages)

        def save() -> list[str]:
            stored: list[str] = []
            start = 0
            while start < len(docs):
                try:
                    self._inserts.insert_many(docs[start:], ordered=True)
                    return stored
                except BulkWriteError as exc:
                    details = exc.details
                    errors = details.get("writeErrors", [])
                    if details.get("writeConcernErrors") or any(
                        e.get("code") != DUPLICATE_KEY for e in errors
                    ):
                        raise
                    stored += [docs[start + e["index"]]["_id"] for e in errors]
                    # MongoDB stops an ordered insert at its first error; mongo-java-server
                    # goes on. Either way the insert resumes after the last error.
                    start += errors[-1]["index"] + 1 if errors else len(docs)
            return stored

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

    async def head(self, connector_id: str, recipient_id: str) -> Position | None:
        query = {"appId": connector_id, "recipientId": recipient_id}

        def head() -> Document | None:
            return self._delivery.find_one(
                query, projection={"epoch": 1, "seq": 1}, sort=[("seq", -1)]
            )

        record = await self._run(head)
        return None if record is None else Position(int(record["epoch"]), int(record["seq"]))

    async def position_of(
        self, connector_id: str, recipient_id: str, message_id: str
    ) -> Position | None:
        record = await self._run(
            lambda: self._delivery.find_one(
                {"_id": message_id}, projection={"appId": 1, "recipientId": 1, "epoch": 1, "seq": 1}
            )
        )
        if record is None or (record["appId"], record["recipientId"]) != (
            connector_id,
            recipient_id,
        ):
            return None
        return Position(int(record["epoch"]), int(record["seq"]))

    async def logged(
        self,
        connector_id: str,
        recipient_id: str,
        after: Position,
        *,
        through: int,
        limit: int,
        replay: Replay | None = None,
    ) -> list[Message]:
        query: Document = {"appId": connector_id, "recipientId": recipient_id, "epoch": after.epoch}
        if replay is not None:  # the record's state is a floor: the document may say more
            query["state"] = {"$in": [int(s) for s in replay.states]}

        def page(seq: int, wanted: int) -> tuple[list[Document], list[Message]]:
            records = list(
                self._delivery.find({**query, "seq": {"$gt": seq, "$lte": through}})
                .sort("seq", ASCENDING)
                .limit(wanted)
            )
            ids = documents.id_values(r["_id"] for r in records)
            docs = {
                documents.message_id(d["_id"]): d
                for d in self._collection.find({"_id": {"$in": ids}})
            } if ids else {}  # fmt: skip
            found = []
            for record in records:
                doc = docs.get(record["_id"])  # gone when expired or evicted
                message = None if doc is None else _message(doc, {})
                if message is not None:
                    found.append(documents.placed(message, record))
            return records, found

        # Records whose message is gone, or that `replay` leaves out, are skipped and the
        # page is filled past them: fewer than `limit` must mean no more.
        messages: list[Message] = []
        seq = after.seq
        while True:
            wanted = limit - len(messages)
            records, found = await self._run(functools.partial(page, seq, wanted))
            messages += [m for m in found if replay is None or replay.selects(m.state)]
            if len(records) < wanted or len(messages) == limit:
                return messages
            seq = int(records[-1]["seq"])

    def _move(self, docs: Sequence[Mapping[str, Any]], state: State) -> int:
        """Record `state` for `docs`, logged messages in a lower state (in a worker thread):
        in their records, and SENT in the document itself where its `status` is int32 0
        (DELIVERED implies it), which Tock reads. Returns how many moved."""
        ids = [i for i in (documents.message_id(d.get("_id")) for d in docs) if i is not None]
        if not ids:
            return 0
        moved = self._delivery.update_many(
            _by_ids(ids), {"$max": {"state": int(state)}}
        ).modified_count
        in_place = [d["_id"] for d in docs if _int32_zero(d.get("status"))]
        if in_place:
            self._collection.update_many(_by_ids(in_place), documents.SENT_MARK)
        return moved

    def _still(
        self, ids: Sequence[str], states: tuple[State, ...], user: tuple[str, str] | None = None
    ) -> list[Document]:
        """The message documents of `ids` (of `user`, when given) whose state is one of
        `states` (in a worker thread)."""
        docs = [
            d
            for d in self._collection.find(
                _by_ids(documents.id_values(ids)),
                projection={"appId": 1, "recipientId": 1, "status": 1},
            )
            if user is None or (d.get("appId"), d.get("recipientId")) == user
        ]
        delivery = self._delivery_of(docs)
        return [d for d in docs if documents.state_of(d, delivery) in states]

    async def mark_sent(self, ids: Sequence[str]) -> int:
        if not documents.id_values(ids):
            return 0
        return await self._run(lambda: self._move(self._still(ids, (State.ENQUEUED,)), State.SENT))

    async def ack(self, connector_id: str, recipient_id: str, ids: Sequence[str]) -> int:
        if not documents.id_values(ids):
            return 0
        user = (connector_id, recipient_id)
        return await self._run(
            lambda: self._move(
                self._still(ids, (State.ENQUEUED, State.SENT), user), State.DELIVERED
            )
        )

    async def acknowledge_through(
        self, connector_id: str, recipient_id: str, position: Position
    ) -> int:
        through = {
            "appId": connector_id,
            "recipientId": recipient_id,
            "epoch": position.epoch,
            "seq": {"$lte": position.seq},
            "state": {"$lt": int(State.DELIVERED)},
        }

        def acknowledge() -> int:
            ids = [r["_id"] for r in self._delivery.find(through, projection={"_id": 1})]
            if not ids:
                return 0
            docs = list(
                self._collection.find(
                    {"_id": {"$in": documents.id_values(ids)}}, projection={"status": 1}
                )
            )
            return self._move(docs, State.DELIVERED)

        return await self._run(acknowledge)

    async def get(self, message_id: str) -> Message | None:
        values = documents.id_values([message_id])
        if not values:
            return None

        def get() -> tuple[Document | None, Document | None]:
            doc = self._collection.find_one({"_id": {"$in": values}})
            return doc, None if doc is None else self._delivery.find_one({"_id": message_id})

        doc, record = await self._run(get)
        message = None if doc is None else _message(doc, {})
        if message is None or record is None:
            return message
        return documents.placed(message, record)

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
        """Open a change stream at the feeds' checkpoint, or from now when there is none or
        it has left the oplog (retrying with backoff while MongoDB is down); then, in one
        dedicated thread until cancelled, log what the stream reports (`_claim`) and send
        it, with its place in the log. Adopts first when it started from now (`_adopt`), and
        calls `task_status.started()` once it is watching with nothing missed behind it.

        The thread blocks on `send` when the channel is full and stops within a fraction
        of a second of cancellation; it closes its stream on the way out. Errors never end
        the feed: transient ones reopen the stream from the last resume token (a claim is
        retried until it is made); a lost resume point adopts what was stored since the
        last event seen, sends `HistoryLost` and goes on from now."""
        backoff = FEED_BACKOFF_FIRST
        while True:
            try:
                self._feed_starts += 1
                stream, start, adopt = await self._run(self._open_feed)
                break
            except StoreError as exc:  # unavailable or refused: the feed waits either out
                log.warning("cannot open the change stream, retrying in %.1fs: %s", backoff, exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, FEED_BACKOFF_MAX)
        taken = threading.Event()
        try:
            await trio.to_thread.run_sync(
                functools.partial(
                    self._tail, stream, start, adopt, send, taken, task_status.started
                ),
                abandon_on_cancel=False,
                # Its own token: the reader lives as long as the feed and must not hold one
                # of the default limiter's, which the store calls share.
                limiter=trio.CapacityLimiter(1),
            )
        finally:
            if not taken.is_set():  # cancelled before the thread took the stream over
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_close_quietly, stream)

    def _open_feed(self) -> tuple[CollectionChangeStream[Document], Timestamp, _Adoption | None]:
        """The change stream, where it starts, and what to adopt first (in a worker
        thread): from the checkpoint, nothing; without one, every stored message (a first
        start); with one the oplog no longer has, what was stored since it."""
        checkpoint = self._feeds.find_one({"_id": self._feed_key})
        at = checkpoint.get("at") if checkpoint is not None else None
        if isinstance(at, Timestamp):
            try:
                return self._watch(None, at), at, None
            except OperationFailure as exc:
                if feed_step(exc, at_token=False, wire_version=None) is not FeedStep.LOST:
                    raise
                log.warning("the feed's checkpoint %s has left the oplog (%r): adopting", at, exc)
            adoption = _Adoption(since=at)
        else:
            adoption = _Adoption(since=None)
        start = self._now()
        return self._watch(None, start), start, adoption

    def _tail(
        self,
        stream: CollectionChangeStream[Document],
        start: Timestamp,
        adopt: _Adoption | None,
        send: trio.MemorySendChannel[FeedItem],
        taken: threading.Event,
        started: Callable[[], None],
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
        # The cluster time of the last event logged, and when the checkpoint was written.
        seen: Timestamp | None = None
        written = 0.0
        try:
            if adopt is not None:
                self._retrying(functools.partial(self._adopt, adopt))
                self._write_checkpoint(start)
            trio.from_thread.run_sync(started)
            while True:
                trio.from_thread.check_cancelled()
                began = time.monotonic()
                at_token = False  # whether what fails is opening the stream at `token`
                try:
                    if current is None:
                        at_token = token is not None
                        current = self._watch(token, start)
                        at_token = False
                        where = "from its resume token" if token is not None else f"at {start}"
                        log.warning("change stream resumed %s", where)
                    change = current.try_next()
                except PyMongoError as exc:
                    if current is not None:
                        token = current.resume_token or token
                        _close_quietly(current)
                        current = None
                    step = feed_step(exc, at_token=at_token, wire_version=self._wire_version())
                    if step is FeedStep.LOST:
                        log.warning("change stream cannot resume (%r): history lost", exc)
                        token, start = None, self._lost(seen or start, send)
                    else:
                        log.warning("change stream interrupted (%r): resuming", exc)
                    # A server that fails every time must not be hammered in a loop.
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
                message = _message(document, {}) if isinstance(document, Mapping) else None
                at = change.get("clusterTime")
                if message is not None:
                    logged, retried = self._retrying(functools.partial(self._claim, message))
                    trio.from_thread.run(send.send, logged)
                    if retried and isinstance(at, Timestamp):
                        # MongoDB went away while this claim waited: reopen the change
                        # stream here rather than let the driver resume the cursor of
                        # before (mongo-java-server then misses later events).
                        _close_quietly(current)
                        current, token, start = None, None, at
                if isinstance(at, Timestamp):
                    seen = at
                    if time.monotonic() - written >= CHECKPOINT_INTERVAL:
                        self._write_checkpoint(at)
                        written = time.monotonic()
        finally:
            _close_quietly(current)
            with self._readers_lock:
                self._readers -= 1

    def _wire_version(self) -> int | None:
        """The highest wire version of the servers the client knows (None: none known)."""
        versions = [
            d.max_wire_version
            for d in self._client.topology_description.server_descriptions().values()
            if d.is_server_type_known
        ]
        return max(versions, default=None)

    def _retrying(self, fn: Callable[[], T]) -> tuple[T, bool]:
        """`fn` until MongoDB lets it through (in the feed thread; cancellable), and
        whether it had to wait for MongoDB. A refusal is waited out too (`store_error` says
        StoreError): the feed has no caller to answer, and stopping it would stop every
        stream of the instance."""
        backoff = FEED_BACKOFF_FIRST
        retried = False
        while True:
            try:
                return fn(), retried
            except PyMongoError as exc:
                if store_error(exc) is None:
                    raise
                log.warning("feed: %r; retrying in %.1fs", exc, backoff)
                _pause(backoff)
                backoff = min(backoff * 2, FEED_BACKOFF_MAX)
                retried = True

    def _claim(self, message: Message) -> Message:
        """`message` at its place in its user's log, logging it when no feed has (in the
        feed thread). Every feed claims in oplog order, one message at a time, so a message
        gets a seq after those committed before it (docs/delivery.md).

        A feed remembers the last place it saw per user for a short while (`_heads`) and
        claims right after it: the unique index refuses a place taken meanwhile, and the
        claim then reads the log again. A message this store saved is most likely claimed
        by this feed first, so it tries the insert first; another writer's is looked up
        first (another feed has most likely claimed it)."""
        user = (message.connector_id, message.recipient_id)
        if message.id not in self._own_saves:
            record = self._logged_record(message)
            if record is not None:
                return self._placed(user, message, record)
        taken: tuple[int, int] | None = None  # the place a claim of this loop was refused
        while True:
            head = self._heads.get(user, time.monotonic())
            if head is None:
                head = self._log_reads.find_one(
                    {"appId": user[0], "recipientId": user[1]},
                    projection={"epoch": 1, "seq": 1},
                    sort=[("seq", -1)],
                )
            epoch, seq = documents.place_after(head, secrets.randbits(31) + 1)
            if taken is not None and seq <= taken[1]:
                # A read that lags the claim that beat us: past the place known taken.
                epoch, seq = taken[0], taken[1] + 1
            now = datetime.datetime.now(datetime.UTC)
            try:
                self._log_writes.insert_one(documents.log_record(message, epoch, seq, now))
            except DuplicateKeyError:
                # Another feed took this seq, or logged this message: look again.
                self._heads.forget(user)
                record = self._logged_record(message)
                if record is not None:
                    return self._placed(user, message, record)
                log.info("feed: seq %d of %s/%s was taken; claiming again", seq, *user)
                taken = (epoch, seq)
                continue
            self._heads.put(user, {"epoch": epoch, "seq": seq}, time.monotonic())
            return dataclasses.replace(message, epoch=epoch, seq=seq)

    def _logged_record(self, message: Message) -> Document | None:
        """The record logging `message` (in the feed thread); a record of an earlier message
        of its id, gone since, is removed so that this one is logged anew."""
        record = self._log_reads.find_one({"_id": message.id})
        if record is None or documents.logs(record, message):
            return record
        self._log_writes.delete_one({"_id": message.id, "enq": record["enq"]})
        return None

    def _placed(
        self, user: tuple[str, str], message: Message, record: Mapping[str, Any]
    ) -> Message:
        """`message` as `record` logged it; remembered as the user's head when none is
        known or it is past the one known (a stale one only costs a refused claim)."""
        placed = documents.placed(message, record)
        now = time.monotonic()
        known = self._heads.get(user, now)
        if known is None or (
            int(known["epoch"]) == placed.epoch and int(known["seq"]) < placed.seq
        ):
            self._heads.put(user, {"epoch": placed.epoch, "seq": placed.seq}, now)
        return placed

    def _adopt(self, adoption: _Adoption) -> int:
        """Log the stored messages no feed has logged (in the feed thread), in the order
        their writers stored them as best the documents tell (`enqueuedAt`, then the id):
        every one on a first start, else those stored since `adoption.since` (by
        `enqueuedAt`, with a margin; all of Tock 23.9's, which have none). Only their ids
        are kept while looking, and they are read again by id to be claimed, a page at a
        time. Returns how many it logged."""
        query: Document = {"appId": {"$in": self._connector_ids}}
        if adoption.since is not None:
            since = datetime.datetime.fromtimestamp(
                max(adoption.since.time - ADOPTION_MARGIN, 0), datetime.UTC
            )
            query["$or"] = [{"enqueuedAt": {"$gte": since}}, {"enqueuedAt": {"$exists": False}}]
        unlogged: list[tuple[datetime.datetime, str]] = []
        after: str | None = None
        while True:
            trio.from_thread.check_cancelled()
            docs, more = self._page(query, after, ADOPTION_PAGE)
            logged = self._delivery_of(docs)
            for doc in docs:
                message = None if documents.message_id(doc["_id"]) in logged else _message(doc, {})
                if message is not None:
                    unlogged.append((message.enqueued_at, message.id))
            if not more:
                break
            after = str(docs[-1]["_id"])
        unlogged.sort()
        for start in range(0, len(unlogged), ADOPTION_PAGE):
            trio.from_thread.check_cancelled()
            ids = [message_id for _, message_id in unlogged[start : start + ADOPTION_PAGE]]
            found = {
                documents.message_id(d["_id"]): d
                for d in self._collection.find(_by_ids(documents.id_values(ids)))
            }
            for message_id in ids:
                stored = found.get(message_id)  # gone meanwhile: expired or evicted
                message = None if stored is None else _message(stored, {})
                if message is not None:
                    self._claim(message)
        if unlogged:
            log.warning("feed: adopted %d stored messages no feed had logged", len(unlogged))
        return len(unlogged)

    def _lost(self, last: Timestamp, send: trio.MemorySendChannel[FeedItem]) -> Timestamp:
        """The history since `last` is lost: the new start point (now), with what was stored
        since `last` adopted, and `HistoryLost` sent (in the feed thread)."""
        start = self._fresh_start(last)
        self._retrying(functools.partial(self._adopt, _Adoption(since=last)))
        trio.from_thread.run(send.send, HistoryLost())
        return start

    def _write_checkpoint(self, at: Timestamp) -> None:
        """Every insert up to `at` is logged (in the feed thread); best effort: a checkpoint
        left behind only means more to read again."""
        try:
            self._feeds.update_one({"_id": self._feed_key}, {"$max": {"at": at}}, upsert=True)
        except PyMongoError as exc:
            log.debug("feed checkpoint not written: %r", exc)

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


def _ensure_collection(db: Database[Document], options: StoreOptions) -> bool:
    """Create `web_channel_event` with its indexes when missing; return whether it is
    capped. Losing a creation race to another instance is fine."""
    if COLLECTION not in db.list_collection_names(filter={"name": COLLECTION}):
        try:
            if options.mongo_capped:
                # As Tock creates it: size in bytes from the KB setting, max documents.
                size_kb = options.max_size_kb or 2 * options.max_count
                db.create_collection(
                    COLLECTION,
                    capped=True,
                    size=size_kb * 1000,
                    max=options.max_count,
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
            _create_indexes(db[COLLECTION], options)
    found = db[COLLECTION].options()
    capped = bool(found.get("capped"))
    if capped:
        log.info(
            "%s.%s is capped (max %s documents, %s bytes): undelivered messages are evicted "
            "when it is full",
            db.name, COLLECTION, found.get("max"), found.get("size"),
        )  # fmt: skip
    else:
        log.info("%s.%s is not capped", db.name, COLLECTION)
    return capped


def _ttl_seconds(options: StoreOptions) -> int | None:
    ttl_days = DEFAULT_TTL_DAYS if options.ttl_days is None else options.ttl_days
    return int(ttl_days * 86400) if ttl_days > 0 else None


def _create_indexes(collection: Collection[Document], options: StoreOptions) -> None:
    """The indexes of a `web_channel_event` the sidecar created. None has the keys of one of
    Tock's (`{appId, recipientId, status}`, `{enqueuedAt: 1}` with Tock's TTL), whose index
    helper would drop it and make its own: the TTL index is on `{enqueuedAt: -1}`, so when
    Tock adds its own, both apply and the shorter time wins."""
    specs: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
        ([("appId", 1), ("recipientId", 1), ("status", 1), ("_id", 1)], {})
    ]
    ttl = _ttl_seconds(options)
    # MongoDB refuses TTL indexes on capped collections; the cap bounds those instead.
    if ttl is not None and not options.mongo_capped:
        specs.append(([("enqueuedAt", -1)], {"expireAfterSeconds": ttl}))
    _ensure_indexes(collection, specs)


def _ensure_delivery(db: Database[Document], options: StoreOptions) -> None:
    """`sidecar_delivery`'s indexes: the log's, unique, on which claims race (one seq per
    user per place), and the TTL on `at`: a record goes when its message would (with no
    TTL, records stay as long as the messages may)."""
    specs: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
        ([("appId", 1), ("recipientId", 1), ("seq", 1)], {"unique": True})
    ]
    ttl = _ttl_seconds(options)
    if ttl is not None:
        specs.append(([("at", 1)], {"expireAfterSeconds": ttl}))
    _ensure_indexes(db[DELIVERY], specs)


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
