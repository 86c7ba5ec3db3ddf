"""Who is listening on this instance: recipient -> open streams, each with a bounded buffer.

`Hub.dispatch` never waits: it puts a message in each of the recipient's stream buffers
and, when a buffer is full, cuts that stream off (the stream's cancel scope is cancelled
and it leaves the hub at once). The cut-off stream's messages stay in the store and are
replayed when the browser reconnects, so a slow consumer costs a reconnect, never memory.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import itertools
import logging
import math
from collections import deque
from types import TracebackType
from typing import Any

import trio
import trio.lowlevel

from sidecar.metrics import Metrics
from sidecar.protocol.feed import FeedItem, HistoryLost
from sidecar.protocol.message import Message

log = logging.getLogger("sidecar.hub")

Key = tuple[str, str]  # (connector id, recipient id)


class CloseReason(enum.Enum):
    CLIENT = "client"  # the browser went away
    SLOW = "slow"  # its buffer filled up
    SHUTDOWN = "shutdown"  # the instance is draining
    REPLACED = "replaced"  # its user opened more streams than allowed; the oldest goes


class Mailbox:
    """A stream's bounded buffer: what a trio memory channel of `capacity` does for one
    sender that never waits (the hub) and one receiver (the stream), in a few hundred
    bytes less per open stream. The same object is both ends: `send_nowait` raises
    `trio.WouldBlock` when full and `trio.BrokenResourceError` once `close`d;
    `receive_nowait` raises `trio.WouldBlock` when empty; `receive` waits, and is a trio
    checkpoint as a channel's is."""

    __slots__ = ("_capacity", "_closed", "_items", "_waiter", "ping_at", "ping_due")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: deque[FeedItem] = deque()
        self._waiter: trio.lowlevel.Task | None = None
        self._closed = False
        # The hub's pinger (`Hub.run_pings`) sets `ping_due` at `ping_at` and wakes `wait`.
        self.ping_at = math.inf
        self.ping_due = False

    def send_nowait(self, item: FeedItem) -> None:
        if self._closed:
            raise trio.BrokenResourceError("the stream has closed its buffer")
        if len(self._items) >= self._capacity:
            raise trio.WouldBlock
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    def receive_nowait(self) -> FeedItem:
        if self._closed:
            raise trio.ClosedResourceError
        if not self._items:
            raise trio.WouldBlock
        return self._items.popleft()

    async def receive(self) -> FeedItem:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._items:
            if self._waiter is not None:
                raise trio.BusyResourceError("another task is already receiving")
            if self._closed:
                raise trio.ClosedResourceError
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
            if self._closed:
                raise trio.ClosedResourceError
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return self._items.popleft()

    async def wait(self) -> None:
        """Wait until there is an item to take or a ping is due (a trio checkpoint)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._items or self.ping_due or self._closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already receiving")
        self._waiter = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _ping_now(self) -> None:
        self.ping_due = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def close(self) -> None:
        self._closed = True
        self._items.clear()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    def __len__(self) -> int:
        return len(self._items)


@dataclasses.dataclass(eq=False, slots=True)
class Subscription:
    """One open stream as the hub sees it. The stream reads `receive`; the hub puts items
    in `send` (the same `Mailbox`) and cancels `cancel_scope` to close the stream."""

    key: Key
    send: Mailbox
    receive: Mailbox
    cancel_scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    closed_by: CloseReason | None = None


@dataclasses.dataclass
class HubStats:
    dispatched: int = 0
    cut_off: int = 0


class Hub:
    def __init__(
        self,
        buffer_size: int,
        *,
        max_per_key: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._buffer_size = buffer_size
        self._max_per_key = max_per_key
        # Per key, the streams in the order they opened (a dict keeps it; values unused).
        self._streams: dict[Key, dict[Subscription, None]] = {}
        self._count = 0
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.streams_open.set_function(self.stream_count)
        self.stats = HubStats()
        # Keepalive pings of every stream, while `run_pings` runs: (when, order, mailbox).
        self._pings: list[tuple[float, int, Mailbox]] = []
        self._ping_order = itertools.count()
        self._pinger: trio.CancelScope | None = None
        self.pinging = False

    # -- keepalive pings --------------------------------------------------------------------

    async def run_pings(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Wake each stream when its next ping is due (`schedule_ping`), so that a waiting
        stream needs no timeout of its own: one task for all of them instead of a cancel
        scope per stream per wait. Streams opened while this runs rely on it; without it
        (`pinging` False) a stream times its own waits."""
        self.pinging = True
        pings = self._pings
        try:
            task_status.started()
            while True:
                now = trio.current_time()
                while pings and pings[0][0] <= now:
                    at, _, mailbox = heapq.heappop(pings)
                    if mailbox.ping_at == at:  # else rescheduled since, or closed
                        mailbox._ping_now()
                with trio.CancelScope(deadline=pings[0][0] if pings else math.inf) as wakeup:
                    self._pinger = wakeup
                    await trio.sleep_forever()
        finally:
            self._pinger = None
            self.pinging = False
            for _, _, mailbox in pings:  # their streams time their own waits from now on
                mailbox.ping_at = math.inf
                mailbox._ping_now()
            pings.clear()

    def schedule_ping(self, mailbox: Mailbox, at: float) -> None:
        """Wake `mailbox`'s stream at `at` for its next ping (replacing any earlier time).
        Once the pinger has stopped, `mailbox.ping_at` is left infinite instead."""
        if not self.pinging:
            mailbox.ping_at = math.inf
            return
        mailbox.ping_at = at
        heapq.heappush(self._pings, (at, next(self._ping_order), mailbox))
        pinger = self._pinger
        if pinger is not None and at < pinger.deadline:
            pinger.deadline = at

    def stream_count(self, key: Key | None = None) -> int:
        if key is not None:
            return len(self._streams.get(key, ()))
        return self._count

    def subscribe(self, key: Key, cancel_scope: trio.CancelScope | None = None) -> _Subscribed:
        """Register a stream for `key` for the duration of the `with` block. When `key`
        already has `max_per_key` streams, its oldest are closed (REPLACED) to make room.
        The hub closes the stream by cancelling `cancel_scope` (a new one when None)."""
        return _Subscribed(self, key, cancel_scope)

    def _open(self, key: Key, cancel_scope: trio.CancelScope | None) -> Subscription:
        mailbox = Mailbox(self._buffer_size)
        scope = cancel_scope if cancel_scope is not None else trio.CancelScope()
        sub = Subscription(key, mailbox, mailbox, scope)
        subs = self._streams.setdefault(key, {})
        if self._max_per_key is not None:
            while len(subs) >= self._max_per_key:
                log.info("oldest stream of %s/%s replaced: at most %d open", *key, len(subs))
                self.close(next(iter(subs)), CloseReason.REPLACED)
            subs = self._streams.setdefault(key, {})
        subs[sub] = None
        self._count += 1
        self.metrics.streams_opened.inc()
        return sub

    def _closed(self, sub: Subscription) -> None:
        self._remove(sub)
        sub.receive.close()
        sub.receive.ping_at = math.inf  # its queued ping, if any, is dropped when due
        reason = sub.closed_by or CloseReason.CLIENT
        self.metrics.stream_closed(reason.value)

    def dispatch(self, message: Message) -> int:
        """Offer `message` to every open stream of its recipient; how many it was queued on.
        A message the feed reports twice is offered twice: each stream drops what it has
        written by its seq."""
        self.stats.dispatched += 1
        return sum(self._offer(sub, message) for sub in list(self._streams.get(message.key, ())))

    def history_lost(self) -> None:
        """Every open stream asks the store again for what it has not been sent."""
        for subs in list(self._streams.values()):
            for sub in list(subs):
                self._offer(sub, HistoryLost())

    def _offer(self, sub: Subscription, item: FeedItem) -> bool:
        try:
            sub.send.send_nowait(item)
        except trio.WouldBlock:
            log.warning("stream of %s/%s cut off: buffer full", *sub.key)
            self.stats.cut_off += 1
            self.close(sub, CloseReason.SLOW)
            return False
        return True

    def close(self, sub: Subscription, reason: CloseReason) -> None:
        """Close one stream: it leaves the hub now and its task is cancelled."""
        if sub.closed_by is None:
            sub.closed_by = reason
        self._remove(sub)
        sub.cancel_scope.cancel()

    def close_all(self, reason: CloseReason) -> None:
        for subs in list(self._streams.values()):
            for sub in list(subs):
                self.close(sub, reason)

    def _remove(self, sub: Subscription) -> None:
        subs = self._streams.get(sub.key)
        if subs is not None and sub in subs:
            del subs[sub]
            self._count -= 1
            if not subs:
                del self._streams[sub.key]


class _Subscribed:
    """`Hub.subscribe`'s context manager (a class: a generator-based one would keep a
    generator frame alive for every open stream)."""

    __slots__ = ("_cancel_scope", "_hub", "_key", "_sub")

    def __init__(self, hub: Hub, key: Key, cancel_scope: trio.CancelScope | None) -> None:
        self._hub = hub
        self._key = key
        self._cancel_scope = cancel_scope
        self._sub: Subscription | None = None

    def __enter__(self) -> Subscription:
        self._sub = self._hub._open(self._key, self._cancel_scope)
        self._cancel_scope = None
        return self._sub

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sub is not None:
            self._hub._closed(self._sub)
