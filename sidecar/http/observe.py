"""Request ids: ASGI middleware around both listeners' applications.

Each HTTP request gets an id: the client's `X-Request-ID` when it sent a sane one, else a
new one. It is set in `sidecar.logs.request_id` for the whole request (so every log line
and every JSON error body of the request carries it) and echoed in the `X-Request-ID`
response header. At DEBUG level each finished request is logged (method, path without
the query string, status, duration); for a stream that is when the stream ends.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hypercorn.typing import ASGIReceiveCallable as Receive
from hypercorn.typing import ASGISendCallable as Send
from hypercorn.typing import Scope

from sidecar.errors import ApiError
from sidecar.http.common import error_answer
from sidecar.logs import pick_request_id, request_id

log = logging.getLogger("sidecar.http.access")


class RequestIds:
    """Wraps the ASGI app `app`; a request whose line and headers take more than
    `max_header_bytes` is answered 431 here (hypercorn's own limit only bounds what it
    buffers of an incomplete request)."""

    def __init__(self, app: Any, max_header_bytes: int | None = None) -> None:
        self._app = app
        self._max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)  # type: ignore[no-any-return]
        given = next(
            (bytes(v).decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"),
            None,
        )
        rid = pick_request_id(given)
        send_with_id = SendWithId(send, (b"x-request-id", rid.encode()))

        token = request_id.set(rid)
        started = time.monotonic()
        try:
            if self._max_header_bytes is not None and _header_size(scope) > self._max_header_bytes:
                await _too_large(send_with_id, self._max_header_bytes)
            else:
                await self._app(scope, receive, send_with_id)
        finally:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s %s %d %.1fms",
                    scope["method"],
                    scope["path"],
                    send_with_id.status,
                    (time.monotonic() - started) * 1000,
                )
            request_id.reset(token)


class SendWithId:
    """The `send` RequestIds hands the application: the response head gets the request id
    header. Nothing else changes, so once the head is sent a long response (a stream) may
    write its body through `inner` directly, one call layer less per write."""

    __slots__ = ("header", "inner", "status")

    def __init__(self, inner: Send, header: tuple[bytes, bytes]) -> None:
        self.inner = inner
        self.header = header
        self.status = 0

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message = {**message, "headers": [*message.get("headers", ()), self.header]}
        await self.inner(message)


def _header_size(scope: Any) -> int:
    """Bytes of the request line and headers, as sent (give or take the separators)."""
    size = len(scope["method"]) + len(scope.get("raw_path") or scope["path"]) + 12
    size += len(scope["query_string"]) + 1
    for name, value in scope["headers"]:
        size += len(name) + len(value) + 4
    return int(size)


async def _too_large(send: Any, limit: int) -> None:
    status, headers, body = error_answer(
        ApiError(
            431,
            "request_header_fields_too_large",
            f"the request line and headers are over {limit} bytes",
        )
    )
    encoded = [(name.lower().encode(), value.encode()) for name, value in headers]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*encoded, (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
