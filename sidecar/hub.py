"""Who is listening on this instance: recipient -> open streams, each with a bounded buffer.

`Hub.dispatch` never waits: it puts a message in each of the recipient's stream buffers
and, when a buffer is full, cuts that stream off (the stream's cancel scope is cancelled
and it leaves the hub at once). The cut-off stream's messages stay in the store and are
replayed when the browser reconnects, so a slow consumer costs a reconnect, never memory.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from sidecar.metrics import Metrics
from sidecar.protocol.message import Message
from sidecar.protocol.replay import SeenWindow
from sidecar.protocol.sequencer import Sequencer
from sidecar.store.base import FeedItem, HistoryLost

log = logging.getLogger("sidecar.hub")

Key = tuple[str, str]  # (connector id, recipient id)


class CloseReason(enum.Enum):
    CLIENT = "client"  # the browser went away
    SLOW = "slow"  # its buffer filled up
    SHUTDOWN = "shutdown"  # the instance is draining
    REPLACED = "replaced"  # its user opened more streams than allowed; the oldest goes


@dataclasses.dataclass(eq=False)
class Subscription:
    """One open stream as the hub sees it. The stream reads `receive`; the hub cancels
    `cancel_scope` to close the stream."""

    key: Key
    send: trio.MemorySendChannel[FeedItem]
    receive: trio.MemoryReceiveChannel[FeedItem]
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
        dispatched_window: int = 65536,
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
        # Ids this instance already dispatched, so the store's feed, which also reports this
        # instance's own saves, does not dispatch them again.
        self._dispatched = SeenWindow(dispatched_window)
        # This instance's own sends are dispatched in id order (see http/send.py).
        self.sequencer: Sequencer[Callable[[], None]] = Sequencer()
        self.stats = HubStats()

    def stream_count(self, key: Key | None = None) -> int:
        if key is not None:
            return len(self._streams.get(key, ()))
        return self._count

    @contextmanager
    def subscribe(self, key: Key) -> Iterator[Subscription]:
        """Register a stream for `key` for the duration of the block. When `key` already
        has `max_per_key` streams, its oldest are closed (REPLACED) to make room."""
        send, receive = trio.open_memory_channel[FeedItem](self._buffer_size)
        sub = Subscription(key, send, receive)
        subs = self._streams.setdefault(key, {})
        if self._max_per_key is not None:
            while len(subs) >= self._max_per_key:
                log.info("oldest stream of %s/%s replaced: at most %d open", *key, len(subs))
                self.close(next(iter(subs)), CloseReason.REPLACED)
            subs = self._streams.setdefault(key, {})
        subs[sub] = None
        self._count += 1
        self.metrics.streams_opened.inc()
        try:
            yield sub
        finally:
            self._remove(sub)
            receive.close()
            reason = sub.closed_by or CloseReason.CLIENT
            self.metrics.stream_closed(reason.value)

    def dispatch(self, message: Message) -> int:
        """Offer `message` to every open stream of its recipient, once per instance.
        Returns how many streams it was queued on (0 when it was already dispatched)."""
        if not self._dispatched.add(message.id):
            return 0
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
