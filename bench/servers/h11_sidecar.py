"""A prototype of the sidecar without hypercorn: its public and send listeners on trio + h11.

Only the HTTP layer is new. Everything else is the sidecar's own objects, used as
`sidecar.app.run` uses them: `Settings` from the same `SIDECAR_*` variables, the store from
`open_store` behind `InstrumentedStore`, the `Hub`, the `SentMarker`, the store's feed,
`serve_stream` for every stream, `parse_item` + `store_and_dispatch` for every send, and
`identity.resolve`, `cors_headers`/`preflight_headers`, `error_body` for what they decide.
So a stream served here writes the same bytes, in the same order, with the same stored
states, as one served by the sidecar; what differs is the cost of getting them out.

h11 does all of the HTTP/1.1 parsing and framing (nothing is parsed by hand here). Each
connection is one task with one `h11.Connection`; a stream runs in one nursery per
connection: `serve_stream` writing `h11.Data` events straight to the socket with
`send_all` (no lock, no shielded scope, no per-chunk event object beyond h11's own), next
to a reader task that sees the client go (EOF or reset) and cancels the stream.

What it carries, measured against the real listeners (bench/RESULTS.md, "Beyond hypercorn"):
- Routes: public `GET <base>/sse` (identity by the connector's mode, `Last-Event-ID` or
  `lastEventId`, CORS on the answer, `OPTIONS` preflights, `/healthz`); send
  `POST /v1/send`, `POST /v1/send/batch` (bearer token when set), `/healthz`, `/readyz`.
  Not here: the ack route, `/sidecar-sse.js`, `/metrics`, `/openapi.json`, the demo page,
  request ids and access logs.
- Limits: request line + headers bounded to `SIDECAR_MAX_HEADER_BYTES` (h11's
  `max_incomplete_event_size` while it arrives, then measured, as a head that came whole in
  one read escapes h11's bound; 431 past it), bodies by the payload/batch limits (413,
  read no further), streams per instance (503) and per user (the hub closes the oldest).
- Keep-alive with `start_next_cycle`; an idle connection is closed after the idle time
  (`SIDECAR_SEND_IDLE_SECONDS` on the send listener, 5 s on the public one, as hypercorn's
  default there), a request body that stalls after the read time; TCP_USER_TIMEOUT and
  keepalive on the listening sockets as the sidecar sets them (`sidecar.net`).
- SIGTERM/SIGINT drain as the sidecar does: stop accepting, close every stream (SHUTDOWN),
  give in-flight requests `SIDECAR_SHUTDOWN_SECONDS`, flush the SENT marks, exit.

    python -m bench.servers.h11_sidecar          # settings from the SIDECAR_* environment

`serve(settings, shutdown, task_status=...)` runs it inside a trio program (the smoke test,
tests/test_h11_prototype.py, does); it hands back the bound (public, send) URLs.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import h11
import trio

from sidecar import identity
from sidecar.app import open_core
from sidecar.config import Bind, Connector, Settings
from sidecar.http.common import (
    ApiError,
    cors_headers,
    error_body,
    parse_json,
    preflight_headers,
)
from sidecar.http.public import SSE_HEADERS, STREAMS_RETRY_AFTER
from sidecar.http.send import parse_batch, parse_item, store_and_dispatch
from sidecar.hub import CloseReason, Hub
from sidecar.net import bound_unacknowledged
from sidecar.protocol.message import normalize_id
from sidecar.store import Store, StoreUnavailable
from sidecar.stream import ClientGone, SentMarker, StreamOptions, serve_stream

log = logging.getLogger("sidecar.h11")

READ_SIZE = 65536
# hypercorn's default keep-alive timeout, which the public listener keeps.
PUBLIC_IDLE_SECONDS = 5.0
# What a stream client may send after its request before it is cut off (it sends nothing).
STREAM_TRAILING_BYTES = 65536
# Once the answer is out, how long a connection whose request body was not read is drained
# before it is closed (closing with unread data would reset it and lose the answer).
LINGER_SECONDS = 1.0
JSON_TYPE = (b"content-type", b"application/json")
OPEN_PATHS = frozenset({b"/healthz", b"/readyz"})

Handler = Callable[["Conn", h11.Request], Awaitable[bool]]


class Conn:
    """One TCP connection and its h11 state."""

    __slots__ = ("h11", "stream")

    def __init__(self, stream: trio.SocketStream, max_header_bytes: int) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)

    async def next_event(self, timeout: float) -> Any:
        """The next h11 event, reading as needed; trio.TooSlowError past `timeout`."""
        with trio.fail_after(timeout):
            while True:
                event = self.h11.next_event()
                if event is not h11.NEED_DATA:
                    return event
                self.h11.receive_data(await self.stream.receive_some(READ_SIZE))

    async def respond(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        *,
        close: bool = False,
    ) -> None:
        """A whole answer (head, body, end) in one write. The connection closes after it when
        `close`, or when the request's body was not read (it is then refused)."""
        headers = [*headers, (b"content-length", b"%d" % len(body))]
        if close or self.h11.their_state is not h11.DONE:
            headers.append((b"connection", b"close"))
        h = self.h11
        out = h.send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        if body:
            out += h.send(h11.Data(data=body))
        out += h.send(h11.EndOfMessage())
        await self.stream.send_all(out)

    async def read_body(self, limit: int, timeout: float) -> bytes | None:
        """The request body, or None when it is over `limit` bytes (what is left unread)."""
        parts: list[bytes] = []
        size = 0
        if self.h11.they_are_waiting_for_100_continue:
            await self.stream.send_all(
                self.h11.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        while True:
            event = await self.next_event(timeout)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    return None
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:  # ConnectionClosed: the client gave up mid-body
                raise trio.BrokenResourceError("closed mid-body")

    async def linger(self) -> None:
        """Half-close, then drop what the client still sends for a moment, so our answer
        reaches it before the socket closes."""
        try:
            await self.stream.send_eof()
            with trio.move_on_after(LINGER_SECONDS):
                while await self.stream.receive_some(READ_SIZE):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class H11Sink:
    """The `Sink` serve_stream writes to: each frame one h11 chunk, written at once.

    The write is not shielded: when the hub cuts the stream off (slow consumer, replaced,
    shutdown) a write blocked on the peer is cancelled too; `torn` then says the chunk may
    be half out, and the response cannot be ended cleanly."""

    __slots__ = ("_h11", "_stream", "torn")

    def __init__(self, conn: Conn) -> None:
        self._h11 = conn.h11
        self._stream = conn.stream
        self.torn = False

    async def send(self, data: bytes) -> None:
        await self._write(self._h11.send(h11.Data(data=data)))

    async def _write(self, out: bytes) -> None:
        self.torn = True
        try:
            await self._stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientGone from exc
        self.torn = False


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _head_size(request: h11.Request) -> int:
    """Bytes of the request line and headers, as sent (give or take the separators)."""
    size = len(request.method) + len(request.target) + 12
    for name, value in request.headers:
        size += len(name) + len(value) + 4
    return size


def _bodiless(request: h11.Request) -> bool:
    """No body follows the head (h11 then has its EndOfMessage ready)."""
    if _header(request, b"transfer-encoding") is not None:
        return False
    length = _header(request, b"content-length")
    return length is None or int(length) == 0


def _mimetype(request: h11.Request) -> str:
    return (_header(request, b"content-type") or "").split(";", 1)[0].strip().lower()


def _content_length(request: h11.Request) -> int | None:
    value = _header(request, b"content-length")
    return int(value) if value is not None else None  # h11 has checked it is digits


def _encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.lower().encode(), v.encode()) for n, v in headers]


