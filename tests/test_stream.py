"""The per-connection stream logic with a memory sink and a real SQLite store: no sockets."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from sidecar.hub import CloseReason, Hub
from sidecar.protocol import sse
from sidecar.protocol.delivery import Replay
from sidecar.protocol.message import Message, State, new_id
from sidecar.store.base import StoreUnavailable
from sidecar.store.sqlite import SqliteStore
from sidecar.stream import ClientGone, SentMarker, StreamOptions, serve_stream

KEY = ("web", "alice")


class MemorySink:
    """Collects what the stream writes; tests wait for messages through `wait_for`."""

    def __init__(self) -> None:
        self.parser = sse.Parser()
        self.events: list[sse.Event] = []
        self.changed = trio.Event()
        self.gone = False

    async def send(self, data: bytes) -> None:
        if self.gone:
            raise ClientGone
        self.events.extend(self.parser.feed(data))
        self.changed.set()
        self.changed = trio.Event()

    @property
    def message_ids(self) -> list[str]:
        return [e.id for e in self.events if e.event == "message" and e.id is not None]

    async def wait_for(self, count: int) -> list[str]:
        while len(self.message_ids) < count:
            await self.changed.wait()
        return self.message_ids


class HookedStore(SqliteStore):
    """A real SQLite store whose replay query can be made to fail or to race live traffic."""

    on_pending: Any = None
    failures = 0

    async def pending(
        self, connector_id: str, recipient_id: str, replay: Replay, *, after: str | None, limit: int
    ) -> list[Message]:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("injected")
        page = await super().pending(connector_id, recipient_id, replay, after=after, limit=limit)
        if self.on_pending is not None:
            hook, self.on_pending = self.on_pending, None
            await hook(page)
        return page


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[HookedStore]:
    opened = await SqliteStore.open(str(tmp_path / "s.db"))
    opened.__class__ = HookedStore
    try:
        yield opened  # type: ignore[misc]
    finally:
        await opened.aclose()


def message(n: int) -> Message:
    return Message(new_id(), *KEY, {"n": n})


async def save_all(store: SqliteStore, messages: Sequence[Message]) -> None:
    await store.save(list(messages))


def options(**overrides: Any) -> StreamOptions:
    return StreamOptions(
        **({"keepalive": 30.0, "replay_sent": False, "replay_page": 2} | overrides)
    )


@dataclasses.dataclass
class Running:
    hub: Hub
    sink: MemorySink
    done: trio.Event


@asynccontextmanager
async def streaming(
    store: HookedStore, hub: Hub | None = None, **opts: Any
) -> AsyncIterator[Running]:
    """One stream for KEY (no Last-Event-ID) served into a MemorySink, with its SentMarker,
    both cancelled on exit; `done` is set when the stream returns by itself."""
    running = Running(hub or Hub(64), MemorySink(), trio.Event())
    marker = SentMarker(store)

    async def serve() -> None:
        await serve_stream(
            running.sink, hub=running.hub, store=store, marker=marker, key=KEY,
            last_event_id=None, options=options(**opts),
        )  # fmt: skip
        running.done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(marker.run)
        nursery.start_soon(serve)
        yield running
        nursery.cancel_scope.cancel()


async def test_message_arriving_during_replay_is_written_once_in_order(store: HookedStore) -> None:
    hub = Hub(64)
    stored = [message(n) for n in range(5)]
    await save_all(store, stored)
    live_new = message(5)

    async def race(page: list[Message]) -> None:
        # While the replay's first page is being read: one message the replay will also
        # find (stored[3], on a later page), one only live.
        await store.save([live_new])
        hub.dispatch(stored[3])
        hub.dispatch(live_new)

    store.on_pending = race
    async with streaming(store, hub) as running:
        ids = await running.sink.wait_for(6)
        await trio.testing.wait_all_tasks_blocked()
        events = running.sink.events
        assert running.sink.message_ids == [m.id for m in [*stored, live_new]]
        assert [json.loads(e.data)["n"] for e in events if e.event == "message"] == list(range(6))
        assert ids == sorted(ids)


async def test_live_message_the_replay_leaves_out_still_comes_before_later_ids(
    store: HookedStore,
) -> None:
    """Another tab's Last-Event-ID acknowledged n=0 (DELIVERED: no replay brings it), while
    it waits live in this stream's buffer; the replay finds n=1. n=0 goes out first."""
    hub = Hub(64)
    first, second = message(0), message(1)
    await save_all(store, [first, second])
    await store.mark_sent([first.id])
    await store.ack_through(*KEY, first.id)

    async def dispatch_the_first(page: list[Message]) -> None:
        assert [m.id for m in page] == [second.id]
        assert hub.dispatch(first) == 1

    store.on_pending = dispatch_the_first
    async with streaming(store, hub) as running:
        assert await running.sink.wait_for(2) == [first.id, second.id]


