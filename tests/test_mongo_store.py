"""MongoStore behaviour beyond the conformance suite: Tock's document shape, the exact
updates it sends, the change-stream tailer's cancellation and fault handling, and how the
collection is set up.

Runs against MONGODB_URI when set, else the session's mongo-java-server (tests/conftest.py).
"""

from __future__ import annotations

import datetime
import functools
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pymongo
import pytest
import trio
from bson import ObjectId
from bson.int64 import Int64
from pymongo import monitoring, uri_parser
from pymongo.errors import (
    AutoReconnect,
    ConfigurationError,
    CursorNotFound,
    ExecutionTimeout,
    InvalidOperation,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
    WriteError,
    WTimeoutError,
)

from sidecar.app import store_options
from sidecar.config import Settings
from sidecar.protocol.delivery import Position, Replay
from sidecar.protocol.feed import FeedItem, HistoryLost
from sidecar.protocol.message import Message, State, new_id
from sidecar.store.base import StoreError, StoreOptions, StoreUnavailable
from sidecar.store.documents import COLLECTION, DELIVERY
from sidecar.store.mongo import FeedStep, MongoStore, feed_step, store_error
from tests.mongo_harness import MongoJavaServer, TcpProxy, free_port, not_messages
from tests.sidecar_harness import running_sidecar, settings_for
from tests.tock_documents import encoded_size, fixtures

RawClient = pymongo.MongoClient[dict[str, Any]]


