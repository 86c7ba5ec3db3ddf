"""The browser-facing listener: SSE streams, acks, CORS, the browser client, health.

The stream route is plain ASGI: it hands `serve_stream` a sink that writes body chunks and
runs it in one nursery per connection next to a task that waits for `http.disconnect`.
Everything else is a quart-trio app.
"""

from __future__ import annotations

from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

import trio
from hypercorn.typing import ASGIReceiveCallable as Receive
from hypercorn.typing import ASGISendCallable as Send
from hypercorn.typing import HTTPScope
from hypercorn.typing import Scope as AnyScope
from quart import Response, request
from quart_trio import QuartTrio

from sidecar import identity
from sidecar.config import Connector, Settings
from sidecar.http.common import (
    ApiError,
    cors_headers,
    error_body,
    install_error_handlers,
    install_health_routes,
    parse_json,
    preflight_headers,
)
from sidecar.hub import Hub
from sidecar.protocol.message import normalize_id
from sidecar.store.base import Store
from sidecar.stream import SentMarker, StreamOptions, serve_stream

SSE_HEADERS = [
    (b"content-type", b"text/event-stream;charset=UTF-8"),
    (b"cache-control", b"no-cache"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]
MAX_ACK_BYTES = 16 * 1024
MAX_ACK_IDS = 1000


class PublicApp:
    """The ASGI application of the public listener."""

    def __init__(
        self, settings: Settings, hub: Hub, store: Store, marker: SentMarker, draining: trio.Event
    ) -> None:
        self._settings = settings
        self._hub = hub
        self._store = store
        self._marker = marker
        self._draining = draining
        self._streams = {c.stream_path: c for c in settings.connectors}
        self._options = StreamOptions(
            keepalive=settings.keepalive_seconds,
            replay_sent=settings.replay_sent,
            replay_page=settings.replay_page,
        )
        self._quart = _quart_app(settings, store)

    async def __call__(self, scope: AnyScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["method"] == "OPTIONS":
                return await self._preflight(scope, send)
            connector = self._streams.get(scope["path"])
            if connector is not None:
                if scope["method"] != "GET":
                    return await self._error(
                        scope, send, 405, "method_not_allowed", "the stream takes GET", b"GET"
                    )
                return await self._stream(connector, scope, receive, send)
        await self._quart(scope, receive, send)

    def _cors(self, scope: HTTPScope) -> list[tuple[bytes, bytes]]:
        origin = _header(scope, b"origin")
        return [
            (name.lower().encode(), value.encode())
            for name, value in cors_headers(
                origin, self._settings.cors_pattern, self._settings.cors_credentials
            )
        ]

    async def _preflight(self, scope: HTTPScope, send: Send) -> None:
        headers = preflight_headers(
            _header(scope, b"origin"),
            _header(scope, b"access-control-request-headers"),
            self._settings.cors_pattern,
            self._settings.cors_credentials,
        )
        encoded = [(n.lower().encode(), v.encode()) for n, v in headers]
        await _respond(send, 204, encoded, b"")

    async def _error(
        self, scope: HTTPScope, send: Send, status: int, code: str, message: str, allow: bytes = b""
    ) -> None:
        body = error_body(code, message)
        headers = [(b"content-type", b"application/json"), *self._cors(scope)]
        if allow:
            headers.append((b"allow", allow))
        if status == 503:
            headers.append((b"retry-after", b"1"))
        await _respond(send, status, headers, body)

    async def _stream(
        self, connector: Connector, scope: HTTPScope, receive: Receive, send: Send
    ) -> None:
        query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
        try:
            user_id = identity.from_query(query)
        except identity.IdentityError as exc:
            return await self._error(scope, send, exc.status, exc.code, str(exc))
        raw_last = _header(scope, b"last-event-id") or query.get("lastEventId") or None
        last_event_id = normalize_id(raw_last) if raw_last is not None else None
        if raw_last is not None and last_event_id is None:
            return await self._error(
                scope, send, 400, "invalid_last_event_id", "Last-Event-ID is not a message id"
            )
        if self._draining.is_set():
            return await self._error(scope, send, 503, "draining", "this instance is shutting down")

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": SSE_HEADERS + self._cors(scope),
            }
        )

        client_gone = trio.Event()

        async def watch_disconnect(cancel_scope: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            client_gone.set()
            cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, nursery.cancel_scope)
            await serve_stream(
                _AsgiSink(send),
                hub=self._hub,
                store=self._store,
                marker=self._marker,
                key=(connector.id, user_id),
                last_event_id=last_event_id,
                options=self._options,
            )
            nursery.cancel_scope.cancel()
        if not client_gone.is_set():
            # The hub closed the stream (slow consumer, shutdown): end the response cleanly
            # so the browser reconnects.
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class _AsgiSink:
    def __init__(self, send: Send) -> None:
        self._send = send

    async def send(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: HTTPScope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _quart_app(settings: Settings, store: Store) -> QuartTrio:
    app = QuartTrio("sidecar.public")
    app.config["MAX_CONTENT_LENGTH"] = MAX_ACK_BYTES
    install_error_handlers(app)
    install_health_routes(app, store)
    client_js = resources.files("sidecar").joinpath("static/sidecar-sse.js").read_bytes()

    @app.after_request
    async def add_cors(response: Response) -> Response:
        for name, value in cors_headers(
            request.headers.get("Origin"), settings.cors_pattern, settings.cors_credentials
        ):
            response.headers[name] = value
        return response

    @app.get("/sidecar-sse.js")
    async def sidecar_js() -> Response:
        response = Response(client_js, content_type="text/javascript; charset=utf-8")
        response.headers["Cache-Control"] = "public, max-age=300"
        return response

    for connector in settings.connectors:
        app.add_url_rule(
            connector.ack_path,
            endpoint=f"ack_{connector.id}",
            view_func=_ack_view(connector, store),
            methods=["POST"],
        )
    return app


def _ack_view(connector: Connector, store: Store) -> Any:
    async def ack() -> Response:
        try:
            user_id = identity.from_query(request.args)
        except identity.IdentityError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from None
        if request.mimetype not in ("application/json", "text/plain"):
            raise ApiError(415, "unsupported_media_type", "send the ack as application/json")
        payload = parse_json(await request.get_data(as_text=False))
        if not isinstance(payload, dict) or not payload.keys() & {"lastEventId", "ids"}:
            raise ApiError(400, "invalid_ack", 'expected {"lastEventId": id} or {"ids": [id, ...]}')
        last = payload.get("lastEventId")
        ids = payload.get("ids", [])
        last_id = normalize_id(last) if isinstance(last, str) else None
        if "lastEventId" in payload and last_id is None:
            raise ApiError(400, "invalid_ack", "lastEventId is not a message id")
        if not isinstance(ids, list) or len(ids) > MAX_ACK_IDS:
            raise ApiError(400, "invalid_ack", f"ids must be a list of at most {MAX_ACK_IDS} ids")
        normalized = [normalize_id(i) if isinstance(i, str) else None for i in ids]
        valid = [i for i in normalized if i is not None]
        if len(valid) != len(ids):
            raise ApiError(400, "invalid_ack", "ids must all be message ids")
        if valid:
            await store.ack(connector.id, user_id, valid)
        if last_id is not None:
            await store.ack_through(connector.id, user_id, last_id)
        response = Response(b"", 204)
        del response.headers["Content-Type"]
        return response

    return ack
