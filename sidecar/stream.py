"""One SSE stream, independent of the HTTP server that carries it.

`serve_stream` writes frames to a `Sink` it is given: the first ping, then the replay,
then live messages and a ping every keepalive interval. It is one task, so writes never
interleave and need no lock. The HTTP adapter cancels it when the client leaves (under
hypercorn, from the server's disconnect callback; elsewhere, from a task next to it that
waits for the client's disconnect event). The hub cancels it too, when its buffer fills or
the instance drains.

This module owns the connect sequence of docs/delivery.md, with the position rule of
`protocol/delivery.py`: the stream subscribes to the hub first, then places itself in its
user's log (from the id the tab sent back, acknowledging what it covers), replays up to the
log's head, and from then on writes each message of the log once, in seq order: a repeat
or a late report is dropped, a gap or a new epoch is read from the store first.

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
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

import trio

from sidecar.hub import Hub, Key, Mailbox
from sidecar.metrics import Metrics
from sidecar.protocol import sse
from sidecar.protocol.delivery import (
    NOWHERE,
    SEEN_NOTHING,
    Position,
    Replay,
    Step,
    place_id,
    place_of,
    step,
)
from sidecar.protocol.feed import FeedItem, HistoryLost
from sidecar.protocol.message import Message, State
from sidecar.store.base import Store, StoreUnavailable

log = logging.getLogger("sidecar.stream")

# Back-off while the store cannot answer a replay query; pings keep the stream alive.
RETRY_FIRST, RETRY_MAX = 0.5, 10.0
# Most messages written in one write (one body chunk).
COALESCE_MAX = 64
# Frames of the most recently encoded live messages, shared by all streams; bounded in
# bytes (a fan-out writes each message to its streams shortly after it is dispatched).
FRAME_CACHE_BYTES = 1024 * 1024


# The event of a place frame (`_Stream._place`); Tock's clients listen to `message` only.
PLACE_EVENT = "place"


class ClientGone(Exception):
    """Raised by a Sink when the client is no longer there to write to."""


async def sent_back_position(store: Store, key: Key, sent_back: str | None) -> Position | None:
    """The position in the user's log that an id a tab sent back names (as Last-Event-ID,
    `lastEventId`, or posted to the ack endpoint): its message's, or the one a place frame
    told it; None for no id, "seen nothing", or an id the store does not know for this
    user."""
    if sent_back is None or sent_back == SEEN_NOTHING:
        return None
    position = await store.position_of(*key, sent_back)
    return position if position is not None else place_of(sent_back)


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
    browser_client: bool = False,
    cancel_scope: trio.CancelScope | None = None,
) -> None:
    """Serve one stream until the client goes, the hub closes it, or the caller cancels.

    `last_event_id` is the id the client sent back, if any; `browser_client` says it came
    from the browser client (`?lastEventId=`), for which an id the store does not know
    means "seen nothing" rather than no id at all (docs/delivery.md).

    Returns normally in the first two cases, and when `cancel_scope` (the scope the stream
    runs in, which the hub cancels to close it) is cancelled; the caller's own cancellation
    propagates."""
    with hub.subscribe(key, cancel_scope) as sub, sub.cancel_scope:
        stream = _Stream(
            sink, store, marker, key, last_event_id, browser_client, options, hub.metrics
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
        "_browser_client",
        "_key",
        "_last_event_id",
        "_marker",
        "_metrics",
        "_next_ping",
        "_options",
        "_position",
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
        browser_client: bool,
        options: StreamOptions,
        metrics: Metrics,
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._store = store
        self._marker = marker
        self._key = key
        self._last_event_id = last_event_id
        self._browser_client = browser_client
        self._options = options
        # The place in the user's log of the last message written (`delivery.step`).
        self._position = NOWHERE
        self._next_ping = 0.0
        # Tells the hub's pinger when the next ping is due (see `run_pinged`).
        self.schedule: Callable[[float], None] | None = None

    async def run(self, receive: Mailbox) -> None:
        await self._ping()
        await self._retrying(self._connect)
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
        await self._retrying(self._connect)
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
        where they are the next messages of the log; read from the store what a gap, a new
        log or a lost history leaves out."""
        messages: list[Message] = []
        while True:
            if isinstance(item, HistoryLost):
                await self._write_all(messages)
                messages = []
                await self._retrying(partial(self._recover, None))
            else:
                action = step(self._position, item.epoch, item.seq)
                if action is Step.WRITE:
                    messages.append(item)
                    self._position = Position(item.epoch, item.seq)
                elif action is not Step.DROP:
                    await self._write_all(messages)
                    messages = []
                    await self._retrying(partial(self._recover, item))
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
        through the shared cache (other streams write the same objects); those read from
        the store for this stream alone do not."""
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

    async def _retrying(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` until it gets through; while the store does not answer, keep pinging
        and try again (what `fn` wrote before failing stays written: it goes on from the
        stream's position)."""
        delay = RETRY_FIRST
        while True:
            try:
                return await fn()
            except StoreUnavailable as exc:
                log.warning(
                    "reading the log of %s/%s failed, retrying in %.1fs: %s",
                    *self._key,
                    delay,
                    exc,
                )
                await self._wait(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _connect(self) -> None:
        """The connect sequence (docs/delivery.md), once subscribed: the tab's position from
        the id it sent back, the acknowledgement it makes, then the replay up to the log's
        head, which becomes the stream's position. A browser-client tab that had no
        position is then told the one it has (a place frame): what the replay skipped
        (acknowledged by another tab) stays behind it from now on, and what comes after is
        its own."""
        store, key = self._store, self._key
        head = await store.head(*key)
        sent_back = self._last_event_id
        position = await sent_back_position(store, key, sent_back)
        if head is None:
            # No log yet: every message of the user is new to this tab.
            if self._browser_client:
                await self._place(NOWHERE)
            return
        replay: Replay | None = None  # from a position: every seq after it
        if position is not None:
            if position.epoch != head.epoch:  # the tab's log ended: all of this one is new
                position = Position(head.epoch, 0)
            position = min(position, head)  # a place the log has not reached: its head
            await store.acknowledge_through(*key, position)
            self._position = position
        else:
            seen_nothing = sent_back == SEEN_NOTHING or (
                sent_back is not None and self._browser_client
            )
            replay = Replay.on_connect(seen_nothing, replay_sent=self._options.replay_sent)
            self._position = Position(head.epoch, 0)
        # Placed: from here a failure goes on from the position, and never looks again.
        await self._retrying(partial(self._read_to, head.seq, replay))
        if replay is not None and self._browser_client:
            await self._place(self._position)

    async def _place(self, position: Position) -> None:
        """Tell a browser-client tab its position: a `place` frame, after every frame
        written before it, whose id the tab keeps and sends back as it does a message's."""
        frame_id = place_id(position)
        if frame_id is not None:
            await self._sink.send(sse.encode("", event=PLACE_EVENT, id=frame_id))

    async def _recover(self, item: Message | None) -> None:
        """Bring the stream up to `item` (a message past the next one, or of another epoch)
        and write it, reading the seqs in between from the store; with no item (the feed
        lost its history), up to the log's head."""
        if item is None or (self._position != NOWHERE and item.epoch != self._position.epoch):
            head = await self._store.head(*self._key)
            if head is None:
                return
            if item is not None and head.epoch != item.epoch:
                item = None  # from a log that has ended since: read the current one instead
            if item is None:
                if head.epoch != self._position.epoch:
                    self._position = Position(head.epoch, 0)
                return await self._read_to(head.seq)
        if item.epoch != self._position.epoch:
            self._position = Position(item.epoch, 0)
        await self._read_to(item.seq - 1)
        if step(self._position, item.epoch, item.seq) is not Step.DROP:
            self._position = Position(item.epoch, item.seq)
            await self._write_all([item])

    async def _read_to(self, through: int, replay: Replay | None = None) -> None:
        """Write the user's logged messages after the position up to seq `through` (those
        `replay` selects, when given), page by page; the position ends at `through`. Seqs
        the store no longer has (expired) are skipped."""
        page_size = self._options.replay_page
        epoch = self._position.epoch
        while self._position.seq < through:
            page = await self._store.logged(
                *self._key, self._position, through=through, limit=page_size, replay=replay
            )
            for start in range(0, len(page), COALESCE_MAX):
                await self._write_all(page[start : start + COALESCE_MAX], shared=False)
                self._position = Position(epoch, page[min(start + COALESCE_MAX, len(page)) - 1].seq)
            if len(page) < page_size:
                self._position = Position(epoch, through)

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