class Commands(monitoring.CommandListener):
    """Records every command the client starts (pymongo calls it from its own threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: list[monitoring.CommandStartedEvent] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        with self._lock:
            self._started.append(event)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def clear(self) -> None:
        with self._lock:
            self._started.clear()

    def commands(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                dict(e.command) for e in self._started if name is None or e.command_name == name
            ]

    def names(self) -> set[str]:
        with self._lock:
            return {e.command_name for e in self._started}


@pytest.fixture
def mongo_uri(mongodb_server: str) -> str:
    return mongodb_server


@pytest.fixture
def raw(mongo_uri: str) -> Iterator[RawClient]:
    """A plain client straight to the server (never through a proxy)."""
    with pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=5000, tz_aware=True) as client:
        yield client


@pytest.fixture
def db_name(raw: RawClient) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    raw.drop_database(name)


def settings(uri: str, db: str, **env: str) -> StoreOptions:
    return store_options(Settings.load({"SIDECAR_STORE": uri, "SIDECAR_MONGO_DB": db} | env))


@asynccontextmanager
async def opened(
    uri: str, db: str, *, client_options: dict[str, Any] | None = None, **env: str
) -> AsyncIterator[MongoStore]:
    store = await MongoStore.open(settings(uri, db, **env), client_options=client_options)
    try:
        yield store
    finally:
        await store.aclose()


def message(recipient: str = "alice", connector: str = "web") -> Message:
    return Message(new_id(), connector, recipient, {"responses": [{"text": recipient}]})


async def receive_ids(
    receive: trio.MemoryReceiveChannel[FeedItem], wanted: set[str], seconds: float = 10.0
) -> list[FeedItem]:
    """Read the feed until every id in `wanted` came out (within `seconds`); returns all
    items read, in order."""
    items: list[FeedItem] = []
    missing = set(wanted)
    with trio.fail_after(seconds):
        while missing:
            item = await receive.receive()
            items.append(item)
            if isinstance(item, Message):
                missing.discard(item.id)
    return items


async def adopted(store: MongoStore) -> None:
    """Start a feed and stop it: on a first start (no checkpoint) it logs every stored
    message before it says it has started (adoption)."""
    send, _ = trio.open_memory_channel[FeedItem](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run_feed, send)
        nursery.cancel_scope.cancel()


def proxied_uri(uri: str, port: int) -> str:
    parsed = uri_parser.parse_uri(uri)
    auth = ""
    if parsed["username"]:
        from urllib.parse import quote_plus

        auth = f"{quote_plus(parsed['username'])}:{quote_plus(parsed['password'] or '')}@"
    return f"mongodb://{auth}127.0.0.1:{port}/?directConnection=true"


def server_address(uri: str) -> tuple[str, int]:
    host, port = uri_parser.parse_uri(uri)["nodelist"][0]
    return str(host), int(port)


# -- (a) Tock's documents -------------------------------------------------------------


async def test_tock_written_document_is_logged_by_the_feed_and_replayed(
    mongo_uri: str, db_name: str, raw: RawClient
) -> None:
    ref = ObjectId()
    at = datetime.datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.UTC)
    enqueued_at = datetime.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=datetime.UTC)
    oid = ObjectId()
    # BSON values with no JSON type of their own, as another writer may store them.
    tock_doc = {
        "_id": oid,
        "appId": "web",
        "recipientId": "alice",
        "webConnectorResponse": {
            "responses": [{"text": "hi", "ref": ref, "at": at, "count": Int64(7)}],
            "metadata": {"nested": [ref, {"when": at}]},
        },
        "status": 0,
        "enqueuedAt": enqueued_at,
    }
    expected_response = {
        "responses": [
            {"text": "hi", "ref": str(ref), "at": "2024-01-02T03:04:05.678Z", "count": 7}
        ],
        "metadata": {"nested": [str(ref), {"when": "2024-01-02T03:04:05.678Z"}]},
    }
    async with opened(mongo_uri, db_name) as store:
        send, receive = trio.open_memory_channel[FeedItem](10)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_feed, send)
            await trio.to_thread.run_sync(lambda: raw[db_name][COLLECTION].insert_one(tock_doc))
            items = await receive_ids(receive, {str(oid)})
            fed = items[-1]
            nursery.cancel_scope.cancel()
        assert isinstance(fed, Message)
        assert (fed.id, fed.connector_id, fed.recipient_id, fed.state) == (
            str(oid), "web", "alice", State.ENQUEUED,
        )  # fmt: skip
        assert fed.response == expected_response
        assert fed.enqueued_at == enqueued_at
        [replayed] = await store.logged(
            "web", "alice", Position(fed.epoch, 0), through=1, limit=10, replay=Replay(sent=False)
        )
        assert replayed == fed
        assert fed.seq == 1
        assert await store.get(str(oid)) == fed


async def test_documents_that_are_not_messages_are_not_logged_and_pages_fill_past_gone_ones(
    mongo_uri: str, db_name: str, raw: RawClient
) -> None:
    fields = {"appId": "web", "recipientId": "bob", "status": 0}
    docs = [{"_id": ObjectId(), **fields, "webConnectorResponse": {"n": n}} for n in range(4)]
    skipped = not_messages("bob")
    ids = [str(d["_id"]) for d in docs]
    coll = raw[db_name][COLLECTION]
    await trio.to_thread.run_sync(coll.insert_many, [docs[0], *skipped, *docs[1:]])
    async with opened(mongo_uri, db_name) as store:
        await adopted(store)
        head = await store.head("web", "bob")
        assert head is not None
        assert head.seq == 4
        # Evicted or expired after it was logged: its seq is skipped, the page filled past.
        await trio.to_thread.run_sync(coll.delete_one, {"_id": docs[1]["_id"]})
        start = Position(head.epoch, 0)
        page = await store.logged("web", "bob", start, through=4, limit=2)
        assert [(m.id, m.seq) for m in page] == [(ids[0], 1), (ids[2], 3)]
        assert [m.response for m in page] == [{"n": 0}, {"n": 2}]
        rest = await store.logged("web", "bob", Position(head.epoch, 3), through=4, limit=2)
        assert [m.id for m in rest] == ids[3:]
        for doc in skipped:
            assert await store.get(str(doc["_id"])) is None


async def test_adoption_logs_in_the_order_the_writers_stored(
    mongo_uri: str, db_name: str, raw: RawClient
) -> None:
    """Two writers' ids within one second compare by their random bytes: adoption, which
    has no oplog to go by, orders by `enqueuedAt` (then the id), not by id alone."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    fields = {"appId": "web", "recipientId": "carol", "status": 0}
    ids = ["65f0000000000000000000ff", "65f000000000000000000001", "65f000000000000000000002"]
    docs = [
        {"_id": ids[0], **fields, "enqueuedAt": now, "webConnectorResponse": {"n": 0}},
        {"_id": ids[1], **fields, "enqueuedAt": now + datetime.timedelta(milliseconds=5)},
        # Tock 23.9 writes no enqueuedAt: the id's time stands for it.
        {"_id": ObjectId(ids[2]), **fields},
    ]
    docs[1]["webConnectorResponse"] = {"n": 1}
    docs[2]["webConnectorResponse"] = {"n": 2}
    ordered = [ids[2], ids[0], ids[1]]  # the ObjectId's time (2024) is before `now`
    coll = raw[db_name][COLLECTION]
    await trio.to_thread.run_sync(coll.insert_many, docs)
    async with opened(mongo_uri, db_name) as store:
        await adopted(store)
        head = await store.head("web", "carol")
        assert head is not None
        page = await store.logged("web", "carol", Position(head.epoch, 0), through=3, limit=9)
        assert [(m.id, m.seq) for m in page] == [(i, n) for n, i in enumerate(ordered, 1)]


