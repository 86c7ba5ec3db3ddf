"""One SSE stream, independent of the HTTP server that carries it.

`serve_stream` writes frames to a `Sink` it is given: the first ping, then the replay,
then live messages and a ping every keepalive interval. It is one task, so writes never
interleave and need no lock. The HTTP adapter cancels it when the client leaves (under
hypercorn, from the server's disconnect callback; elsewhere, from a task next to it that
waits for the client's disconnect event). The hub cancels it too, when its buffer fills or
the instance drains.

Replay and live messages merge here: the stream subscribes to the hub first, then replays
from the store page by page, each page together with the live messages already waiting in
its id range, in id order; then it writes what arrives live. `SeenWindow` drops repeats.
A page leaves out this instance's sends that were in flight while its query ran
(`InFlight`): they come live, in id order.

Writes are coalesced: the frames of every message already waiting in the stream's buffer
(up to `COALESCE_MAX`) go out in one write, so a stream that falls behind catches up in
fewer, larger writes instead of paying the HTTP server's per-write cost for each message.
A message is encoded once however many streams write it (`_frame`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Protocol

import trio

from sidecar.hub import Hub, InFlight, Key, Mailbox
from sidecar.metrics import Metrics
from sidecar.protocol import sse
from sidecar.protocol.delivery import Replay
from sidecar.protocol.message import Message, State
from sidecar.protocol.replay import SeenWindow, live, replay_order
from sidecar.store.base import FeedItem, HistoryLost, Store, StoreUnavailable

log = logging.getLogger("sidecar.stream")

# Back-off while the store cannot answer a replay query; pings keep the stream alive.
RETRY_FIRST, RETRY_MAX = 0.5, 10.0
# Most messages written in one write (one body chunk).
COALESCE_MAX = 64
# Frames of the most recently encoded live messages, shared by all streams; bounded in
# bytes (a fan-out writes each message to its streams shortly after it is dispatched).
FRAME_CACHE_BYTES = 1024 * 1024


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
    the client drops it as a repeat. An id already queued and not yet written is not queued
    again (every stream of a user marks the same message). Run `run` in the instance
    nursery.
    """

    def __init__(self, store: Store, capacity: int = 4096, batch: int = 500) -> None:
        self._store = store
        self._batch = batch
        self._send, self._receive = trio.open_memory_channel[str](capacity)
        self._queued: set[str] = set()  # queued or being written
        self.dropped = 0
        self.flushed = trio.Event()

    def mark(self, message_id: str) -> None:
        if message_id in self._queued:
            return
        try:
            self._send.send_nowait(message_id)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1
        else:
            self._queued.add(message_id)

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
            finally:
                self._queued.difference_update(ids)
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
    cancel_scope: trio.CancelScope | None = None,
) -> None:
    """Serve one stream until the client goes, the hub closes it, or the caller cancels.

    Returns normally in the first two cases, and when `cancel_scope` (the scope the stream
    runs in, which the hub cancels to close it) is cancelled; the caller's own cancellation
    propagates."""
    with hub.subscribe(key, cancel_scope) as sub, sub.cancel_scope:
        stream = _Stream(
            sink, store, marker, key, last_event_id, options, hub.metrics, hub.in_flight
        )
        try:
            if hub.pinging:
                stream.schedule = partial(hub.schedule_ping, sub.receive)
                await stream.run_pinged(sub.receive)
            else:
                await stream.run(sub.receive)
        except ClientGone:
            return  # a normal end (not `suppress`: an object held for the whole stream)


