"""What both listeners share: JSON errors, CORS rules, health routes.

`error_answer` is where a `SidecarError` (sidecar/errors.py) becomes an HTTP answer, on
the Quart routes (`install_error_handlers`) and the plain ASGI ones alike.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from quart import Quart, Response
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from sidecar.errors import ApiError, SidecarError
from sidecar.logs import current_request_id
from sidecar.store.base import Store, StoreUnavailable

log = logging.getLogger("sidecar.http")


class _NotFinite(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotFinite(name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: beyond a double
        raise _NotFinite(text)
    return value


def parse_json(body: str | bytes) -> Any:
    """Strict JSON: no NaN or Infinity, which browsers' JSON.parse refuses, whether written
    as such or as a number beyond a double (`1e999`, which would be written back as
    `Infinity`); ApiError 400 when `body` is not that."""
    try:
        return json.loads(body, parse_constant=_reject_constant, parse_float=_finite)
    except _NotFinite:
        raise ApiError(
            400, "invalid_json", "the body is not valid JSON: numbers must be finite"
        ) from None
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None


def error_body(code: str, message: str) -> bytes:
    """{"error": {"code", "message", "requestId"}}; the request id is the current request's
    (see sidecar.http.observe), left out outside a request."""
    error = {"code": code, "message": message}
    rid = current_request_id()
    if rid is not None:
        error["requestId"] = rid
    return json.dumps({"error": error}).encode()


def error_answer(exc: SidecarError) -> tuple[int, list[tuple[str, str]], bytes]:
    """The status, headers and JSON body that answer `exc`; an error answered 500 is
    logged here, with its traceback (its message, which the client is not shown, says
    what went wrong)."""
    if exc.status == 500:
        log.error("request failed: %s", exc, exc_info=exc)
    headers = [("Content-Type", "application/json")]
    if exc.retry_after is not None:
        headers.append(("Retry-After", str(exc.retry_after)))
    return exc.status, headers, error_body(exc.code, exc.public_message)


def store_unavailable_body() -> bytes:
    """The body of a 503 for a store that did not answer (sent with Retry-After: 1)."""
    return error_answer(StoreUnavailable())[2]


def http_error_code(exc: HTTPException) -> str:
    """A werkzeug error's name as an error code: "Payload Too Large" -> payload_too_large."""
    return (exc.name or "error").lower().replace(" ", "_")


def json_response(body: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")), status=status, content_type="application/json"
    )


def install_error_handlers(app: Quart) -> None:
    """Every error leaves as JSON, werkzeug's own (404, 405, 413) included."""

    @app.errorhandler(SidecarError)
    async def sidecar_error(exc: SidecarError) -> Response:
        status, headers, body = error_answer(exc)
        return Response(body, status, Headers(headers))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        response = Response(
            error_body(http_error_code(exc), exc.description or exc.name or "error"),
            exc.code or 500,
            content_type="application/json",
        )
        if exc.code == 405 and exc.response is None and hasattr(exc, "valid_methods"):
            response.headers["Allow"] = ", ".join(exc.valid_methods or ())
        return response


def install_health_routes(app: Quart, store: Store, *, details: bool) -> None:
    """/healthz and /readyz; with `details`, /readyz also shows what the store says of
    itself, or why it is unavailable (host names, ports): the send listener's, not the
    public one's."""

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        try:
            found = await store.ping()
        except StoreUnavailable as exc:
            store_says = {"store": {"error": str(exc)}} if details else {}
            return json_response({"status": "unavailable"} | store_says, 503)
        return json_response({"status": "ok"} | ({"store": found} if details else {}))


def cors_headers(
    origin: str | None, pattern: re.Pattern[str], credentials: bool
) -> list[tuple[str, str]]:
    """Headers that let `origin` read a response, or none when it may not."""
    if origin is None or pattern.fullmatch(origin) is None:
        return []
    headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
    if credentials:
        headers.append(("Access-Control-Allow-Credentials", "true"))
    return headers


def preflight_headers(
    origin: str | None,
    request_headers: str | None,
    pattern: re.Pattern[str],
    credentials: bool,
) -> list[tuple[str, str]]:
    """The answer to an OPTIONS preflight: CORS headers plus what may be sent."""
    headers = cors_headers(origin, pattern, credentials)
    if headers:
        headers.append(("Access-Control-Allow-Methods", "GET, POST, OPTIONS"))
        headers.append(
            ("Access-Control-Allow-Headers", request_headers or "Content-Type, Last-Event-ID")
        )
        headers.append(("Access-Control-Max-Age", "600"))
    return headers
