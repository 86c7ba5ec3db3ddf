"""The bot-facing listener: the send API, health, metrics and the OpenAPI document.

A 202 means the message is committed to the store; streams get it from the store's feed
(sidecar/stream.py). Bad input changes nothing.

`SendApp` serves the two send routes as plain ASGI in front of the quart-trio app (the
busiest routes skip the framework's per-request work: request context, a reader task,
the response object): a request it can take on its headers alone (POST, a JSON content
type, a Content-Length within the limit, the bearer token when one is set) is answered
here, with the same validation, statuses and JSON bodies; anything else (a wrong or
missing token, another content type, a chunked or oversized body) goes to Quart, whose
answers it already gives.
"""

from __future__ import annotations

import hmac
import json
import logging
from importlib import resources
from typing import Any, NamedTuple

from hypercorn.typing import ASGIReceiveCallable as Receive
from hypercorn.typing import ASGISendCallable as Send
from hypercorn.typing import Scope
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import InternalServerError, RequestEntityTooLarge

from sidecar.config import Settings
from sidecar.errors import ApiError
from sidecar.http.common import (
    error_body,
    http_error_code,
    install_error_handlers,
    install_health_routes,
    json_response,
    parse_json,
    store_unavailable_body,
)
from sidecar.http.scrape import install_metrics_route
from sidecar.hub import Hub
from sidecar.identity import user_id_problem
from sidecar.protocol import tock
from sidecar.protocol.message import (
    Message,
    NotStorable,
    check_storable,
    idempotent_id,
    is_idempotency_key,
    new_id,
)
from sidecar.protocol.sse import dumps
from sidecar.store.base import Store, StoreUnavailable

log = logging.getLogger("sidecar.send")

_FIELDS = {"connectorId", "recipientId", "response"}
_OPTIONAL_FIELDS = {"idempotencyKey"}
IDEMPOTENCY_KEY = "Idempotency-Key"


class Item(NamedTuple):
    """One validated send request."""

    connector_id: str
    recipient_id: str
    response: dict[str, Any]
    key: str | None = None  # its Idempotency-Key


# The API description, checked in (sidecar/static/openapi.json) and served as it is.
OPENAPI_PATH = "static/openapi.json"
# Routes that need no bearer token: nothing in them is secret or changes anything.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


def parse_item(item: Any, settings: Settings, where: str = "", key: str | None = None) -> Item:
    """Validate one send request object, whose Idempotency-Key is `key` unless it has an
    `idempotencyKey` of its own; raises ApiError naming the problem."""
    if not isinstance(item, dict):
        raise ApiError(400, "invalid_request", f"{where}expected a JSON object")
    missing = sorted(_FIELDS - item.keys())
    if missing:
        raise ApiError(400, "missing_field", f"{where}missing field(s): {', '.join(missing)}")
    unknown = sorted(item.keys() - _FIELDS - _OPTIONAL_FIELDS)
    if unknown:
        raise ApiError(400, "unknown_field", f"{where}unknown field(s): {', '.join(unknown)}")
    connector_id, recipient_id, response = (
        item["connectorId"],
        item["recipientId"],
        item["response"],
    )
    if not isinstance(connector_id, str):
        raise ApiError(400, "invalid_field", f"{where}connectorId must be a string")
    if not isinstance(recipient_id, str) or not recipient_id:
        raise ApiError(400, "invalid_field", f"{where}recipientId must be a non-empty string")
    problem = user_id_problem(recipient_id)
    if problem is not None:
        raise ApiError(400, "invalid_field", f"{where}recipientId {problem}")
    if not isinstance(response, dict):
        raise ApiError(400, "invalid_field", f"{where}response must be a JSON object")
    try:
        check_storable(response)
    except NotStorable as exc:
        raise ApiError(400, "invalid_field", f"{where}response {exc}") from None
    if settings.tock_responses:
        try:
            tock.check(response)
        except tock.NotDecodable as exc:
            raise ApiError(
                400,
                "invalid_response",
                f"{where}{exc}, or Tock cannot decode it (SIDECAR_RESPONSE_SCHEMA=tock)",
            ) from None
    if settings.connector(connector_id) is None:
        raise ApiError(404, "unknown_connector", f"{where}no connector {connector_id!r}")
    try:
        size = len(dumps(response).encode())
    except UnicodeEncodeError:
        # json.loads accepts lone surrogates ("\ud800"); no browser or store can take them.
        raise ApiError(400, "invalid_field", f"{where}text is not valid Unicode") from None
    if size > settings.max_payload_bytes:
        raise ApiError(
            413, "payload_too_large", f"{where}response is over {settings.max_payload_bytes} bytes"
        )
    own = item.get("idempotencyKey")
    if own is not None and not is_idempotency_key(own):
        raise ApiError(
            400, "invalid_field", f"{where}idempotencyKey must be 1 to 200 visible ASCII characters"
        )
    if own is not None and key is not None and own != key:
        raise ApiError(400, "invalid_field", f"{where}idempotencyKey differs from the header")
    return Item(connector_id, recipient_id, response, own if own is not None else key)


