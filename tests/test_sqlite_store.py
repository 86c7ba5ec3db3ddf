"""What only the SQLite store does: retention, durability across reopen, error translation."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from sidecar.protocol.delivery import Position, Replay
from sidecar.protocol.feed import FeedItem
from sidecar.protocol.message import Message, new_id
from sidecar.store import sqlite
from sidecar.store.base import StoreUnavailable
from sidecar.store.sqlite import SqliteStore


def msg(age: datetime.timedelta = datetime.timedelta(0)) -> Message:
    enqueued_at = datetime.datetime.now(datetime.UTC) - age
    return Message(new_id(), "web", "alice", {"t": 1}, enqueued_at=enqueued_at)


async def ids_of(store: SqliteStore) -> list[str]:
    head = await store.head("web", "alice")
    if head is None:
        return []
    logged = await store.logged(
        "web", "alice", Position(head.epoch, 0), through=head.seq, limit=100
    )
    return [m.id for m in logged]


async def test_max_count_keeps_the_newest(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"), max_count=5)
    try:
        messages = [msg() for _ in range(8)]
        for m in messages[:3]:
            await store.save([m])
        await store.save(messages[3:])
        assert await ids_of(store) == [m.id for m in messages[3:]]
    finally:
        await store.aclose()


async def test_ttl_prunes_old_messages(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"), ttl_days=1)
    try:
        old, fresh = msg(datetime.timedelta(days=2)), msg()
        await store.save([old, fresh])
        assert await ids_of(store) == [fresh.id]
    finally:
        await store.aclose()


async def test_no_ttl_keeps_old_messages(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"), ttl_days=0.0)
    try:
        old = msg(datetime.timedelta(days=400))
        await store.save([old])
        assert await ids_of(store) == [old.id]
    finally:
        await store.aclose()


async def test_saved_messages_survive_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    store = await SqliteStore.open(path)
    m = msg()
    await store.save([m])
    await store.aclose()
    store = await SqliteStore.open(path)
    try:
        assert await ids_of(store) == [m.id]
    finally:
        await store.aclose()


async def test_sqlite_errors_become_store_unavailable(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    await store.aclose()
    with pytest.raises(StoreUnavailable):
        await store.save([msg()])
    with pytest.raises(StoreUnavailable):
        await store.ping()


async def test_unopenable_file_is_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="cannot open"):
        await SqliteStore.open(str(tmp_path / "missing-dir" / "s.db"))


@asynccontextmanager
async def feeding_store_and_other_writer(
    tmp_path: Path,
) -> AsyncIterator[tuple[SqliteStore, SqliteStore, Callable[[int], Awaitable[list[str]]]]]:
    """A store whose feed runs, another writer on its file, and a function taking the ids
    of the next n messages the feed reports."""
    path = str(tmp_path / "s.db")
    store, other = await SqliteStore.open(path), await SqliteStore.open(path)
    send, receive = trio.open_memory_channel[FeedItem](100)

    async def reported(count: int) -> list[str]:
        ids = []
        while len(ids) < count:
            item = await receive.receive()
            assert isinstance(item, Message)
            ids.append(item.id)
        return ids

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_feed, send)
            yield store, other, reported
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
        await other.aclose()


async def test_feed_yields_its_own_saves_and_what_others_write_between_them_in_order(
    tmp_path: Path,
) -> None:
    async with feeding_store_and_other_writer(tmp_path) as (store, other, reported):
        own = [msg() for _ in range(4)]
        theirs = [msg() for _ in range(3)]
        await store.save(own[:1])
        await other.save(theirs[:1])
        await store.save(own[1:3])  # one transaction of two rows
        await other.save(theirs[1:2])
        await store.save(own[3:])
        await other.save(theirs[2:])
        committed = [own[0], theirs[0], *own[1:3], theirs[1], own[3], theirs[2]]
        assert await reported(len(committed)) == [m.id for m in committed]


@pytest.mark.time_limit(60)
async def test_feed_reads_past_its_own_saves_in_one_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other writers' rows between many of this store's own are read in one poll, not one
    gap per poll (20 gaps would take 20 s here)."""
    monkeypatch.setattr(sqlite, "FEED_INTERVAL", 1.0)
    committed = []
    async with feeding_store_and_other_writer(tmp_path) as (store, other, reported):
        for _ in range(20):
            committed += [msg(), msg()]
            await store.save(committed[-2:-1])
            await other.save(committed[-1:])
        with trio.fail_after(5):
            assert await reported(len(committed)) == [m.id for m in committed]


# -- the log (docs/delivery.md); into the conformance suite once MongoDB has it too ------


def to(user: str) -> Message:
    return Message(new_id(), "web", user, {"t": 1})


