"""One SSE stream, independent of the HTTP server that carries it.

`serve_stream` writes frames to a `Sink` it is given: the first ping, then the replay,
then live messages and a ping every keepalive interval. It is one task, so writes never
interleave and need no lock; the HTTP adapter runs it next to a task that watches for the
client going away, in one nursery per connection, and cancels it when the client leaves.
The hub cancels it too, when its buffer fills or the instance drains.

Replay and live messages merge here: the stream subscribes to the hub first, then replays
from the store, then writes what arrived live meanwhile; `SeenWindow` drops repeats.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import suppress
from typing import Protocol

import trio

from sidecar.hub import Hub, Key
from sidecar.metrics import Metrics
from sidecar.protocol import sse
from sidecar.protocol.delivery import Replay
from sidecar.protocol.message import Message, State
from sidecar.protocol.replay import SeenWindow, live, replay_order
from sidecar.store.base import HistoryLost, Store, StoreUnavailable

log = logging.getLogger("sidecar.stream")

# Back-off while the store cannot answer a replay query; pings keep the stream alive.
RETRY_FIRST, RETRY_MAX = 0.5, 10.0


class ClientGone(Exception):
    """Raised by a Sink when the client is no longer there to write to."""


class Sink(Protocol):
    async def send(self, data: bytes) -> None:
        """Write `data` to the client; raise ClientGone when it has gone."""


@dataclasses.dataclass(frozen=True, slots=True)
class StreamOptions:
    keepalive: float
    replay_sent: bool
    replay_page: int


class SentMarker:
    """Marks written messages SENT in the store, in batches, off the streams' path.

    A stream only queues the id (never waits); when the queue is full the mark is dropped
    and the message stays ENQUEUED, so the worst case is that it is replayed once more and
    the client drops it as a repeat. Run `run` in the instance nursery.
    """

    def __init__(self, store: Store, capacity: int = 4096, batch: int = 500) -> None:
        self._store = store
        self._batch = batch
        self._send, self._receive = trio.open_memory_channel[str](capacity)
        self.dropped = 0
        self.flushed = trio.Event()

    def mark(self, message_id: str) -> None:
        try:
            self._send.send_nowait(message_id)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1

    def close(self) -> None:
        """No more marks: `run` writes what is queued, sets `flushed` and returns."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for first in self._receive:
            ids = [first]
            while len(ids) < self._batch:
                try:
                    ids.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                await self._store.mark_sent(ids)
            except StoreUnavailable as exc:
                log.warning("could not mark %d messages sent: %s", len(ids), exc)
        self.flushed.set()


async def serve_stream(
    sink: Sink,
    *,
    hub: Hub,
    store: Store,
    marker: SentMarker,
    key: Key,
    last_event_id: str | None,
    options: StreamOptions,
) -> None:
    """Serve one stream until the client goes, the hub closes it, or the caller cancels.

    Returns normally in the first two cases; the caller's cancellation propagates."""
    with hub.subscribe(key) as sub, sub.cancel_scope:
        stream = _Stream(sink, store, marker, key, last_event_id, options, hub.metrics)
        with suppress(ClientGone):
            await stream.run(sub.receive)


class _Stream:
    def __init__(
        self,
        sink: Sink,
        store: Store,
        marker: SentMarker,
        key: Key,
        last_event_id: str | None,
        options: StreamOptions,
        metrics: Metrics,
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._store = store
        self._marker = marker
        self._key = key
        self._last_event_id = last_event_id
        self._replay = Replay.on_connect(last_event_id, replay_sent=options.replay_sent)
        self._options = options
        self._seen = SeenWindow()
        self._next_ping = 0.0

    async def run(self, receive: trio.MemoryReceiveChannel[Message | HistoryLost]) -> None:
        await self._ping()
        await self._catch_up(ack=True)
        while True:
            item: Message | HistoryLost | None = None
            # Only the wait is under the deadline: a write cut in half would corrupt the stream.
            with trio.move_on_at(self._next_ping):
                item = await receive.receive()
            if item is None:
                await self._ping()
            elif isinstance(item, HistoryLost):
                await self._catch_up(ack=False)
            elif live(item, self._seen):
                await self._write(item)

    async def _ping(self) -> None:
        await self._sink.send(sse.PING)
        self._next_ping = trio.current_time() + self._options.keepalive

    async def _write(self, message: Message) -> None:
        await self._sink.send(sse.encode_message(message.id, message.response))
        self._metrics.written(message.id)
        if message.state == State.ENQUEUED:
            self._marker.mark(message.id)
        if trio.current_time() >= self._next_ping:
            await self._ping()

    async def _catch_up(self, *, ack: bool) -> None:
        """Acknowledge what the Last-Event-ID covers, then replay in id order, page by page;
        while the store does not answer, keep pinging and try again."""
        delay = RETRY_FIRST
        while True:
            try:
                if ack and self._last_event_id is not None:
                    await self._store.ack_through(*self._key, self._last_event_id)
                    ack = False
                await self._replay_pages()
                return
            except StoreUnavailable as exc:
                log.warning(
                    "replay for %s/%s failed, retrying in %.1fs: %s", *self._key, delay, exc
                )
                await self._wait(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _replay_pages(self) -> None:
        after = None
        while True:
            page = await self._store.pending(
                *self._key, self._replay, after=after, limit=self._options.replay_page
            )
            for message in replay_order(page, self._seen):
                await self._write(message)
            if len(page) < self._options.replay_page:
                return
            after = page[-1].id

    async def _wait(self, seconds: float) -> None:
        deadline = trio.current_time() + seconds
        while True:
            await trio.sleep_until(min(deadline, self._next_ping))
            if trio.current_time() >= deadline:
                return
            await self._ping()
