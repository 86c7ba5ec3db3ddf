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

from sidecar.app import _pump_feed
from sidecar.hub import CloseReason, Hub
from sidecar.protocol import sse
from sidecar.protocol.delivery import SEEN_NOTHING, Position, Replay
from sidecar.protocol.message import IdGenerator, Message, State, new_id
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
    """A real SQLite store whose log reads can be made to fail or to race live traffic."""

    on_logged: Any = None
    failures = 0

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
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("injected")
        page = await super().logged(
            connector_id, recipient_id, after, through=through, limit=limit, replay=replay
        )
        if self.on_logged is not None:
            hook, self.on_logged = self.on_logged, None
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
    store: HookedStore,
    hub: Hub | None = None,
    *,
    last_event_id: str | None = None,
    browser_client: bool = False,
    **opts: Any,
) -> AsyncIterator[Running]:
    """One stream for KEY served into a MemorySink, with its SentMarker, both cancelled on
    exit; `done` is set when the stream returns by itself. Nothing feeds the hub: tests
    dispatch what the feed would (`feeding` runs the real one)."""
    running = Running(hub or Hub(64), MemorySink(), trio.Event())
    marker = SentMarker(store)

    async def serve() -> None:
        await serve_stream(
            running.sink, hub=running.hub, store=store, marker=marker, key=KEY,
            last_event_id=last_event_id, browser_client=browser_client, options=options(**opts),
        )  # fmt: skip
        running.done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(marker.run)
        nursery.start_soon(serve)
        yield running
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def feeding(store: SqliteStore, hub: Hub) -> AsyncIterator[None]:
    """The store's feed pumped into the hub, as an instance runs it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(_pump_feed, store, hub)
        yield
        nursery.cancel_scope.cancel()


async def logged(store: SqliteStore, messages: Sequence[Message]) -> list[Message]:
    """`messages` saved, as the store logged them (with their places)."""
    await store.save(list(messages))
    head = await store.head(*KEY)
    assert head is not None
    found = await store.logged(*KEY, Position(head.epoch, 0), through=head.seq, limit=1000)
    by_id = {m.id: m for m in found}
    return [by_id[m.id] for m in messages]


def numbers(sink: MemorySink) -> list[int]:
    return [json.loads(e.data)["n"] for e in sink.events if e.event == "message"]


async def test_first_frame_is_a_ping_and_replay_precedes_live(store: HookedStore) -> None:
    hub = Hub(64)
    stored = [message(n) for n in range(3)]
    await save_all(store, stored)
    async with feeding(store, hub), streaming(store, hub) as running:
        await running.sink.wait_for(3)
        fresh = message(3)
        await store.save([fresh])
        await running.sink.wait_for(4)
        assert running.sink.events[0] == sse.Event(event="ping", data="1")
        assert running.sink.message_ids == [m.id for m in [*stored, fresh]]
        # Written messages are marked SENT (in a batch, after the write)
        with trio.fail_after(5):
            while (await store.get(fresh.id)).state != State.SENT:  # type: ignore[union-attr]
                await trio.sleep(0.01)


async def test_a_message_logged_during_the_replay_is_written_once_in_log_order(
    store: HookedStore,
) -> None:
    hub = Hub(64)
    stored = await logged(store, [message(n) for n in range(5)])
    live_new = message(5)

    async def race(page: list[Message]) -> None:
        # While the replay's first page is read: a repeat of one the replay will find (on a
        # later page), and a new one, reported live.
        (fresh,) = await logged(store, [live_new])
        hub.dispatch(stored[3])
        hub.dispatch(fresh)

    store.on_logged = race
    async with streaming(store, hub, last_event_id=SEEN_NOTHING, browser_client=True) as running:
        await running.sink.wait_for(6)
        await trio.testing.wait_all_tasks_blocked()
        assert numbers(running.sink) == list(range(6))


async def test_a_late_report_of_what_the_tab_had_is_dropped(store: HookedStore) -> None:
    """Issue #13, case 2: a page showed m and reloads onto another instance, whose feed
    reports m's insert after the new stream has started from m's position."""
    hub = Hub(64)
    shown, later = await logged(store, [message(0), message(1)])
    async with streaming(store, hub, last_event_id=shown.id, browser_client=True) as running:
        await running.sink.wait_for(1)
        hub.dispatch(shown)  # late
        hub.dispatch(later)  # a repeat of what the replay wrote
        hub.dispatch(shown)
        await trio.testing.wait_all_tasks_blocked()
        assert numbers(running.sink) == [1]


async def test_a_gap_is_read_from_the_store_before_the_message_after_it(
    store: HookedStore,
) -> None:
    """Issue #13, case 3: turn 2 reaches this instance's feed before turn 1 (another
    instance's feed logged turn 1): the stream writes turn 1 first."""
    hub = Hub(64)
    async with streaming(store, hub) as running:
        await trio.testing.wait_all_tasks_blocked()
        first, second = await logged(store, [message(0), message(1)])
        hub.dispatch(second)
        await running.sink.wait_for(2)
        hub.dispatch(first)
        await trio.testing.wait_all_tasks_blocked()
        assert numbers(running.sink) == [0, 1]