class IdleConnections:
    """Connections waiting for their next request: closed at once when the instance drains
    (one in the middle of a request finishes it first)."""

    def __init__(self) -> None:
        self.scopes: set[trio.CancelScope] = set()
        self.closed = False

    def close_all(self) -> None:
        self.closed = True
        for scope in self.scopes:
            scope.cancel()


async def serve_connection(
    stream: trio.SocketStream,
    handler: Handler,
    *,
    max_header_bytes: int,
    idle_seconds: float,
    idle: IdleConnections,
) -> None:
    """HTTP/1.1 on one connection, request after request while both sides keep it alive."""
    conn = Conn(stream, max_header_bytes)
    h = conn.h11
    try:
        async with stream:
            while not idle.closed:
                try:
                    with trio.CancelScope() as waiting:
                        idle.scopes.add(waiting)
                        try:
                            event = await conn.next_event(idle_seconds)
                        finally:
                            idle.scopes.discard(waiting)
                    if waiting.cancelled_caught:
                        return  # the instance is draining
                except h11.RemoteProtocolError as exc:
                    if h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        status = exc.error_status_hint
                        code = "request_header_fields_too_large" if status == 431 else "bad_request"
                        await conn.respond(
                            status, [JSON_TYPE], error_body(code, str(exc)), close=True
                        )
                    return
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed between requests
                if _head_size(event) > max_header_bytes:
                    # h11's bound only covers a head still incomplete after a read; one
                    # that arrived whole in a single read is measured here.
                    message = f"the request line and headers are over {max_header_bytes} bytes"
                    body = error_body("request_header_fields_too_large", message)
                    await conn.respond(431, [JSON_TYPE], body, close=True)
                    return
                if _bodiless(event):
                    h.next_event()  # its EndOfMessage, there without reading
                keep = await handler(conn, event)
                if not keep or h.our_state is not h11.DONE:
                    return
                if h.their_state is not h11.DONE:
                    await conn.linger()  # the body was refused unread
                    return
                h.start_next_cycle()
    except (
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        trio.TooSlowError,
        h11.RemoteProtocolError,
        h11.LocalProtocolError,
    ):
        return
    except Exception:
        # One connection's failure stays with it: the listener goes on.
        log.exception("connection dropped after an error")