async def test_saved_document_is_shaped_as_tock_26_writes_it(
    mongo_uri: str, db_name: str, raw: RawClient
) -> None:
    tock = next(f for f in fixtures() if f.tock == "26.3.2")
    m = message()
    coll = raw[db_name][COLLECTION]
    async with opened(mongo_uri, db_name) as store:
        await store.save([m])
        saved = await trio.to_thread.run_sync(lambda: coll.find_one({"_id": m.id}))
        await store.mark_sent([m.id])
        marked = await trio.to_thread.run_sync(lambda: coll.find_one({"_id": m.id}))
    assert saved is not None
    assert marked is not None
    # Tock's fields, in Tock's order, with Tock's BSON types (a str `_id`, int32 status).
    assert list(saved) == list(tock.document)
    assert [type(v) for v in saved.values()] == [type(v) for v in tock.document.values()]
    assert (saved["_id"], saved["webConnectorResponse"]) == (m.id, m.response)
    assert (saved["status"], marked["status"]) == (0, 1)
    assert type(marked["status"]) is int  # int32: PROCESSED to Tock, and the same size
    assert encoded_size(marked) == encoded_size(saved)


# -- (b) what the sidecar writes where -------------------------------------------------


async def test_the_only_update_of_a_document_is_the_int32_sent_mark(
    mongo_uri: str, db_name: str
) -> None:
    commands = Commands()
    async with opened(mongo_uri, db_name, client_options={"event_listeners": [commands]}) as store:
        messages = [message() for _ in range(4)]
        send, receive = trio.open_memory_channel[FeedItem](10)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_feed, send)
            await store.save(messages)
            items = await receive_ids(receive, {m.id for m in messages})
            nursery.cancel_scope.cancel()
        epoch = next(i.epoch for i in items if isinstance(i, Message))
        commands.clear()
        assert await store.mark_sent([m.id for m in messages[:3]]) == 3
        assert await store.ack("web", "alice", [messages[0].id, messages[3].id]) == 2
        assert await store.acknowledge_through("web", "alice", Position(epoch, 3)) == 2
        assert await store.mark_sent([]) == 0
        assert await store.ack("web", "alice", []) == 0

    updates = [(cmd["update"], u) for cmd in commands.commands("update") for u in cmd["updates"]]
    assert updates
    for collection, update in updates:
        if collection == COLLECTION:
            # status at most int32 1 and nothing else, by id (the documents read as int32
            # 0): Tock decodes it (PROCESSED) and a capped collection takes it (the size
            # does not change).
            assert update["u"] == {"$max": {"status": 1}}
            assert type(update["u"]["$max"]["status"]) is int
            assert set(update["q"]) == {"_id"}
            assert update.get("upsert", False) is False
        else:  # the log records hold what Tock's status cannot
            assert collection == DELIVERY
            assert update.get("upsert", False) is False
            assert set(update["u"]) == {"$max"}  # a state only moves forward
            assert update["u"]["$max"]["state"] in (1, 2)
    assert {c["delete"] for c in commands.commands("delete")} <= {DELIVERY}
    assert {c["insert"] for c in commands.commands("insert")} <= {DELIVERY}