class _Stream:
    # One per open stream, alive as long as it is: no per-object dict.
    __slots__ = (
        "_in_flight",
        "_key",
        "_last_event_id",
        "_marker",
        "_metrics",
        "_next_ping",
        "_options",
        "_replay",
        "_seen",
        "_sink",
        "_store",
        "schedule",
    )

    def __init__(
        self,
        sink: Sink,
        store: Store,
        marker: SentMarker,
        key: Key,
        last_event_id: str | None,
        options: StreamOptions,
        metrics: Metrics,
        in_flight: InFlight | None = None,
    ) -> None:
        self._sink = sink
        self._in_flight = in_flight if in_flight is not None else InFlight()
        self._metrics = metrics
        self._store = store
        self._marker = marker
        self._key = key
        self._last_event_id = last_event_id
        self._replay = Replay.on_connect(last_event_id, replay_sent=options.replay_sent)
        self._options = options
        self._seen = SeenWindow()
        self._next_ping = 0.0
        # Tells the hub's pinger when the next ping is due (see `run_pinged`).
        self.schedule: Callable[[float], None] | None = None

    async def run(self, receive: Mailbox) -> None:
        await self._ping()
        await self._catch_up(receive, ack=True)
        await self._run_timed(receive)

    async def _run_timed(self, receive: Mailbox) -> None:
        while True:
            item = _take(receive)
            if item is None:
                # Only the wait is under the deadline: a write cut in half would corrupt
                # the stream.
                with trio.move_on_at(self._next_ping):
                    item = await receive.receive()
                if item is None:  # the deadline came first
                    await self._ping()
                    continue
            await self._write_from(receive, item)

    async def run_pinged(self, receive: Mailbox) -> None:
        """`run`, with the hub's pinger waking the wait when a ping is due, instead of a
        deadline (a cancel scope) on every wait (see `Hub.run_pings`)."""
        await self._ping()
        await self._catch_up(receive, ack=True)
        while True:
            if receive.ping_due:
                receive.ping_due = False
                if trio.current_time() >= self._next_ping:
                    await self._ping()
            if receive.ping_at == math.inf:
                # The pinger has stopped: this stream times its own waits from now on.
                self.schedule = None
                return await self._run_timed(receive)
            item = _take(receive)
            if item is None:
                await receive.wait()
                continue
            await self._write_from(receive, item)

    async def _write_from(self, receive: Mailbox, item: FeedItem) -> None:
        """Write `item` and whatever else is waiting (up to `COALESCE_MAX`), in one write
        where they are messages."""
        messages: list[Message] = []
        while True:
            if isinstance(item, HistoryLost):
                await self._write_all(messages)
                messages = []
                await self._catch_up(receive, ack=False)
            elif live(item, self._seen):
                messages.append(item)
            if len(messages) >= COALESCE_MAX:
                break
            waiting = _take(receive)
            if waiting is None:
                break
            item = waiting
        await self._write_all(messages)

    async def _ping(self) -> None:
        await self._sink.send(sse.PING)
        self._next_ping = trio.current_time() + self._options.keepalive
        if self.schedule is not None:
            self.schedule(self._next_ping)

    async def _write_all(self, messages: list[Message], *, shared: bool = True) -> None:
        """Write `messages` in one write, then mark them written. Live messages' frames go
        through the shared cache (other streams write the same objects); replayed ones,
        read from the store for this stream alone, do not."""
        if not messages:
            return
        encode = _frame if shared else _encode
        if len(messages) == 1:
            await self._sink.send(encode(messages[0]))
        else:
            await self._sink.send(b"".join([encode(m) for m in messages]))
        metrics, marker = self._metrics, self._marker
        for message in messages:
            metrics.written(message.id)
            if message.state == State.ENQUEUED:
                marker.mark(message.id)
        if trio.current_time() >= self._next_ping:
            await self._ping()

    async def _catch_up(self, receive: Mailbox, *, ack: bool) -> None:
        """Acknowledge what the Last-Event-ID covers, then replay in id order, page by page;
        while the store does not answer, keep pinging and try again."""
        delay = RETRY_FIRST
        while True:
            try:
                if ack and self._last_event_id is not None:
                    await self._store.ack_through(*self._key, self._last_event_id)
                    ack = False
                await self._replay_pages(receive)
                return
            except StoreUnavailable as exc:
                log.warning(
                    "replay for %s/%s failed, retrying in %.1fs: %s", *self._key, delay, exc
                )
                await self._wait(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _replay_pages(self, receive: Mailbox) -> None:
        after = None
        while True:
            with self._in_flight.during(self._key) as in_flight:
                page = await self._store.pending(
                    *self._key, self._replay, after=after, limit=self._options.replay_page
                )
            last = len(page) < self._options.replay_page
            queued = receive.take_messages(None if last else page[-1].id)
            fresh = list(replay_order(page, self._seen, in_flight, queued))
            for start in range(0, len(fresh), COALESCE_MAX):
                await self._write_all(fresh[start : start + COALESCE_MAX], shared=False)
            if last:
                return
            after = page[-1].id

    async def _wait(self, seconds: float) -> None:
        deadline = trio.current_time() + seconds
        while True:
            await trio.sleep_until(min(deadline, self._next_ping))
            if trio.current_time() >= deadline:
                return
            await self._ping()


def _take(receive: Mailbox) -> FeedItem | None:
    """The next item waiting in `receive`, or None. (A stream must not wait inside
    `except trio.WouldBlock`: the exception and its traceback would stay alive for the
    whole wait, some 600 bytes per idle stream.)"""
    try:
        return receive.receive_nowait()
    except trio.WouldBlock:
        return None


class _FrameCache:
    """Each live message's SSE frame, encoded once for all the streams that write it; keyed
    by id and checked against the very response object, so it cannot go stale. Bounded in
    bytes; the oldest go first (an OrderedDict drops its front in O(1))."""

    def __init__(self, max_bytes: int) -> None:
        self._frames: OrderedDict[str, tuple[object, bytes]] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes

    def frame(self, message: Message) -> bytes:
        cached = self._frames.get(message.id)
        if cached is not None and cached[0] is message.response:
            return cached[1]
        frame = _encode(message)
        if cached is not None:
            self._bytes -= len(self._frames.pop(message.id)[1])
        self._frames[message.id] = (message.response, frame)
        self._bytes += len(frame)
        while self._bytes > self._max_bytes:
            self._bytes -= len(self._frames.popitem(last=False)[1][1])
        return frame


def _encode(message: Message) -> bytes:
    return sse.encode_message(message.id, message.response)


_frame = _FrameCache(FRAME_CACHE_BYTES).frame