def parse_key(value: str | None) -> str | None:
    """The Idempotency-Key header's value (None without one); ApiError when invalid."""
    if value is None:
        return None
    if not is_idempotency_key(value):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"{IDEMPOTENCY_KEY} must be 1 to 200 visible ASCII characters",
        )
    return value


def parse_batch(payload: Any, settings: Settings, key: str | None = None) -> list[Item]:
    """Validate a batch send request (a JSON array of `parse_item` objects); with a batch
    Idempotency-Key `key`, an item without a key of its own takes `<key>#<index>`."""
    if not isinstance(payload, list):
        raise ApiError(400, "invalid_request", "expected a JSON array of send requests")
    if len(payload) > settings.max_batch_items:
        raise ApiError(
            413, "too_many_items", f"a batch holds at most {settings.max_batch_items} items"
        )
    items = []
    for i, item in enumerate(payload):
        own = item.get("idempotencyKey") if isinstance(item, dict) else None
        items.append(
            parse_item(item, settings, f"item {i}: ", own or (f"{key}#{i}" if key else None))
        )
    return items


async def store_messages(store: Store, hub: Hub, items: list[Item]) -> list[dict[str, Any]]:
    """Commit validated items (from `parse_item`) to the store, in their order; the send
    API's answer for each. Nothing is dispatched from here: every stream is fed from the
    store's feed, in its user's log order (docs/delivery.md). `deliveredTo` counts the
    recipient's streams open on this instance.

    An item with an Idempotency-Key has the id `idempotent_id` gives it: a retry finds the
    first attempt stored and stores nothing; an item whose recipient or response differs
    from what its key stored is refused (409) before anything is saved."""
    metrics = hub.metrics
    since = metrics.clock()
    messages = [
        Message(idempotent_id(i.connector_id, i.key) if i.key else new_id(), *i[:3]) for i in items
    ]
    keyed = [m for m, i in zip(messages, items, strict=True) if i.key is not None]
    stored = {m.id for m in keyed if await _stored_as(store, m)}
    results = []
    for m in messages:
        streams = hub.stream_count(m.key)
        if streams and m.id not in stored:
            metrics.await_first_write(m.id, since)
        results.append({"id": m.id, "deliveredTo": streams})
    fresh = [m for m in messages if m.id not in stored]
    if fresh:
        already = await store.save(fresh)
        # A first attempt committed meanwhile (a retry sent while it was in flight).
        for m in fresh:
            if m.id in already:
                await _stored_as(store, m)
    return results


async def _stored_as(store: Store, message: Message) -> bool:
    """Whether a message of `message`'s id is stored; ApiError 409 when it is not this one."""
    found = await store.get(message.id)
    if found is None:
        return False
    same = (found.connector_id, found.recipient_id, found.response) == (
        message.connector_id, message.recipient_id, message.response,
    )  # fmt: skip
    if not same:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"this {IDEMPOTENCY_KEY} was used for another message",
        )
    return True


def _bearer_ok(given: str, token: bytes) -> bool:
    """Whether an Authorization header value carries `token` as a bearer token."""
    scheme, _, value = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token)


async def json_body(limit: int) -> Any:
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
    body = await request.get_data(as_text=False)
    if len(body) > limit:
        raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
    return parse_json(body)