# -- (c) cancellation ----------------------------------------------------------------


async def test_cancelling_the_feed_stops_its_thread_within_a_second(
    mongo_uri: str, db_name: str
) -> None:
    async with opened(mongo_uri, db_name) as store:
        send, receive = trio.open_memory_channel[FeedItem](0)
        for blocked_on_send in (False, True):
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run_feed, send)
                with trio.fail_after(2):  # the reader thread starts just after started()
                    while store.feed_readers != 1:
                        await trio.sleep(0.01)
                if blocked_on_send:
                    # Nobody receives: the reader thread blocks in send (backpressure).
                    await store.save([message()])
                    await trio.sleep(0.5)
                began = trio.current_time()
                nursery.cancel_scope.cancel()
            assert trio.current_time() - began < 1.0
            # abandon_on_cancel=False: the reader has returned (and closed its stream).
            assert store.feed_readers == 0
        receive.close()


# -- (d) network faults -------------------------------------------------------------


@pytest.mark.time_limit(60)
async def test_feed_survives_a_network_cut(mongo_uri: str, db_name: str, raw: RawClient) -> None:
    host, port = server_address(mongo_uri)
    with TcpProxy(host, port) as proxy:
        uri = proxied_uri(mongo_uri, proxy.port)
        # retryWrites off: the 503 comes after one server selection timeout, not two.
        options = {"heartbeatFrequencyMS": 500, "retryWrites": False}
        async with opened(uri, db_name, client_options=options) as store:
            send, receive = trio.open_memory_channel[FeedItem](100)
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run_feed, send)
                first = message()
                await store.save([first])
                await receive_ids(receive, {first.id})

                await trio.to_thread.run_sync(proxy.cut)
                began = trio.current_time()
                with pytest.raises(StoreUnavailable):
                    await store.save([message()])
                assert trio.current_time() - began < 5.0
                # Written while the sidecar cannot see the server.
                while_cut = message("bob")
                coll = raw[db_name][COLLECTION]
                await trio.to_thread.run_sync(
                    lambda: coll.insert_one(
                        {
                            "_id": ObjectId(while_cut.id),
                            "appId": "web",
                            "recipientId": "bob",
                            "webConnectorResponse": while_cut.response,
                            "status": 0,
                            "enqueuedAt": while_cut.enqueued_at,
                        }
                    )
                )
                proxy.restore()

                after = message()
                with trio.fail_after(15):
                    while True:
                        try:
                            await store.save([after])
                            break
                        except StoreUnavailable:
                            await trio.sleep(0.2)
                items = await receive_ids(receive, {while_cut.id, after.id}, seconds=20)
                assert not any(isinstance(i, HistoryLost) for i in items)
                nursery.cancel_scope.cancel()