class Prototype:
    """The two listeners' request handlers, over the sidecar's own hub, store and marker."""

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        store: Store,
        marker: SentMarker,
        draining: trio.Event,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.store = store
        self.marker = marker
        self.draining = draining
        self.open_streams = 0
        self.streams = {c.stream_path.encode(): c for c in settings.connectors}
        self.options = StreamOptions(
            keepalive=settings.keepalive_seconds,
            replay_sent=settings.replay_sent,
            replay_page=settings.replay_page,
        )
        self.policies = {c.id: identity.policy_for(settings, c) for c in settings.connectors}
        self.credential_paths = {
            p.encode()
            for c in settings.connectors
            if self.policies[c.id].needs_credentials
            for p in (c.stream_path, c.ack_path)
        }
        self.token = settings.send_token.encode() if settings.send_token else None

    # -- public listener ------------------------------------------------------------------

    def _cors(self, request: h11.Request, path: bytes) -> list[tuple[bytes, bytes]]:
        credentials = self.settings.cors_credentials or path in self.credential_paths
        return _encode(
            cors_headers(_header(request, b"origin"), self.settings.cors_pattern, credentials)
        )

    async def public(self, conn: Conn, request: h11.Request) -> bool:
        path, _, query = request.target.partition(b"?")
        method = request.method
        if method == b"OPTIONS":
            headers = preflight_headers(
                _header(request, b"origin"),
                _header(request, b"access-control-request-headers"),
                self.settings.cors_pattern,
                self.settings.cors_credentials or path in self.credential_paths,
            )
            await conn.respond(204, _encode(headers))
            return True
        connector = self.streams.get(path)
        cors = self._cors(request, path)
        if connector is None:
            if method == b"GET" and path == b"/healthz":
                await conn.respond(200, [JSON_TYPE, *cors], b'{"status":"ok"}')
            else:
                await conn.respond(404, [JSON_TYPE, *cors], error_body("not_found", "not found"))
            return True
        if method != b"GET":
            body = error_body("method_not_allowed", "the stream takes GET")
            await conn.respond(405, [JSON_TYPE, (b"allow", b"GET"), *cors], body)
            return True
        return await self._stream(conn, request, connector, query, cors)

    async def _stream(
        self,
        conn: Conn,
        request: h11.Request,
        connector: Connector,
        query_bytes: bytes,
        cors: list[tuple[bytes, bytes]],
    ) -> bool:
        query = dict(parse_qsl(query_bytes.decode("latin-1")))
        view = identity.RequestView.build(
            query,
            [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in request.headers],
            _peer_host(conn.stream),
        )
        try:
            resolved = identity.resolve(self.policies[connector.id], view, mint_cookie=True)
        except identity.IdentityError as exc:
            await conn.respond(exc.status, [JSON_TYPE, *cors], error_body(exc.code, str(exc)))
            return True
        raw_last = _header(request, b"last-event-id") or query.get("lastEventId") or None
        last_event_id = normalize_id(raw_last) if raw_last is not None else None
        if raw_last is not None and last_event_id is None:
            body = error_body("invalid_last_event_id", "Last-Event-ID is not a message id")
            await conn.respond(400, [JSON_TYPE, *cors], body)
            return True
        if self.draining.is_set():
            self.hub.metrics.streams_rejected.labels("draining").inc()
            body = error_body("draining", "this instance is shutting down")
            await conn.respond(503, [JSON_TYPE, (b"retry-after", b"1"), *cors], body)
            return True
        if self.open_streams >= self.settings.max_streams:
            self.hub.metrics.streams_rejected.labels("instance_limit").inc()
            body = error_body(
                "too_many_streams", "this instance holds as many streams as it may; retry later"
            )
            headers = [JSON_TYPE, (b"retry-after", STREAMS_RETRY_AFTER), *cors]
            await conn.respond(503, headers, body)
            return True
        set_cookie = [(b"set-cookie", resolved.set_cookie.encode())] if resolved.set_cookie else []
        self.open_streams += 1
        try:
            return await self._serve(conn, connector, resolved.user_id, last_event_id, [
                *SSE_HEADERS, *set_cookie, *cors
            ])  # fmt: skip
        finally:
            self.open_streams -= 1

    async def _serve(
        self,
        conn: Conn,
        connector: Connector,
        user_id: str,
        last_event_id: str | None,
        headers: list[tuple[bytes, bytes]],
    ) -> bool:
        h = conn.h11
        # The head goes out with the first ping (serve_stream's first write) in one send.
        head = h.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))
        sink = _FirstWriteSink(conn, head)
        client_gone = False

        async def watch(cancel_scope: trio.CancelScope) -> None:
            nonlocal client_gone
            extra = 0
            try:
                while data := await conn.stream.receive_some(READ_SIZE):
                    extra += len(data)  # a stream client has nothing more to say
                    if extra > STREAM_TRAILING_BYTES:
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            client_gone = True
            cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            await serve_stream(
                sink,
                hub=self.hub,
                store=self.store,
                marker=self.marker,
                key=(connector.id, user_id),
                last_event_id=last_event_id,
                options=self.options,
            )
            nursery.cancel_scope.cancel()
        if not client_gone and not sink.torn:
            # The hub closed it (slow consumer, replaced, shutdown): end the response
            # cleanly so the browser reconnects; the connection closes after it.
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await conn.stream.send_all(sink.pending() + h.send(h11.EndOfMessage()))
        return False

    # -- send listener ----------------------------------------------------------------------

    async def send(self, conn: Conn, request: h11.Request) -> bool:
        path = request.target.partition(b"?")[0]
        method = request.method
        try:
            if self.token is not None and path not in OPEN_PATHS:
                scheme, _, value = (_header(request, b"authorization") or "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                    value.strip().encode(), self.token
                ):
                    raise ApiError(401, "unauthorized", "a valid bearer token is required")
            if method == b"POST" and path == b"/v1/send":
                limit = self.settings.max_payload_bytes
                payload = await self._json_body(conn, request, limit)
                item = parse_item(payload, self.settings)
                (result,) = await store_and_dispatch(self.store, self.hub, [item])
                await self._json(conn, 202, result)
            elif method == b"POST" and path == b"/v1/send/batch":
                payload = await self._json_body(conn, request, self.settings.max_batch_bytes)
                items = parse_batch(payload, self.settings)
                results = await store_and_dispatch(self.store, self.hub, items)
                await self._json(conn, 202, {"results": results})
            elif method == b"GET" and path == b"/healthz":
                await self._json(conn, 200, {"status": "ok"})
            elif method == b"GET" and path == b"/readyz":
                try:
                    details = await self.store.ping()
                except StoreUnavailable as exc:
                    await self._json(
                        conn, 503, {"status": "unavailable", "store": {"error": str(exc)}}
                    )
                else:
                    await self._json(conn, 200, {"status": "ok", "store": details})
            elif path in (b"/v1/send", b"/v1/send/batch", b"/healthz", b"/readyz"):
                allow = b"POST" if path.startswith(b"/v1/") else b"GET"
                raise _Refused(405, "method_not_allowed", "method not allowed", allow)
            else:
                raise ApiError(404, "not_found", "not found")
        except _Refused as exc:
            headers = [JSON_TYPE, (b"allow", exc.allow)]
            await conn.respond(exc.status, headers, error_body(exc.code, exc.message))
        except ApiError as exc:
            await conn.respond(exc.status, [JSON_TYPE], error_body(exc.code, exc.message))
        except StoreUnavailable:
            body = error_body("store_unavailable", "the message store is unavailable; retry later")
            await conn.respond(503, [JSON_TYPE, (b"retry-after", b"1")], body)
        return True

    async def _json_body(self, conn: Conn, request: h11.Request, limit: int) -> Any:
        if _mimetype(request) != "application/json":
            raise ApiError(415, "unsupported_media_type", "the body must be application/json")
        length = _content_length(request)
        too_large = ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
        if length is not None and length > limit:
            raise too_large
        body = await conn.read_body(limit, self.settings.send_read_seconds)
        if body is None:
            raise too_large
        return parse_json(body)

    @staticmethod
    async def _json(conn: Conn, status: int, body: Any) -> None:
        await conn.respond(status, [JSON_TYPE], json.dumps(body, separators=(",", ":")).encode())


