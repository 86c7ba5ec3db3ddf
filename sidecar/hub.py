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
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from sidecar.protocol.message import Message
from sidecar.protocol.replay import SeenWindow
from sidecar.store.base import FeedItem, HistoryLost

log = logging.getLogger("sidecar.hub")

Key = tuple[str, str]  # (connector id, recipient id)


class CloseReason(enum.Enum):
    CLIENT = "client"  # the browser went away
    SLOW = "slow"  # its buffer filled up
    SHUTDOWN = "shutdown"  # the instance is draining


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
    def __init__(self, buffer_size: int, *, dispatched_window: int = 65536) -> None:
        self._buffer_size = buffer_size
        self._streams: dict[Key, set[Subscription]] = {}
        # Ids this instance already dispatched, so the store's feed, which also reports this
        # instance's own saves, does not dispatch them again.
        self._dispatched = SeenWindow(dispatched_window)
        self.stats = HubStats()

    def stream_count(self, key: Key | None = None) -> int:
        if key is not None:
            return len(self._streams.get(key, ()))
        return sum(len(subs) for subs in self._streams.values())

    @contextmanager
    def subscribe(self, key: Key) -> Iterator[Subscription]:
        """Register a stream for `key` for the duration of the block."""
        send, receive = trio.open_memory_channel[FeedItem](self._buffer_size)
        sub = Subscription(key, send, receive)
        self._streams.setdefault(key, set()).add(sub)
        try:
            yield sub
        finally:
            self._remove(sub)
            receive.close()

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
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._streams[sub.key]