@pytest.mark.time_limit(60)
async def test_feed_start_waits_until_mongodb_answers(mongo_uri: str, db_name: str) -> None:
    host, port = server_address(mongo_uri)
    with TcpProxy(host, port) as proxy:
        uri = proxied_uri(mongo_uri, proxy.port)
        async with opened(uri, db_name, client_options={"heartbeatFrequencyMS": 500}) as store:
            await trio.to_thread.run_sync(proxy.cut)
            send, receive = trio.open_memory_channel[FeedItem](100)
            started = trio.Event()

            async def start_feed(nursery: trio.Nursery) -> None:
                await nursery.start(store.run_feed, send)
                started.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(start_feed, nursery)
                with trio.move_on_after(1.0):
                    await started.wait()
                assert not started.is_set()  # no change stream yet: not watching
                proxy.restore()
                with trio.fail_after(15):
                    await started.wait()
                m = message()
                await store.save([m])
                await receive_ids(receive, {m.id})
                nursery.cancel_scope.cancel()


@pytest.mark.time_limit(60)
async def test_feed_waits_out_a_server_restart(tmp_path: Path) -> None:
    """The server goes away (H2 backend, so the data survives) and comes back on the same
    port: saves fail meanwhile, the feed keeps retrying and picks up where it was."""
    server = MongoJavaServer()
    await trio.to_thread.run_sync(lambda: server.start(h2_path=tmp_path / "mongo.h2"))
    try:
        options = {"heartbeatFrequencyMS": 500}
        async with opened(server.uri, "restart", client_options=options) as store:
            send, receive = trio.open_memory_channel[FeedItem](100)
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run_feed, send)
                first = message()
                await store.save([first])
                await receive_ids(receive, {first.id})

                await trio.to_thread.run_sync(server.stop)
                with pytest.raises(StoreUnavailable):
                    await store.save([message()])
                with pytest.raises(StoreUnavailable):
                    await store.ping()
                port = server.port
                await trio.to_thread.run_sync(
                    lambda: server.start(h2_path=tmp_path / "mongo.h2", port=port)
                )
                after = message()
                with trio.fail_after(15):
                    while True:
                        try:
                            await store.save([after])
                            break
                        except StoreUnavailable:
                            await trio.sleep(0.2)
                await receive_ids(receive, {after.id}, seconds=20)
                nursery.cancel_scope.cancel()
            assert await store.get(first.id) is not None
    finally:
        await trio.to_thread.run_sync(server.stop)


# -- (e) the server kills the change stream's cursor ---------------------------------


async def test_feed_resumes_after_its_cursor_is_killed(
    mongo_uri: str, db_name: str, raw: RawClient
) -> None:
    commands = Commands()
    async with opened(mongo_uri, db_name, client_options={"event_listeners": [commands]}) as store:
        send, receive = trio.open_memory_channel[FeedItem](100)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_feed, send)
            first = message()
            await store.save([first])
            await receive_ids(receive, {first.id})

            cursor_ids = {c["getMore"] for c in commands.commands("getMore")}
            with trio.fail_after(5):
                while not cursor_ids:
                    await trio.sleep(0.05)
                    cursor_ids = {c["getMore"] for c in commands.commands("getMore")}
            [cursor_id] = cursor_ids
            aggregates = len(commands.commands("aggregate"))
            assert store.feed_resumes == 0
            killed = await trio.to_thread.run_sync(
                lambda: raw[db_name].command("killCursors", COLLECTION, cursors=[cursor_id])
            )
            assert killed["cursorsKilled"] == [cursor_id]
            lost = [message() for _ in range(3)]
            for m in lost:
                await store.save([m])
            items = await receive_ids(receive, {m.id for m in lost})
            assert not any(isinstance(i, HistoryLost) for i in items)
            # It really was a new change stream that delivered them.
            assert len(commands.commands("aggregate")) > aggregates
            assert store.feed_resumes >= 1  # what /metrics shows as sidecar_feed_resumes_total
            nursery.cancel_scope.cancel()


# -- (f) collection set-up -----------------------------------------------------------


def _indexes(raw: RawClient, db: str) -> dict[str, dict[str, Any]]:
    return {ix["name"]: dict(ix) for ix in raw[db][COLLECTION].list_indexes()}


