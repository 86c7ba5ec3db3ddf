"""The bot-facing listener: the send API, health, metrics and the OpenAPI document.

A 202 means the message is committed to the store; it is then queued on this instance's
open streams of the recipient without waiting for them. Bad input changes nothing.
"""

from __future__ import annotations

import dataclasses
import hmac
from functools import partial
from importlib import resources
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio

from sidecar.config import Settings
from sidecar.http.common import (
    ApiError,
    install_error_handlers,
    install_health_routes,
    json_response,
    parse_json,
)
from sidecar.hub import Hub
from sidecar.identity import MAX_USER_ID_LENGTH
from sidecar.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.protocol.message import Message, new_id
from sidecar.protocol.sse import dumps
from sidecar.store.base import Store

_FIELDS = {"connectorId", "recipientId", "response"}
# The API description, checked in (sidecar/static/openapi.json) and served as it is.
OPENAPI_PATH = "static/openapi.json"
# Routes that need no bearer token: nothing in them is secret or changes anything.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


def parse_item(item: Any, settings: Settings, where: str = "") -> tuple[str, str, dict[str, Any]]:
    """Validate one send request object; raises ApiError naming the problem."""
    if not isinstance(item, dict):
        raise ApiError(400, "invalid_request", f"{where}expected a JSON object")
    missing = sorted(_FIELDS - item.keys())
    if missing:
        raise ApiError(400, "missing_field", f"{where}missing field(s): {', '.join(missing)}")
    unknown = sorted(item.keys() - _FIELDS)
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
    if len(recipient_id) > MAX_USER_ID_LENGTH:
        raise ApiError(
            400, "invalid_field", f"{where}recipientId is longer than {MAX_USER_ID_LENGTH}"
        )
    if not isinstance(response, dict):
        raise ApiError(400, "invalid_field", f"{where}response must be a JSON object")
    if settings.connector(connector_id) is None:
        raise ApiError(404, "unknown_connector", f"{where}no connector {connector_id!r}")
    try:
        size = len(dumps(response).encode())
        recipient_id.encode()
    except UnicodeEncodeError:
        # json.loads accepts lone surrogates ("\ud800"); no browser or store can take them.
        raise ApiError(400, "invalid_field", f"{where}text is not valid Unicode") from None
    if size > settings.max_payload_bytes:
        raise ApiError(
            413, "payload_too_large", f"{where}response is over {settings.max_payload_bytes} bytes"
        )
    return connector_id, recipient_id, response


@dataclasses.dataclass(eq=False)
class _Saved:
    """One send's messages, saved, waiting for their turn to be dispatched."""

    messages: list[Message]
    since: float
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    dispatched: trio.Event = dataclasses.field(default_factory=trio.Event)

    def dispatch(self, hub: Hub) -> None:
        for m in self.messages:
            delivered = hub.dispatch(m)
            if delivered:
                hub.metrics.await_first_write(m.id, self.since)
            self.results.append({"id": m.id, "deliveredTo": delivered})
        self.dispatched.set()


async def store_and_dispatch(
    store: Store, hub: Hub, items: list[tuple[str, str, dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Commit validated items (from `parse_item`) to the store, then queue each on this
    instance's open streams of its recipient; the send API's answer for each.

    Saves run concurrently, but dispatch follows id order (`Sequencer`): the ids and the
    ticket are taken in one step, with no checkpoint in between."""
    messages = [Message(new_id(), c, r, response) for c, r, response in items]
    ticket = hub.sequencer.take()
    batch = _Saved(messages, hub.metrics.clock())
    saved = False
    try:
        await store.save(messages)
        saved = True
    finally:
        # A failed save still finishes its ticket, so the sends behind it go out.
        for dispatch in hub.sequencer.finish(
            ticket, partial(batch.dispatch, hub) if saved else None
        ):
            dispatch()
    # Dispatched by now, or as soon as the sends before it are saved (or have failed).
    await batch.dispatched.wait()
    return batch.results


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
    app = QuartTrio("sidecar.send")
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_payload_bytes, settings.max_batch_bytes)
    install_error_handlers(app)
    install_health_routes(app, store)
    token = settings.send_token.encode() if settings.send_token else None
    openapi = resources.files("sidecar").joinpath(OPENAPI_PATH).read_bytes()

    @app.before_request
    async def authenticate() -> None:
        if token is None or request.path in OPEN_PATHS:
            return
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token):
            raise ApiError(401, "unauthorized", "a valid bearer token is required")

    @app.post("/v1/send")
    async def send() -> Response:
        item = parse_item(await json_body(settings.max_payload_bytes), settings)
        (result,) = await store_and_dispatch(store, hub, [item])
        return json_response(result, 202)

    @app.post("/v1/send/batch")
    async def send_batch() -> Response:
        payload = await json_body(settings.max_batch_bytes)
        if not isinstance(payload, list):
            raise ApiError(400, "invalid_request", "expected a JSON array of send requests")
        if len(payload) > settings.max_batch_items:
            raise ApiError(
                413, "too_many_items", f"a batch holds at most {settings.max_batch_items} items"
            )
        items = [parse_item(item, settings, f"item {i}: ") for i, item in enumerate(payload)]
        return json_response({"results": await store_and_dispatch(store, hub, items)}, 202)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(hub.metrics.exposition(), content_type=METRICS_CONTENT_TYPE)

    @app.get("/openapi.json")
    async def openapi_document() -> Response:
        return Response(openapi, content_type="application/json")

    return app
