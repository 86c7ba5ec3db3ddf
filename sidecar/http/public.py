"""The browser-facing listener: SSE streams, acks, CORS, the browser client, health.

The stream route is plain ASGI: it hands `serve_stream` a sink that writes body chunks and
runs it until the client goes: under hypercorn a callback says so (sidecar/http/
hypercorn_patches.py), elsewhere a task next to it in one nursery per connection waits for
`http.disconnect`. Everything else is a quart-trio app.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import trio
from hypercorn.typing import ASGIReceiveCallable as Receive
from hypercorn.typing import ASGISendCallable as Send
from hypercorn.typing import HTTPScope, WWWScope
from hypercorn.typing import Scope as AnyScope
from quart import Response, request
from quart_trio import QuartTrio

from sidecar import identity
from sidecar.config import Connector, Settings
from sidecar.errors import ApiError, SidecarError
from sidecar.http.common import (
    cors_headers,
    error_answer,
    install_error_handlers,
    install_health_routes,
    parse_json,
    preflight_headers,
)
from sidecar.http.demo import install_demo_routes
from sidecar.http.hypercorn_patches import disconnect_callbacks
from sidecar.http.observe import SendWithId
from sidecar.hub import Hub
from sidecar.protocol.message import normalize_id
from sidecar.store.base import Store
from sidecar.stream import SentMarker, StreamOptions, sent_back_position, serve_stream

log = logging.getLogger("sidecar.http")

# An origin no deployment lets in on purpose: a pattern that matches it matches any site.
ANY_SITE = "https://any-site.invalid"

SSE_HEADERS = [
    (b"content-type", b"text/event-stream;charset=UTF-8"),
    (b"cache-control", b"no-cache"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]
# Seconds a stream request refused for SIDECAR_MAX_STREAMS is told to wait, or one refused
# while the instance drains.
STREAMS_RETRY_AFTER = 5
DRAINING_RETRY_AFTER = 1
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
        self._starting = 0  # streams let in whose head is being sent (see `_stream`)
        self._streams = {c.stream_path: c for c in settings.connectors}
        self._options = StreamOptions(
            keepalive=settings.keepalive_seconds,
            replay_sent=settings.replay_sent,
            replay_page=settings.replay_page,
        )
        self._policies = {c.id: identity.policy_for(settings, c) for c in settings.connectors}
        self._credentials = _credentials(settings, self._policies)
        paths = [p for c in settings.connectors for p in (c.stream_path, c.ack_path)]
        if any(map(self._credentials, paths)) and settings.cors_pattern.fullmatch(ANY_SITE):
            log.warning(
                "SIDECAR_CORS_PATTERN lets in every origin while CORS allows credentials"
                " (cookie identity or SIDECAR_CORS_CREDENTIALS): any site can read the"
                " streams of its visitors; set it to the origins of the sites with the chat"
            )
        self._quart = _quart_app(settings, store, self._policies, self._credentials)
        if settings.demo:
            install_demo_routes(self._quart, settings, hub, store)

    async def __call__(self, scope: AnyScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["method"] == "OPTIONS":
                return await self._preflight(scope, send)
            connector = self._streams.get(scope["path"])
            if connector is not None:
                if scope["method"] != "GET":
                    refusal = ApiError(405, "method_not_allowed", "the stream takes GET")
                    return await self._error(scope, send, refusal, b"GET")
                return await self._stream(connector, scope, receive, send)
        await self._quart(scope, receive, send)

    def _cors(self, scope: HTTPScope) -> list[tuple[bytes, bytes]]:
        origin = _header(scope, b"origin")
        credentials = self._credentials(scope["path"])
        return [
            (name.lower().encode(), value.encode())
            for name, value in cors_headers(origin, self._settings.cors_pattern, credentials)
        ]

    async def _preflight(self, scope: HTTPScope, send: Send) -> None:
        headers = preflight_headers(
            _header(scope, b"origin"),
            _header(scope, b"access-control-request-headers"),
            self._settings.cors_pattern,
            self._credentials(scope["path"]),
        )
        encoded = [(n.lower().encode(), v.encode()) for n, v in headers]
        await _respond(send, 204, encoded, b"")

    async def _error(
        self, scope: HTTPScope, send: Send, exc: SidecarError, allow: bytes = b""
    ) -> None:
        status, headers, body = error_answer(exc)
        encoded = [(name.lower().encode(), value.encode()) for name, value in headers]
        encoded += self._cors(scope)
        if allow:
            encoded.append((b"allow", allow))
        await _respond(send, status, encoded, body)

    async def _stream(
        self, connector: Connector, scope: HTTPScope, receive: Receive, send: Send
    ) -> None:
        if self._credentials(scope["path"]):
            forged = _forged(
                lambda name: _header(scope, name.encode()),
                _header(scope, b"host"),
                self._settings.cors_pattern,
                "open this stream",
            )
            if forged is not None:
                return await self._error(scope, send, forged)
        try:
            query = _query(scope)
            resolved = identity.resolve(
                self._policies[connector.id], _request_view(scope, query), mint_cookie=True
            )
        except ApiError as exc:  # an IdentityError, or a query that is not UTF-8
            return await self._error(scope, send, exc)
        user_id = resolved.user_id
        set_cookie = [(b"set-cookie", resolved.set_cookie.encode())] if resolved.set_cookie else []
        # EventSource sends the header on its own reconnects; the browser client always
        # sends the query (docs/delivery.md), which names the id a reload resumes from.
        raw_last = _header(scope, b"last-event-id") or query.get("lastEventId") or None
        browser_client = "lastEventId" in query
        last_event_id = normalize_id(raw_last) if raw_last is not None else None
        if raw_last is not None and last_event_id is None:
            refusal = ApiError(400, "invalid_last_event_id", "Last-Event-ID is not a message id")
            return await self._error(scope, send, refusal)
        if self._draining.is_set():
            self._hub.metrics.streams_rejected.labels("draining").inc()
            refusal = ApiError(
                503,
                "draining",
                "this instance is shutting down",
                retry_after=DRAINING_RETRY_AFTER,
            )
            return await self._error(scope, send, refusal)
        if self._starting + self._hub.stream_count() >= self._settings.max_streams:
            self._hub.metrics.streams_rejected.labels("instance_limit").inc()
            refusal = ApiError(
                503,
                "too_many_streams",
                "this instance holds as many streams as it may; retry later",
                retry_after=STREAMS_RETRY_AFTER,
            )
            return await self._error(scope, send, refusal)
        # This frame lives as long as the stream (the stream is served inline, not from
        # another coroutine, for the same reason): drop what it no longer needs.
        del query, resolved, raw_last
        # Counted from here until the hub counts it (no request slips in between). A stream
        # the hub closes (replaced, cut off as slow) leaves the hub's count at once, while
        # its last writes may still wait, up to the write timeout, on a client that reads
        # nothing: the slot is free for another stream meanwhile.
        self._starting += 1
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": SSE_HEADERS + set_cookie + self._cors(scope),
                }
            )
        finally:
            # No checkpoint from here until the stream has subscribed to the hub (the first
            # thing `serve_stream` does).
            self._starting -= 1
        callbacks = disconnect_callbacks(scope)
        # hypercorn tells us when the client goes (http/hypercorn_patches.py): no task
        # has to wait for `http.disconnect`, and the stream's own scope is the one to
        # cancel.
        client = _ClientWatch() if callbacks is not None else None
        stream = serve_stream(
            # The head is sent: the body can skip RequestIds' wrapper (observe.py).
            _AsgiSink(send.inner if isinstance(send, SendWithId) else send),
            hub=self._hub,
            store=self._store,
            marker=self._marker,
            key=(connector.id, user_id),
            last_event_id=last_event_id,
            browser_client=browser_client,
            options=self._options,
            cancel_scope=client.scope if client is not None else None,
        )
        if callbacks is not None and client is not None:
            callbacks.append(client.gone)
            try:
                await stream
            finally:
                callbacks.remove(client.gone)
            client_gone = client.left
        else:
            client_gone = await _run_watching_disconnect(stream, receive)
        if not client_gone:
            # The hub closed the stream (slow consumer, shutdown): end the response
            # cleanly so the browser reconnects.
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class _ClientWatch:
    """Cancels the stream (`scope` is the one it runs in) when hypercorn reports its client
    gone, and remembers that it did (small: one per stream)."""

    __slots__ = ("left", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.left = False

    def gone(self) -> None:
        self.left = True
        self.scope.cancel()


async def _run_watching_disconnect(stream: Awaitable[None], receive: Receive) -> bool:
    """Await `stream` next to a task that cancels it at `http.disconnect`; whether the
    client went away."""
    client_gone = False

    async def watch_disconnect(cancel_scope: trio.CancelScope) -> None:
        nonlocal client_gone
        while (await receive())["type"] != "http.disconnect":
            pass
        client_gone = True
        cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_disconnect, nursery.cancel_scope)
        await stream
        nursery.cancel_scope.cancel()
    return client_gone


class _AsgiSink:
    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        self._send = send

    async def send(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# The fetch metadata (Sec-Fetch-Mode, Sec-Fetch-Dest) of EventSource and fetch(); an <img>
# sends no-cors/image, an <iframe> navigate/iframe, a link or the address bar
# navigate/document.
_FETCH_MODES = frozenset({"cors", "same-origin"})
_FETCH_DEST = "empty"


def _forged(
    header: Callable[[str], str | None], host: str | None, pattern: re.Pattern[str], what: str
) -> ApiError | None:
    """Why a request that the browser sends with the user's cookie is refused, if it is:
    CORS only keeps another site from reading the answer, so a route that knows its user by
    cookie refuses what another site can make a browser send, or any site could open that
    user's stream or acknowledge their messages (cross-site request forgery). `header`
    gives a request header by its lowercase name; `what` the route's act, for the message.

    Refused: an Origin that is neither let in by `pattern` nor the sidecar's own (`host`);
    with fetch metadata (every current browser), a request that is not what EventSource
    or fetch() sends, or one from another site without an Origin. A request without fetch
    metadata (an older browser, a client that is no browser) is judged by its Origin
    alone: a browser that sends no Origin on an <img> or <iframe> request and no fetch
    metadata either is not told apart from a same-site request."""
    origin = header("origin")
    own = origin is not None and urlsplit(origin).netloc == host
    if origin is not None and pattern.fullmatch(origin) is None and not own:
        return ApiError(403, "origin_not_allowed", f"this origin may not {what}")
    site, mode, dest = header("sec-fetch-site"), header("sec-fetch-mode"), header("sec-fetch-dest")
    if site is None and mode is None:
        return None
    if mode not in _FETCH_MODES or dest not in (None, _FETCH_DEST):
        return ApiError(
            403,
            "fetch_not_allowed",
            f"only EventSource or fetch() may {what} (Sec-Fetch-Mode cors, Sec-Fetch-Dest empty)",
        )
    if site not in (None, "same-origin") and origin is None:
        return ApiError(403, "origin_not_allowed", f"a request from another site may not {what}")
    return None


def _header(scope: HTTPScope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _query(scope: WWWScope) -> dict[str, str]:
    """The query parameters; ApiError 400 when a percent-escape is not UTF-8 (decoded
    loosely, different user ids would become the same replacement character)."""
    try:
        return dict(parse_qsl(scope["query_string"].decode("latin-1"), errors="strict"))
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_query", "the query string is not UTF-8") from None


def _request_view(scope: WWWScope, query: dict[str, str]) -> identity.RequestView:
    """What identity needs of a request, from its ASGI scope (stream and ack alike)."""
    client = scope.get("client")
    return identity.RequestView.build(
        query,
        [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in scope["headers"]],
        str(client[0]) if client else None,
    )


def _credentials(settings: Settings, policies: dict[str, identity.Policy]) -> Callable[[str], bool]:
    """Whether CORS answers for a path allow credentials: everywhere with
    `cors_credentials`, else on the paths of connectors whose identity is a cookie."""
    paths = {
        path
        for c in settings.connectors
        if policies[c.id].needs_credentials
        for path in (c.stream_path, c.ack_path)
    }
    return lambda path: settings.cors_credentials or path in paths


def _quart_app(
    settings: Settings,
    store: Store,
    policies: dict[str, identity.Policy],
    credentials: Callable[[str], bool],
) -> QuartTrio:
    # No static folder: Quart's default would serve `<cwd>/static/` at `/static/`.
    app = QuartTrio("sidecar.public", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_ack_bytes
    install_error_handlers(app)
    install_health_routes(app, store, details=False)
    client_js = resources.files("sidecar").joinpath("static/sidecar-sse.js").read_bytes()

    @app.after_request
    async def add_cors(response: Response) -> Response:
        for name, value in cors_headers(
            request.headers.get("Origin"), settings.cors_pattern, credentials(request.path)
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
            view_func=_ack_view(
                connector,
                store,
                policies[connector.id],
                settings.cors_pattern if credentials(connector.ack_path) else None,
            ),
            methods=["POST"],
        )
    return app


def _ack_view(
    connector: Connector,
    store: Store,
    policy: identity.Policy,
    same_site: re.Pattern[str] | None,
) -> Any:
    """The ack route; with `same_site`, it refuses cross-site requests (`_forged`)."""

    async def ack() -> Response:
        if same_site is not None:
            forged = _forged(request.headers.get, request.host, same_site, "acknowledge here")
            if forged is not None:
                raise forged
        # An IdentityError is answered as any ApiError is (`install_error_handlers`).
        view = _request_view(request.scope, _query(request.scope))
        user_id = identity.resolve(policy, view).user_id
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
        position = await sent_back_position(store, (connector.id, user_id), last_id)
        if position is not None:
            await store.acknowledge_through(connector.id, user_id, position)
        response = Response(b"", 204)
        del response.headers["Content-Type"]
        return response

    return ack