async def test_missing_collection_gets_ttl_and_recipient_indexes(
    mongo_uri: str, db_name: str, raw: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="sidecar.store.mongo")
    async with opened(mongo_uri, db_name) as store:
        assert store.capped is False
        assert await store.eviction_headroom() is None
    indexes = await trio.to_thread.run_sync(_indexes, raw, db_name)
    keyed = {tuple(ix["key"].items()): ix for ix in indexes.values()}
    ttl = keyed[(("enqueuedAt", -1),)]
    assert ttl["expireAfterSeconds"] == 7 * 86400
    assert (("appId", 1), ("recipientId", 1), ("status", 1), ("_id", 1)) in keyed
    # None with the keys of Tock's own ({appId, recipientId, status} and, with Tock's TTL,
    # {enqueuedAt: 1}): Tock's index helper would drop it to make its own.
    assert not keyed.keys() & {
        (("appId", 1), ("recipientId", 1), ("status", 1)),
        (("enqueuedAt", 1),),
    }
    delivery = await trio.to_thread.run_sync(
        lambda: {tuple(ix["key"].items()): ix for ix in raw[db_name][DELIVERY].list_indexes()}
    )
    assert delivery[(("at", 1),)]["expireAfterSeconds"] == 7 * 86400
    # The log: one seq per user per place, the index the claims race on.
    assert delivery[(("appId", 1), ("recipientId", 1), ("seq", 1))]["unique"] is True
    assert any("is not capped" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("ttl_env", "expected"), [("0", None), ("1.5", 129600), ("-1", None)])
async def test_ttl_setting(
    mongo_uri: str, db_name: str, raw: RawClient, ttl_env: str, expected: int | None
) -> None:
    async with opened(mongo_uri, db_name, SIDECAR_QUEUE_TTL_DAYS=ttl_env):
        pass
    indexes = await trio.to_thread.run_sync(_indexes, raw, db_name)
    ttls = [ix["expireAfterSeconds"] for ix in indexes.values() if "expireAfterSeconds" in ix]
    assert ttls == ([] if expected is None else [expected])
    assert len(indexes) == 2 + len(ttls)  # _id, the recipient index, the TTL index


async def test_existing_collection_is_left_as_is(
    mongo_uri: str, db_name: str, raw: RawClient
) -> None:
    await trio.to_thread.run_sync(lambda: raw[db_name].create_collection(COLLECTION))
    before = await trio.to_thread.run_sync(_indexes, raw, db_name)
    async with opened(mongo_uri, db_name) as store:
        m = message()
        await store.save([m])
        assert await store.get(m.id) is not None
    assert (
        await trio.to_thread.run_sync(_indexes, raw, db_name) == before == {"_id_": before["_id_"]}
    )


async def test_capped_collection_and_eviction_headroom(
    mongo_uri: str, db_name: str, raw: RawClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="sidecar.store.mongo")
    try:
        store = await MongoStore.open(
            settings(mongo_uri, db_name, SIDECAR_MONGO_CAPPED="true", SIDECAR_QUEUE_MAX_COUNT="10")
        )
    except StoreError as exc:
        if "capped" in str(exc).lower():
            pytest.skip(f"this server cannot create capped collections: {exc}")
        raise
    try:
        assert store.capped is True
        assert any("is capped" in r.getMessage() for r in caplog.records)
        options = await trio.to_thread.run_sync(lambda: raw[db_name][COLLECTION].options())
        assert (options["capped"], options["max"], options["size"]) == (True, 10, 20 * 1000)
        indexes = await trio.to_thread.run_sync(_indexes, raw, db_name)
        keys = [tuple(ix["key"].items()) for ix in indexes.values()]
        assert (("appId", 1), ("recipientId", 1), ("status", 1), ("_id", 1)) in keys
        assert not any("expireAfterSeconds" in ix for ix in indexes.values())

        assert await store.eviction_headroom() == 10  # nothing undelivered
        messages = [message() for _ in range(3)]
        await store.save(messages)
        await store.ack("web", "alice", [messages[0].id])
        # The oldest undelivered is messages[1]: it and one newer one are in the 10.
        assert await store.eviction_headroom() == 10 - 2
        assert await store.ping() == {"kind": "mongodb", "capped": True, "evictionHeadroom": 8}
    finally:
        await store.aclose()


