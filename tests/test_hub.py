"""The hub, without sockets: fan-out per recipient, once per id, and cutting off slow streams."""

from __future__ import annotations

import datetime
from contextlib import ExitStack

import pytest
import trio
import trio.testing

from sidecar.hub import CloseReason, Hub, Subscription
from sidecar.protocol.feed import FeedItem, HistoryLost
from sidecar.protocol.message import Message

A = ("web", "alice")
B = ("web", "bob")
OTHER = ("other", "alice")


T0 = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)


def msg(n: int, key: tuple[str, str] = A) -> Message:
    return Message(f"{n:024x}", key[0], key[1], {"n": n}, enqueued_at=T0)


def drain(sub: Subscription) -> list[FeedItem]:
    items = []
    while True:
        try:
            items.append(sub.receive.receive_nowait())
        except trio.WouldBlock:
            return items


async def test_dispatch_reaches_every_stream_of_the_key_and_no_other() -> None:
    hub = Hub(4)
    with ExitStack() as stack:
        a1, a2, b, other = (stack.enter_context(hub.subscribe(k)) for k in (A, A, B, OTHER))
        assert hub.stream_count(A) == 2
        assert hub.stream_count(B) == 1
        assert hub.stream_count(("web", "nobody")) == 0
        assert hub.stream_count() == 4

        m1, m2 = msg(1, A), msg(2, B)
        assert hub.dispatch(m1) == 2
        assert hub.dispatch(m2) == 1
        assert drain(a1) == [m1]
        assert drain(a2) == [m1]
        assert drain(b) == [m2]
        assert drain(other) == []
        assert hub.dispatch(msg(3, ("web", "nobody"))) == 0
        assert hub.stats.dispatched == 3
        assert hub.stats.cut_off == 0


async def test_dispatch_keeps_order() -> None:
    hub = Hub(10)
    with hub.subscribe(A) as sub:
        messages = [msg(n) for n in range(10)]
        for m in messages:
            assert hub.dispatch(m) == 1
        assert drain(sub) == messages


async def test_a_repeat_is_offered_again_streams_drop_it_by_seq() -> None:
    hub = Hub(4)
    with hub.subscribe(A) as sub:
        m = msg(1)
        assert hub.dispatch(m) == 1
        assert hub.dispatch(m) == 1
        assert drain(sub) == [m, m]


async def test_a_message_dispatched_before_anyone_listened_reaches_nobody() -> None:
    hub = Hub(4)
    assert hub.dispatch(msg(1)) == 0
    with hub.subscribe(A) as sub:
        assert drain(sub) == []


async def test_full_buffer_cuts_that_stream_only() -> None:
    hub = Hub(2)
    with hub.subscribe(A) as slow, hub.subscribe(A) as fast, hub.subscribe(B) as bystander:
        received = []
        for n in (1, 2):
            assert hub.dispatch(msg(n)) == 2
            received += drain(fast)
        assert not slow.cancel_scope.cancel_called

        assert hub.dispatch(msg(3)) == 1  # slow's buffer was full
        assert slow.cancel_scope.cancel_called
        assert slow.closed_by is CloseReason.SLOW
        assert hub.stream_count(A) == 1
        assert hub.stream_count() == 2
        assert hub.stats.cut_off == 1
        assert not fast.cancel_scope.cancel_called
        assert fast.closed_by is None
        assert bystander.closed_by is None

        # The cut stream is gone: no more offers, no more cut-offs counted for it.
        assert hub.dispatch(msg(4)) == 1
        assert hub.stats.cut_off == 1
        received += drain(fast)
        assert received == [msg(n) for n in (1, 2, 3, 4)]
        assert drain(slow) == [msg(1), msg(2)]
        assert hub.dispatch(msg(5, B)) == 1
    assert hub.stream_count() == 0


async def test_cut_off_cancels_the_stream_task() -> None:
    hub = Hub(1)
    done: list[str] = []

    async def stream(task_status: trio.TaskStatus[Subscription]) -> None:
        with hub.subscribe(A) as sub, sub.cancel_scope:
            task_status.started(sub)
            await trio.sleep_forever()  # never reads: a stuck client
        done.append("left")

    async with trio.open_nursery() as nursery:
        sub = await nursery.start(stream)
        assert hub.dispatch(msg(1)) == 1
        assert hub.dispatch(msg(2)) == 0
        assert hub.stream_count(A) == 0  # at once, before the task even runs
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["left"]
    assert sub.closed_by is CloseReason.SLOW


async def test_close_all() -> None:
    hub = Hub(4)
    with ExitStack() as stack:
        subs = [stack.enter_context(hub.subscribe(k)) for k in (A, A, B, OTHER)]
        hub.close_all(CloseReason.SHUTDOWN)
        assert hub.stream_count() == 0
        for sub in subs:
            assert sub.cancel_scope.cancel_called
            assert sub.closed_by is CloseReason.SHUTDOWN
        assert hub.dispatch(msg(1)) == 0
        hub.close_all(CloseReason.SHUTDOWN)  # nothing left, no error


async def test_close_keeps_the_first_reason() -> None:
    hub = Hub(4)
    with hub.subscribe(A) as sub:
        hub.close(sub, CloseReason.CLIENT)
        hub.close(sub, CloseReason.SHUTDOWN)
        assert sub.closed_by is CloseReason.CLIENT
        assert sub.cancel_scope.cancel_called
        assert hub.stream_count() == 0


async def test_history_lost_reaches_every_stream() -> None:
    hub = Hub(4)
    with ExitStack() as stack:
        subs = [stack.enter_context(hub.subscribe(k)) for k in (A, A, B, OTHER)]
        hub.history_lost()
        for sub in subs:
            items = drain(sub)
            assert len(items) == 1
            assert isinstance(items[0], HistoryLost)
        assert hub.stats.dispatched == 0


async def test_history_lost_cuts_a_full_stream() -> None:
    hub = Hub(1)
    with hub.subscribe(A) as full, hub.subscribe(B) as idle:
        assert hub.dispatch(msg(1)) == 1
        hub.history_lost()
        assert full.closed_by is CloseReason.SLOW
        assert hub.stats.cut_off == 1
        assert [type(i) for i in drain(idle)] == [HistoryLost]
        assert hub.stream_count() == 1


async def test_leaving_the_block_unregisters() -> None:
    hub = Hub(4)
    with hub.subscribe(A) as sub:
        assert hub.stream_count(A) == 1
    assert hub.stream_count(A) == 0
    assert hub.stream_count() == 0
    assert hub.dispatch(msg(1)) == 0
    assert sub.closed_by is None
    with pytest.raises(trio.BrokenResourceError):
        sub.send.send_nowait(msg(2))


async def test_leaving_the_block_by_an_error_unregisters() -> None:
    hub = Hub(4)
    with pytest.raises(RuntimeError), hub.subscribe(A):
        raise RuntimeError
    assert hub.stream_count() == 0


async def test_leaving_after_being_cut_off() -> None:
    hub = Hub(1)
    with hub.subscribe(A) as cut, hub.subscribe(A) as other:
        hub.dispatch(msg(1))
        drain(other)
        hub.dispatch(msg(2))
        assert cut.closed_by is CloseReason.SLOW
    assert hub.stream_count() == 0


async def test_one_leaving_keeps_the_others() -> None:
    hub = Hub(4)
    with hub.subscribe(A) as stays:
        with hub.subscribe(A):
            assert hub.stream_count(A) == 2
        assert hub.stream_count(A) == 1
        assert hub.dispatch(msg(1)) == 1
        assert drain(stays) == [msg(1)]
