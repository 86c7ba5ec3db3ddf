"""Every change the sidecar makes to hypercorn's internals, installed once at start.

hypercorn (the version range pyproject.toml allows, tested with 0.18) serves both listeners
through its trio worker. Each change below is a subclass of one hypercorn class, put in
place of it where hypercorn looks it up (`HOOKS`). `install` does that, idempotently (the
same classes are put in place however often it runs), after checking that every class
and method it replaces is still there: when hypercorn has changed, start-up stops with one
line naming hypercorn's version and the missing hook (`StartupError`), instead of a patch
that silently no longer applies.

`_TCPServer` (hypercorn.trio.tcp_server.TCPServer, one per connection):

- Failures are kept to their connection. hypercorn runs every connection in the
  listener's nursery, so an exception escaping one connection takes the whole listener
  (and the sidecar) down. Malformed requests can cause one: an invalid chunked body on a
  request the application answers at once makes hypercorn's error response race the
  application's close of the connection, and `send_eof` raises `trio.BusyResourceError`
  (see also pgjones/hypercorn#203). Here the connection is logged and dropped (trio closes
  its socket); cancellation still propagates.
- A connection ends when its client closes. hypercorn would keep the connection, its
  socket and tasks, until its keep-alive timer ran out (5 s), so a client that connects
  and closes in a loop would pile up file descriptors.
- A connection ends when a write finds its client gone, also while nothing reads it.
  h11 stops reading while a response is under way when the client has offered a protocol
  switch (`Upgrade`) or pipelined another request, so the end of such a connection is
  only known from a failed write. hypercorn handled that failure in the writing task
  (an SSE stream's), which the close it reports cancels half way, so the reader waited
  for the response to finish forever, keeping the socket and its task. Here the failed
  write cancels the reader, which then closes the connection as after reading its end.
- Reads hold no cancel scope, which an idle SSE connection would hold (about 1 KB) for as
  long as it is open, except while a request body is arriving on a listener with a body
  deadline (`ListenerConfig.body_timeout`, the send listener's `SIDECAR_SEND_READ_SECONDS`):
  the whole body must arrive within it of the request's head, or the connection is closed.
  (hypercorn's `read_timeout` bounds each read instead, so a body trickled one byte at a
  time never ends.) The request head is bounded by the keep-alive timeout, which runs
  until a request's head is complete.

`_H11Protocol` (hypercorn.protocol.h11.H11Protocol, HTTP/1.1 on one connection):

- No HTTP/2. hypercorn switches a connection to HTTP/2 on the connection preface
  (`PRI * HTTP/2.0`, "prior knowledge") and on `Upgrade: h2c`. Nothing needs HTTP/2 here
  (an ingress speaks it to browsers and HTTP/1.1 to the sidecar), and hypercorn's HTTP/2
  leaked: a client that keeps its flow-control window at zero makes an answer's last send
  wait forever, and hypercorn never frees the streams of a connection that then goes, so
  every such request kept a file descriptor and its task for good. The preface is answered
  `505` and the connection closed; `Upgrade: h2c` is ignored (the request is answered in
  HTTP/1.1, never `101`, as RFC 9110 7.8 allows). Every answer is then written to the
  socket, where the kernel bounds each write (sidecar/net.py, `SIDECAR_WRITE_TIMEOUT_SECONDS`).
- A request with both Content-Length and Transfer-Encoding is answered (by the chunked
  body, as h11 reads it), then the connection is closed, as RFC 9112 6.3 requires: the two
  disagree on where the body ends, so what follows it could be a smuggled request.
- Fewer socket writes per response. hypercorn writes every h11 event to the socket on its
  own, and each write costs a lock, a shielded cancel scope and a `send` system call: a
  small JSON answer is three writes (the head, the body, then an empty end of message: a
  content-length body needs no trailer), and an SSE stream's head goes out alone before
  its first ping. Here the head is held back and goes out with the next bytes of the
  response (its body, or the end of an empty one), and writes of nothing are skipped. What
  reaches the client, and in what order, is unchanged; only the number of writes drops (one
  per small response). A held head is written before the connection is recycled or closed
  at the end of the stream, whatever happens.
- Keep-alive that works under quart-trio. When a response is finished, hypercorn
  "recycles" the connection: it makes the connection ready for the next request and
  restarts its idle timer (`keep_alive_timeout`), or, when the client had not finished
  sending its request body yet, closes it. hypercorn does that in whichever task reported
  the response finished, and with quart-trio that is a task of the request that Quart has
  already cancelled. The recycling then died at its first checkpoint, half done: the idle
  timer was never restarted, so an idle keep-alive connection was never closed
  (`SIDECAR_SEND_IDLE_SECONDS` and the public listener's idle timeout did nothing); and a
  response sent before the request body arrived (an error answered before the body is
  read) left the connection neither closed nor ready: the client's next request on it
  waited forever. The recycling runs under a shield. It cannot hang there: it only
  updates the protocol state, starts the idle timer task, or closes the socket (after
  writing a held head, which the kernel bounds).

`_HTTPStream` (hypercorn.protocol.http_stream.HTTPStream, one per HTTP/1.1 request):

- A callback when the client goes, without a task per stream waiting for it. An ASGI
  application learns that its client went away only by awaiting `receive()` until it
  returns `http.disconnect`. An SSE stream reads nothing else, so that takes one more task
  and a nursery per open stream: about 3 KB of what an idle stream costs. hypercorn
  delivers that event from one place, `HTTPStream.handle(StreamClosed)`. Here every HTTP
  request's scope gets an empty list at `scope["extensions"][ON_DISCONNECT]`, and when the
  stream closes, before queueing `http.disconnect` as before, the callables the
  application appended to it are called (once, in hypercorn's task). The stream route uses
  it when the key is there (`disconnect_callbacks`), and falls back to a task awaiting
  `http.disconnect` when it is not (another server). The list sees the close of every
  request, also a response finished normally: a callback is for as long as the
  application waits, removed once it is done.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from importlib.metadata import version
from types import ModuleType
from typing import Any

import h11
import hypercorn.protocol
import hypercorn.protocol.h11
import hypercorn.trio.run
import trio
from hypercorn.events import Closed, RawData
from hypercorn.events import Event as ConnectionEvent
from hypercorn.protocol.events import Event, Request, StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.typing import H11SendableEvent

from sidecar.config import StartupError

log = logging.getLogger("sidecar.http")

ON_DISCONNECT = "sidecar.on_disconnect"


def disconnect_callbacks(scope: Any) -> list[Callable[[], None]] | None:
    """The list to append a callback to for the close of this request, or None when the
    server does not call them."""
    extensions = scope.get("extensions") or {}
    callbacks: list[Callable[[], None]] | None = extensions.get(ON_DISCONNECT)
    return callbacks


class _HTTP2Refused(Exception):
    """Raised out of the protocol once the HTTP/2 preface is answered: the connection
    closes (`_TCPServer._read_data`)."""


class _HTTPStream(HTTPStream):
    async def handle(self, event: Event) -> None:
        kind = type(event)
        if kind is StreamClosed and not self.closed:
            scope = getattr(self, "scope", None)
            callbacks = scope["extensions"].get(ON_DISCONNECT) if scope is not None else None
            if callbacks:
                for callback in list(callbacks):
                    callback()
        await super().handle(event)
        if kind is Request:
            extensions = getattr(self, "scope", {}).get("extensions")
            if extensions is not None:
                # Set before the application runs: hypercorn only starts its task here.
                extensions[ON_DISCONNECT] = []


class _H11Protocol(H11Protocol):
    _sidecar_head = b""  # a response head held back until the response's next bytes
    # When the body of the current request must have arrived (`_TCPServer._read_data`).
    body_deadline = math.inf

    async def _check_protocol(self, event: h11.Request) -> None:
        # Replaces hypercorn's, which switches to HTTP/2 on the preface or `Upgrade: h2c`.
        if event.method == b"PRI" and event.target == b"*" and event.http_version == b"2.0":
            await self._send_error_response(505)
            raise _HTTP2Refused
        names = {name for name, _ in event.headers}  # h11 gives them in lowercase
        if b"content-length" in names and b"transfer-encoding" in names:
            # The answer says `Connection: close`, and the connection closes after it, as
            # after the last request hypercorn allows on one connection.
            self.keep_alive_requests = self.config.keep_alive_max_requests
        body_timeout: float | None = getattr(self.config, "body_timeout", None)
        if body_timeout is not None:
            self.body_deadline = trio.current_time() + body_timeout

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            await self._flush_head()
            return
        if type(event) is h11.Response:  # a final head: it waits for the body's first bytes
            self._sidecar_head += data
            return
        head = self._sidecar_head
        if head:
            self._sidecar_head = b""
            data = head + data
        if data:
            await self.send(RawData(data=data))

    async def _flush_head(self) -> None:
        head = self._sidecar_head
        if head:
            self._sidecar_head = b""
            await self.send(RawData(data=head))

    async def _maybe_recycle(self) -> None:
        # hypercorn recycles (or closes) the connection when the stream closes: whatever
        # the stream left unsent goes first.
        with trio.CancelScope(shield=True):
            await self._flush_head()
            await super()._maybe_recycle()


class _TCPServer(TCPServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading = trio.CancelScope()  # `_read_data`'s, cancelled when a write fails

    async def run(self) -> None:
        try:
            await super().run()
        except* Exception as group:
            log.warning("connection dropped after an HTTP server error: %r", group.exceptions[0])

    async def protocol_send(self, event: ConnectionEvent) -> None:
        if type(event) is not RawData:
            await super().protocol_send(event)
            return
        async with self.send_lock:
            try:
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(event.data)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self._reading.cancel()

    async def _read_data(self) -> None:
        with self._reading:
            while True:
                deadline = self._body_deadline()
                try:
                    if deadline == math.inf:
                        data = await self.stream.receive_some(MAX_RECV)
                    else:
                        with trio.move_on_at(deadline) as late:
                            data = await self.stream.receive_some(MAX_RECV)
                        if late.cancelled_caught:
                            break
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                try:
                    await self.protocol.handle(RawData(bytes(data)))
                except _HTTP2Refused:
                    break
                if data == b"":
                    break
        await self.protocol.handle(Closed())
        # Nothing more can come: close now rather than when the keep-alive timer runs out.
        await self.idle_task.stop()

    def _body_deadline(self) -> float:
        """When the request body being received must be complete; infinity when none is."""
        protocol = self.protocol.protocol
        if isinstance(protocol, _H11Protocol) and protocol.connection.their_state is h11.SEND_BODY:
            return protocol.body_deadline
        return math.inf


# (module, name, hypercorn's class there, the sidecar's, the methods the sidecar's replaces)
HOOKS: tuple[tuple[ModuleType, str, type, type, tuple[str, ...]], ...] = (
    (
        hypercorn.trio.run,
        "TCPServer",
        TCPServer,
        _TCPServer,
        ("run", "protocol_send", "_read_data"),
    ),
    (
        hypercorn.protocol,
        "H11Protocol",
        H11Protocol,
        _H11Protocol,
        ("_check_protocol", "_send_h11_event", "_maybe_recycle", "_send_error_response"),
    ),
    (hypercorn.protocol.h11, "HTTPStream", HTTPStream, _HTTPStream, ("handle",)),
)


def install() -> None:
    """Put the sidecar's classes in place of hypercorn's (idempotent); StartupError, naming
    hypercorn's version and the hook, when one of them is not where it was."""
    for module, name, theirs, ours, methods in HOOKS:
        hook = f"{module.__name__}.{name}"
        if getattr(module, name, None) in (theirs, ours):
            hook = next((f"{hook}.{m}" for m in methods if not hasattr(theirs, m)), "")
        if hook:
            raise StartupError(
                f"hypercorn {version('hypercorn')} is not supported: {hook}, which "
                "sidecar/http/hypercorn_patches.py replaces, is missing or changed"
            )
    for module, name, _, ours, _ in HOOKS:
        setattr(module, name, ours)