class _Refused(ApiError):
    def __init__(self, status: int, code: str, message: str, allow: bytes) -> None:
        super().__init__(status, code, message)
        self.allow = allow


class _FirstWriteSink(H11Sink):
    """H11Sink whose first write carries the response head too (one send for both)."""

    __slots__ = ("_head",)

    def __init__(self, conn: Conn, head: bytes) -> None:
        super().__init__(conn)
        self._head = head

    def pending(self) -> bytes:
        head, self._head = self._head, b""
        return head

    async def send(self, data: bytes) -> None:
        if not self._head:
            return await self._write(self._h11.send(h11.Data(data=data)))
        await self._write(self.pending() + self._h11.send(h11.Data(data=data)))


def _peer_host(stream: trio.SocketStream) -> str | None:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return None
    return str(peer[0]) if isinstance(peer, tuple) else None


async def _listen(bind: Bind, settings: Settings) -> list[trio.SocketListener]:
    listeners = await trio.open_tcp_listeners(bind.port, host=bind.host, backlog=4096)
    for listener in listeners:
        # TCP_USER_TIMEOUT + keepalive, inherited by every accepted connection (sidecar/net.py).
        bound_unacknowledged(listener.socket, settings.write_timeout_seconds)  # type: ignore[arg-type]
    return listeners