async def test_first_frame_is_a_ping_and_replay_precedes_live(store: HookedStore) -> None:
    stored = [message(n) for n in range(3)]
    await save_all(store, stored)
    async with streaming(store) as running:
        await running.sink.wait_for(3)
        fresh = message(3)
        await store.save([fresh])
        assert running.hub.dispatch(fresh) == 1
        await running.sink.wait_for(4)
        assert running.sink.events[0] == sse.Event(event="ping", data="1")
        assert running.sink.message_ids == [m.id for m in [*stored, fresh]]
        # Written messages are marked SENT (in a batch, after the write)
        with trio.fail_after(5):
            while (await store.get(fresh.id)).state != State.SENT:  # type: ignore[union-attr]
                await trio.sleep(0.01)


async def test_store_outage_during_replay_keeps_pinging_then_replays(store: HookedStore) -> None:
    stored = [message(n) for n in range(3)]
    await save_all(store, stored)
    store.failures = 2
    async with streaming(store, keepalive=0.2) as running:
        assert await running.sink.wait_for(3) == [m.id for m in stored]
        # pings kept the stream alive through the back-off (0.5 s then 1 s)
        assert sum(e.event == "ping" for e in running.sink.events) >= 3


async def test_client_gone_ends_the_stream_and_unregisters(store: HookedStore) -> None:
    async with streaming(store) as running:
        await trio.testing.wait_all_tasks_blocked()
        assert running.hub.stream_count(KEY) == 1
        running.sink.gone = True
        running.hub.dispatch(message(0))
        await running.done.wait()
        assert running.hub.stream_count(KEY) == 0


async def test_hub_close_ends_the_stream(store: HookedStore) -> None:
    async with streaming(store) as running:
        await trio.testing.wait_all_tasks_blocked()
        running.hub.close_all(CloseReason.SHUTDOWN)
        await running.done.wait()
        assert running.hub.stream_count() == 0


async def test_a_stream_given_its_scope_ends_normally_when_the_caller_cancels_it(
    store: HookedStore,
) -> None:
    hub, sink, scope = Hub(64), MemorySink(), trio.CancelScope()
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def serve() -> None:
            await serve_stream(
                sink, hub=hub, store=store, marker=SentMarker(store), key=KEY,
                last_event_id=None, options=options(), cancel_scope=scope,
            )  # fmt: skip
            done.set()

        nursery.start_soon(serve)
        await trio.testing.wait_all_tasks_blocked()
        assert hub.stream_count(KEY) == 1
        scope.cancel()  # as the stream route does when its client goes
        await done.wait()
        assert hub.stream_count(KEY) == 0


async def test_sent_marker_flushes_every_queued_mark_on_close(store: HookedStore) -> None:
    messages = [message(n) for n in range(1200)]
    await save_all(store, messages)
    marker = SentMarker(store, capacity=2000, batch=500)
    for m in messages:
        marker.mark(m.id)
    marker.close()
    marker.mark(new_id())  # after close: dropped, not an error
    await marker.run()
    assert marker.flushed.is_set()
    assert marker.dropped == 1
    pending = await store.pending(*KEY, Replay(sent=False), after=None, limit=10)
    assert pending == []


async def test_sent_marker_drops_marks_when_full(store: HookedStore) -> None:
    marker = SentMarker(store, capacity=2)
    for _ in range(5):
        marker.mark(new_id())
    assert marker.dropped == 3