async def test_a_report_from_a_log_that_has_ended_is_dropped(store: HookedStore) -> None:
    hub = Hub(64)
    (current,) = await logged(store, [message(0)])
    stale = dataclasses.replace(message(9), epoch=current.epoch + 1, seq=7)
    async with streaming(store, hub, last_event_id=current.id) as running:
        await trio.testing.wait_all_tasks_blocked()
        hub.dispatch(stale)  # another epoch, which the store's log is not in
        (fresh,) = await logged(store, [message(1)])
        hub.dispatch(fresh)
        await running.sink.wait_for(1)
        await trio.testing.wait_all_tasks_blocked()
        assert numbers(running.sink) == [1]


async def test_the_id_sent_back_acknowledges_its_log_up_to_it_and_no_further(
    store: HookedStore,
) -> None:
    """Issue #13, case 1: x was shown; y, sent after it through another instance, has an
    older id and was written (SENT) just as the connection died. The tab comes back with
    x: y is replayed, and not acknowledged."""
    later_clock = IdGenerator(clock=lambda: 2_000_000_000)
    earlier_clock = IdGenerator(clock=lambda: 1_000_000_000)
    x = Message(later_clock(), *KEY, {"n": 0})
    y = Message(earlier_clock(), *KEY, {"n": 1})
    assert y.id < x.id
    await logged(store, [x])
    await logged(store, [y])
    await store.mark_sent([x.id, y.id])
    async with streaming(store, last_event_id=x.id) as running:
        await running.sink.wait_for(1)
        assert numbers(running.sink) == [1]
        assert (await store.get(x.id)).state == State.DELIVERED  # type: ignore[union-attr]
        assert (await store.get(y.id)).state == State.SENT  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("browser_client", "replayed"),
    [(False, [0]), (True, [0, 1])],
    ids=["header: Tock's rule", "browser client: seen nothing"],
)
async def test_an_id_the_store_does_not_know(
    store: HookedStore, browser_client: bool, replayed: list[int]
) -> None:
    _, sent, delivered = await logged(store, [message(0), message(1), message(2)])
    await store.mark_sent([sent.id])
    await store.ack(*KEY, [delivered.id])
    async with streaming(store, last_event_id=new_id(), browser_client=browser_client) as running:
        await running.sink.wait_for(len(replayed))
        await trio.testing.wait_all_tasks_blocked()
        assert numbers(running.sink) == replayed


async def test_a_stream_of_a_user_with_no_log_takes_the_first_message_of_a_new_one(
    store: HookedStore,
) -> None:
    hub = Hub(64)
    async with feeding(store, hub), streaming(store, hub) as running:
        await trio.testing.wait_all_tasks_blocked()
        await store.save([message(0)])
        await store.save([message(1)])
        await running.sink.wait_for(2)
        assert numbers(running.sink) == [0, 1]


async def test_store_outage_during_replay_keeps_pinging_then_replays(store: HookedStore) -> None:
    stored = [message(n) for n in range(3)]
    await save_all(store, stored)
    store.failures = 2
    async with streaming(store, keepalive=0.2) as running:
        assert await running.sink.wait_for(3) == [m.id for m in stored]
        assert store.failures == 0
        # pings kept the stream alive through the back-off (0.5 s then 1 s)
        assert sum(e.event == "ping" for e in running.sink.events) >= 3


async def test_client_gone_ends_the_stream_and_unregisters(store: HookedStore) -> None:
    async with streaming(store) as running:
        await trio.testing.wait_all_tasks_blocked()
        assert running.hub.stream_count(KEY) == 1
        running.sink.gone = True
        running.hub.dispatch((await logged(store, [message(0)]))[0])
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
    head = await store.head(*KEY)
    assert head is not None
    unsent = await store.logged(
        *KEY, Position(head.epoch, 0), through=head.seq, limit=10, replay=Replay(sent=False)
    )
    assert unsent == []


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