def _url(listeners: list[trio.SocketListener]) -> str:
    host, port = listeners[0].socket.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    settings: Settings,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[tuple[str, str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run both listeners until `shutdown` is set, then drain as the sidecar does."""
    async with open_core(settings) as core:
        hub = core.hub
        draining = trio.Event()
        proto = Prototype(settings, hub, core.store, core.marker, draining)
        idle_connections = IdleConnections()
        public = await _listen(settings.public_bind, settings)
        send = await _listen(settings.send_bind, settings)
        async with trio.open_nursery() as connections:
            with trio.CancelScope() as accepting:
                async with trio.open_nursery() as acceptors:
                    for listeners, handler, idle_s in (
                        (public, proto.public, PUBLIC_IDLE_SECONDS),
                        (send, proto.send, settings.send_idle_seconds),
                    ):
                        serve_one = partial(
                            serve_connection,
                            handler=handler,
                            max_header_bytes=settings.max_header_bytes,
                            idle_seconds=idle_s,
                            idle=idle_connections,
                        )
                        acceptors.start_soon(
                            partial(trio.serve_listeners, handler_nursery=connections),
                            serve_one,
                            listeners,
                        )
                    task_status.started((_url(public), _url(send)))
                    await shutdown.wait()
                    accepting.cancel()  # stop accepting: the listeners close
            draining.set()
            hub.close_all(CloseReason.SHUTDOWN)
            idle_connections.close_all()
            # In-flight requests get the shutdown time, then the rest is cancelled.
            connections.cancel_scope.deadline = trio.current_time() + settings.shutdown_seconds


async def main() -> None:
    settings = Settings.load(os.environ)
    logging.basicConfig(level=settings.log_level, stream=sys.stderr)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    shutdown.set()
                    return

        nursery.start_soon(on_signal)
        public, send = await nursery.start(serve, settings, shutdown)
        log.warning("h11 prototype listening: public %s send %s", public, send)
        await shutdown.wait()


if __name__ == "__main__":
    from bench.common import raise_nofile

    raise_nofile()
    trio.run(main)