async def test_history_lost_makes_open_streams_catch_up_from_the_store(
    store: HookedStore,
) -> None:
    first = message(0)
    await store.save([first])
    async with streaming(store) as running:
        await running.sink.wait_for(1)
        # Saved while the feed was not looking: nobody dispatched it.
        missed = message(1)
        await store.save([missed])
        await trio.testing.wait_all_tasks_blocked()
        assert running.sink.message_ids == [first.id]
        running.hub.history_lost()
        assert await running.sink.wait_for(2) == [first.id, missed.id]


def slow_first_save(store: HookedStore) -> tuple[trio.Event, trio.Event]:
    """Make the store's next save wait: the first event is set when it starts, and it goes
    on once the second one is set. Later saves run at once."""
    started, release = trio.Event(), trio.Event()
    real_save = store.save

    async def save(messages: Sequence[Message]) -> None:
        if not started.is_set():
            started.set()
            await release.wait()
        await real_save(messages)

    store.save = save  # type: ignore[method-assign]
    return started, release


async def test_concurrent_sends_are_dispatched_in_id_order(store: HookedStore) -> None:
    from sidecar.http.send import store_and_dispatch

    hub = Hub(64)
    first_saving, release_first = slow_first_save(store)
    with hub.subscribe(KEY) as sub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store_and_dispatch, store, hub, [(*KEY, {"n": 0})])
            await first_saving.wait()
            nursery.start_soon(store_and_dispatch, store, hub, [(*KEY, {"n": 1})])
            while not await store.pending(*KEY, Replay(sent=False), after=None, limit=5):
                await trio.sleep(0.01)
            # The second send is saved, but not dispatched ahead of the earlier id.
            with pytest.raises(trio.WouldBlock):
                sub.receive.receive_nowait()
            release_first.set()
        received = [sub.receive.receive_nowait(), sub.receive.receive_nowait()]
    assert [m.response["n"] for m in received if isinstance(m, Message)] == [0, 1]


async def test_replay_leaves_a_send_in_flight_to_come_live_in_id_order(
    store: HookedStore,
) -> None:
    from sidecar.http.send import store_and_dispatch

    hub = Hub(64)
    first_saving, release_first = slow_first_save(store)
    async with trio.open_nursery() as senders:
        senders.start_soon(store_and_dispatch, store, hub, [(*KEY, {"n": 0})])
        await first_saving.wait()
        senders.start_soon(store_and_dispatch, store, hub, [(*KEY, {"n": 1})])
        while not await store.pending(*KEY, Replay(sent=False), after=None, limit=5):
            await trio.sleep(0.01)
        # A stream opens now: its replay finds n=1 committed, n=0 still being saved.
        async with streaming(store, hub) as running:
            await trio.testing.wait_all_tasks_blocked()
            assert running.sink.message_ids == []
            release_first.set()
            await running.sink.wait_for(2)
            events = [e for e in running.sink.events if e.event == "message"]
            assert [json.loads(e.data)["n"] for e in events] == [0, 1]
    assert not hub.in_flight


async def test_replay_leaves_out_sends_dispatched_while_its_query_ran(
    store: HookedStore,
) -> None:
    """The replay's query finds n=1 committed and n=0 not yet; both are dispatched before
    the query returns. Checking only what is in flight when it returns, the replay would
    write n=1, then n=0 would come live after it."""
    from sidecar.http.send import store_and_dispatch

    hub = Hub(64)
    first_saving, release_first = slow_first_save(store)

    async def dispatch_both_before_returning(page: list[Message]) -> None:
        assert [m.response["n"] for m in page] == [1]
        release_first.set()
        while not all(done.is_set() for done in sends_done):
            await trio.sleep(0.01)

    sends_done = [trio.Event(), trio.Event()]

    async def send(n: int) -> None:
        await store_and_dispatch(store, hub, [(*KEY, {"n": n})])
        sends_done[n].set()

    async with trio.open_nursery() as senders:
        senders.start_soon(send, 0)
        await first_saving.wait()
        senders.start_soon(send, 1)
        while not await store.pending(*KEY, Replay(sent=False), after=None, limit=5):
            await trio.sleep(0.01)
        store.on_pending = dispatch_both_before_returning
        async with streaming(store, hub) as running:
            await running.sink.wait_for(2)
            await trio.testing.wait_all_tasks_blocked()
            events = [e for e in running.sink.events if e.event == "message"]
            assert [json.loads(e.data)["n"] for e in events] == [0, 1]
