"""What only the SQLite store does: retention, durability across reopen, error translation."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from sidecar.protocol.delivery import Replay
from sidecar.protocol.message import Message, new_id
from sidecar.store import sqlite
from sidecar.store.base import FeedItem, StoreUnavailable
from sidecar.store.sqlite import SqliteStore


def msg(age: datetime.timedelta = datetime.timedelta(0)) -> Message:
    enqueued_at = datetime.datetime.now(datetime.UTC) - age
    return Message(new_id(), "web", "alice", {"t": 1}, enqueued_at=enqueued_at)


async def ids_of(store: SqliteStore) -> list[str]:
    return [
        m.id for m in await store.pending("web", "alice", Replay(sent=True), after=None, limit=100)
    ]


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


async def test_feed_skips_its_own_saves_but_not_what_others_write_between_them(
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
        # Had the feed read any of this store's rows, they would come before the last.
        assert await reported(len(theirs)) == [m.id for m in theirs]


@pytest.mark.time_limit(60)
async def test_feed_reads_past_its_own_saves_in_one_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other writers' rows between many of this store's own are read in one poll, not one
    gap per poll (20 gaps would take 20 s here)."""
    monkeypatch.setattr(sqlite, "FEED_INTERVAL", 1.0)
    theirs = [msg() for _ in range(20)]
    async with feeding_store_and_other_writer(tmp_path) as (store, other, reported):
        for message in theirs:
            await store.save([msg()])
            await other.save([message])
        with trio.fail_after(5):
            assert await reported(len(theirs)) == [m.id for m in theirs]