async def test_each_users_messages_are_numbered_in_commit_order_by_every_writer(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.db")
    store, other = await SqliteStore.open(path), await SqliteStore.open(path)
    try:
        a = [to("alice") for _ in range(5)]
        b = to("bob")
        await store.save(a[:2])
        await other.save([a[2], b])
        await store.save([a[3]])
        await store.save([a[0]])  # stored already: no new number
        await other.save([a[4]])
        head = await store.head("web", "alice")
        assert head is not None
        assert head.seq == 5
        got = await store.logged("web", "alice", Position(head.epoch, 0), through=5, limit=10)
        assert [(m.id, m.epoch, m.seq) for m in got] == [
            (m.id, head.epoch, n) for n, m in enumerate(a, 1)
        ]
        bob = await other.head("web", "bob")
        assert bob is not None
        assert bob.seq == 1
        assert await store.position_of("web", "alice", a[3].id) == Position(head.epoch, 4)
        assert await store.position_of("web", "bob", a[3].id) is None  # not bob's
        assert await store.head("web", "nobody") is None
        # Ranges: after, through, limit; another epoch has nothing.
        page = await store.logged("web", "alice", Position(head.epoch, 1), through=4, limit=2)
        assert [m.seq for m in page] == [2, 3]
        assert (
            await store.logged("web", "alice", Position(head.epoch + 1, 0), through=5, limit=9)
            == []
        )
    finally:
        await store.aclose()
        await other.aclose()


async def test_a_log_whose_messages_all_expired_starts_in_a_new_epoch(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"), max_count=2)
    try:
        await store.save([to("quiet")])
        first = await store.head("web", "quiet")
        await store.save([to("busy"), to("busy")])  # the quiet user's only row goes
        assert await store.head("web", "quiet") is None
        await store.save([to("quiet")])
        again = await store.head("web", "quiet")
        assert first is not None
        assert again is not None
        assert again.seq == 1
        assert again.epoch != first.epoch
    finally:
        await store.aclose()


async def test_selection_and_acknowledgement_by_position(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    try:
        a = [to("alice") for _ in range(5)]
        await store.save(a)
        head = await store.head("web", "alice")
        assert head is not None
        start = Position(head.epoch, 0)
        await store.mark_sent([a[1].id, a[2].id])
        assert await store.acknowledge_through("web", "alice", Position(head.epoch, 2)) == 2
        assert await store.acknowledge_through("web", "alice", Position(head.epoch + 1, 5)) == 0
        unsent = await store.logged(
            "web", "alice", start, through=4, limit=9, replay=Replay(sent=False)
        )
        assert [m.seq for m in unsent] == [4]  # 3 SENT, 5 past `through`
        undelivered = await store.logged(
            "web", "alice", start, through=5, limit=9, replay=Replay(sent=True)
        )
        assert [m.seq for m in undelivered] == [3, 4, 5]
        page = await store.logged(
            "web", "alice", Position(head.epoch, 3), through=5, limit=1, replay=Replay(sent=True)
        )
        assert [m.seq for m in page] == [4]
    finally:
        await store.aclose()


async def test_a_file_of_an_earlier_version_gets_its_logs_in_commit_order(
    tmp_path: Path,
) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,"
        " connector_id TEXT NOT NULL, recipient_id TEXT NOT NULL, response TEXT NOT NULL,"
        " state INTEGER NOT NULL DEFAULT 0, enqueued_at REAL NOT NULL);"
    )
    ids = {"alice": ["c0", "a0", "b0"], "bob": ["z9"]}
    rows = [("c0", "alice"), ("z9", "bob"), ("a0", "alice"), ("b0", "alice")]
    old.executemany(
        "INSERT INTO messages (id, connector_id, recipient_id, response, enqueued_at)"
        " VALUES (?, 'web', ?, '{}', 0)",
        rows,
    )
    old.commit()
    old.close()
    store = await SqliteStore.open(str(path))
    try:
        for user, expected in ids.items():
            head = await store.head("web", user)
            assert head is not None
            got = await store.logged("web", user, Position(head.epoch, 0), through=9, limit=9)
            assert [(m.id, m.seq) for m in got] == [(i, n) for n, i in enumerate(expected, 1)]
        await store.save([fresh := to("alice")])
        position = await store.position_of("web", "alice", fresh.id)
        assert position is not None
        assert position.seq == 4
    finally:
        await store.aclose()


async def test_the_feed_reports_own_commits_while_a_wal_checkpoint_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stream is fed from the feed, this store's own sends included: a checkpoint,
    which can take a few hundred ms, must not hold them back."""
    checkpointing = trio.Event()

    async def slow_checkpoint(connection: object) -> None:
        checkpointing.set()
        await trio.sleep(30)

    monkeypatch.setattr(sqlite, "CHECKPOINT_INTERVAL", 0.01)
    monkeypatch.setattr(sqlite, "_checkpoint", slow_checkpoint)
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    try:
        send, receive = trio.open_memory_channel[FeedItem](10)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_feed, send)
            await checkpointing.wait()
            m = msg()
            await store.save([m])
            with trio.fail_after(sqlite.FEED_INTERVAL / 2):  # before any poll
                item = await receive.receive()
            assert isinstance(item, Message)
            assert item.id == m.id
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