async def test_headroom_counts_from_the_oldest_message_no_stream_had(
    mongo_uri: str, db_name: str, raw: RawClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `evictionHeadroom` counts, on both id types and past documents whose SENT only
    their delivery record holds (Tock 23.9's, without `status`), one page at a time."""
    monkeypatch.setattr("sidecar.store.mongo.HEADROOM_PAGE", 1)
    old, new = (next(f for f in fixtures() if f.tock == v) for v in ("23.9.0", "26.3.2"))
    docs = [
        old.renamed("alice", ObjectId("100000000000000000000001")).document,
        new.renamed("alice", "100000000000000000000002").document,
        old.renamed("bob", ObjectId("100000000000000000000003")).document,
    ]
    async with opened(mongo_uri, db_name) as store:
        behind = functools.partial(trio.to_thread.run_sync, store._newer_than_oldest_unsent)
        assert await behind() is None
        await trio.to_thread.run_sync(raw[db_name][COLLECTION].insert_many, docs)
        assert await behind() == 2
        await adopted(store)
        assert await behind() == 2
        for doc, expected in zip(docs, (1, 0, None), strict=True):
            assert await store.mark_sent([str(doc["_id"])]) == 1
            assert await behind() == expected


async def test_open_fails_fast_when_mongodb_is_unreachable() -> None:
    uri = f"mongodb://127.0.0.1:{free_port()}/?directConnection=true"
    began = trio.current_time()
    with pytest.raises(StoreUnavailable):
        await MongoStore.open(settings(uri, "t_unreachable"))
    assert trio.current_time() - began < 5.0


def labelled(code: int) -> OperationFailure:
    return OperationFailure("x", code=code, details={"errorLabels": ["ResumableChangeStreamError"]})


LOST, RESUME = FeedStep.LOST, FeedStep.RESUME
# (error, at a resume token, server wire version, step)
FEED_STEPS = [
    # The resume point is gone, whatever the version and wherever it failed.
    *[
        (OperationFailure("gone", code=code), at_token, wire, LOST)
        for code in (136, 260, 280, 286)
        for at_token in (False, True)
        for wire in (None, 8, 17)
    ],
    # Network errors, a lost cursor and timeouts are resumed after.
    *[
        (error, at_token, wire, RESUME)
        for error in (AutoReconnect("reset"), NetworkTimeout("slow"), CursorNotFound("gone"))
        for at_token in (False, True)
        for wire in (None, 8, 17)
    ],
    # From wire version 9 the label decides; before it (or unknown) the code.
    (labelled(1), True, 17, RESUME),
    (OperationFailure("stepped down", code=189), True, 17, LOST),
    (OperationFailure("stepped down", code=189), True, 8, RESUME),
    (OperationFailure("stepped down", code=189), True, None, RESUME),
    (labelled(1), True, 8, LOST),
    # Anything else: lost only when the server refused our resume token.
    (OperationFailure("unauthorized", code=13), True, 17, LOST),
    (OperationFailure("unauthorized", code=13), False, 17, RESUME),
    (OperationFailure("unauthorized", code=13), False, None, RESUME),
]


@pytest.mark.parametrize(("error", "at_token", "wire", "step"), FEED_STEPS)
def test_feed_step(error: PyMongoError, at_token: bool, wire: int | None, step: FeedStep) -> None:
    assert feed_step(error, at_token=at_token, wire_version=wire) is step


# (what pymongo raised, what a store call raises instead: None when it is raised as is)
STORE_ERRORS: list[tuple[PyMongoError, type[StoreError] | None]] = [
    # An outage: retry later (503).
    (AutoReconnect("connection reset"), StoreUnavailable),
    (NetworkTimeout("timed out"), StoreUnavailable),
    (ServerSelectionTimeoutError("no server"), StoreUnavailable),
    (NotPrimaryError("not primary", {"code": 10107}), StoreUnavailable),
    (ExecutionTimeout("operation exceeded time limit", code=50), StoreUnavailable),  # MaxTimeMS
    (WTimeoutError("waiting for replication timed out", code=64), StoreUnavailable),
    *[
        (OperationFailure("not now", code=code), StoreUnavailable)
        for code in (
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
        )
    ],
    (
        OperationFailure("x", code=1, details={"errorLabels": ["RetryableWriteError"]}),
        StoreUnavailable,
    ),
    # A refusal a retry will not change: an internal error (500).
    (OperationFailure("Authentication failed.", code=18), StoreError),  # AuthenticationFailed
    (OperationFailure("not authorized on tock_bot", code=13), StoreError),  # Unauthorized
    (OperationFailure("unknown operator: $bogus", code=2), StoreError),  # BadValue
    (OperationFailure("no such command", code=59), StoreError),  # CommandNotFound
    (WriteError("Document failed validation", code=121), StoreError),  # DocumentValidation...
    (OperationFailure("no code at all"), StoreError),
    # Not from the server: a bug here, raised as it is.
    (InvalidOperation("cannot use MongoClient after close"), None),
    (ConfigurationError("unknown option"), None),
]


@pytest.mark.parametrize(("error", "raised"), STORE_ERRORS)
def test_store_error(error: PyMongoError, raised: type[StoreError] | None) -> None:
    assert store_error(error) is raised


async def test_a_command_the_server_refuses_is_a_store_error_not_an_outage(
    mongo_uri: str, db_name: str
) -> None:
    async with opened(mongo_uri, db_name) as store:
        with pytest.raises(StoreError) as info:
            await store._run(lambda: store._collection.database.command("noSuchCommand"))
        assert type(info.value) is StoreError
        assert isinstance(info.value.__cause__, OperationFailure)
        assert info.value.__cause__.code == 59  # CommandNotFound


class _RefusingInserts:
    """Stands in for a store's insert collection: every insert runs a command the server
    refuses (59 CommandNotFound), as an insert it is not authorised to make would be."""

    def __init__(self, database: Any) -> None:
        self._database = database

    def insert_many(self, *args: Any, **kwargs: Any) -> None:
        self._database.command("noSuchCommand")


async def test_a_save_the_server_refuses_is_answered_500_not_503(
    mongo_uri: str, db_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Against the server: a refusal is no outage, so no "retry later" (503); the send is
    answered as an internal error (500), the same on the fast path and through Quart (a
    chunked body), and the server's words go to the log, not to the client."""
    settings = settings_for(tmp_path, SIDECAR_STORE=mongo_uri, SIDECAR_MONGO_DB=db_name)
    body = b'{"connectorId": "web", "recipientId": "alice", "response": {"responses": []}}'

    async def chunked() -> AsyncIterator[bytes]:
        yield body

    async with running_sidecar(settings) as sidecar:
        store: Any = sidecar.running.store
        store._inserts = _RefusingInserts(store._collection.database)
        url = f"{sidecar.send_url}/v1/send"
        headers = {"Content-Type": "application/json"}
        for content in (body, chunked()):
            caplog.clear()
            reply = await sidecar.client.post(url, content=content, headers=headers)
            assert reply.status_code == 500, reply.text
            assert "retry-after" not in reply.headers
            error = reply.json()["error"]
            assert error["code"] == "internal_server_error"
            assert "noSuchCommand" not in error["message"]
            logged = [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
            assert any("noSuchCommand" in text for text in logged), logged
        assert (await sidecar.client.get(f"{sidecar.send_url}/readyz")).status_code == 200