def build_send_app(settings: Settings, hub: Hub, store: Store) -> QuartTrio:
    # No static folder: Quart's default would serve `<cwd>/static/` at `/static/`.
    app = QuartTrio("sidecar.send", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_payload_bytes, settings.max_batch_bytes)
    install_error_handlers(app)
    install_health_routes(app, store, details=True)
    token = settings.send_token.encode() if settings.send_token else None
    openapi = resources.files("sidecar").joinpath(OPENAPI_PATH).read_bytes()

    @app.before_request
    async def authenticate() -> None:
        if token is None or request.path in OPEN_PATHS:
            return
        if not _bearer_ok(request.headers.get("Authorization", ""), token):
            raise ApiError(401, "unauthorized", "a valid bearer token is required")

    @app.errorhandler(RequestEntityTooLarge)
    async def body_too_large(exc: RequestEntityTooLarge) -> Response:
        # A body with no Content-Length that runs past MAX_CONTENT_LENGTH: the same answer
        # as one over its route's limit.
        batch = request.path == "/v1/send/batch"
        limit = settings.max_batch_bytes if batch else settings.max_payload_bytes
        body = error_body("payload_too_large", f"the body is over {limit} bytes")
        return Response(body, 413, content_type="application/json")

    @app.post("/v1/send")
    async def send() -> Response:
        key = parse_key(request.headers.get(IDEMPOTENCY_KEY))
        item = parse_item(await json_body(settings.max_payload_bytes), settings, key=key)
        (result,) = await store_messages(store, hub, [item])
        return json_response(result, 202)

    @app.post("/v1/send/batch")
    async def send_batch() -> Response:
        key = parse_key(request.headers.get(IDEMPOTENCY_KEY))
        items = parse_batch(await json_body(settings.max_batch_bytes), settings, key)
        return json_response({"results": await store_messages(store, hub, items)}, 202)

    install_metrics_route(app, hub.metrics)

    @app.get("/openapi.json")
    async def openapi_document() -> Response:
        return Response(openapi, content_type="application/json")

    return app


_JSON_HEADERS = (b"content-type", b"application/json")
_INTERNAL_ERROR = InternalServerError()


class SendApp:
    """The ASGI application of the send listener: the send routes' fast path in front of
    `build_send_app`'s Quart app (see the module docstring)."""

    def __init__(self, settings: Settings, hub: Hub, store: Store) -> None:
        self._settings = settings
        self._hub = hub
        self._store = store
        self._token = settings.send_token.encode() if settings.send_token else None
        self._limits = {
            "/v1/send": settings.max_payload_bytes,
            "/v1/send/batch": settings.max_batch_bytes,
        }
        self.quart = build_send_app(settings, hub, store)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            limit = self._limits.get(scope["path"])
            if limit is not None and self._takes(scope["headers"], limit):
                key = _header(scope["headers"], b"idempotency-key")
                return await self._serve(scope["path"], limit, key, receive, send)
        await self.quart(scope, receive, send)

    def _takes(self, headers: Any, limit: int) -> bool:
        """Whether the request can be served here: what Quart would refuse before reading
        the body (token, content type, declared size) is left to Quart."""
        content_type = content_length = authorization = None
        for name, value in headers:
            if name == b"content-type":
                if content_type is None:
                    content_type = value
            elif name == b"content-length":
                if content_length is not None:
                    return False
                content_length = value
            elif name == b"authorization":
                if authorization is None:
                    authorization = value
            elif name == b"transfer-encoding":
                return False
        if content_length is None or not content_length.isdigit() or int(content_length) > limit:
            return False
        if content_type is None or _mimetype(content_type) != "application/json":
            return False
        token = self._token
        return token is None or (
            authorization is not None and _bearer_ok(bytes(authorization).decode("latin-1"), token)
        )

    async def _serve(
        self, path: str, limit: int, raw_key: str | None, receive: Receive, send: Send
    ) -> None:
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body was complete
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
                size += len(chunk)
            if not message.get("more_body", False):
                break
        status = 202
        try:
            if size > limit:
                raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
            key = parse_key(raw_key)
            payload = parse_json(b"".join(chunks))
            if path == "/v1/send":
                item = parse_item(payload, self._settings, key=key)
                (result,) = await store_messages(self._store, self._hub, [item])
                body = _compact(result)
            else:
                items = parse_batch(payload, self._settings, key)
                body = _compact({"results": await store_messages(self._store, self._hub, items)})
        except ApiError as exc:
            status, body = exc.status, error_body(exc.code, exc.message)
        except StoreUnavailable:
            return await _respond(send, 503, store_unavailable_body(), (b"retry-after", b"1"))
        except Exception:
            log.exception("Exception on request POST %s", path)
            status, error = 500, _INTERNAL_ERROR
            body = error_body(http_error_code(error), error.description or "error")
        await _respond(send, status, body)


def _header(headers: Any, name: bytes) -> str | None:
    """The first value of header `name` (lowercase), as text."""
    for key, value in headers:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _mimetype(content_type: bytes) -> str:
    return bytes(content_type).partition(b";")[0].strip().decode("latin-1").lower()


def _compact(body: Any) -> bytes:
    """As `json_response` encodes a body."""
    return json.dumps(body, separators=(",", ":")).encode()


async def _respond(send: Send, status: int, body: bytes, *extra: tuple[bytes, bytes]) -> None:
    """One response as Quart gives it (content type, then length), in two ASGI messages."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
