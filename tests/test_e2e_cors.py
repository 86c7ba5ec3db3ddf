"""CORS on the public listener end to end, and the browser client it serves."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.sidecar_harness import Sidecar, running_sidecar, settings_for

ORIGIN = "https://a.example"


async def stream_headers(sidecar: Sidecar, url: str, **headers: str) -> httpx.Headers:
    """The response headers of a stream request (any status), without reading the stream."""
    async with sidecar.client.stream("GET", url, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
        return response.headers


async def post_ack(sidecar: Sidecar, origin: str, user: str | None = "alice") -> httpx.Response:
    query = f"?userId={user}" if user else ""
    return await sidecar.client.post(
        f"{sidecar.public}/io/app/web/sse/ack{query}",
        content=json.dumps({"ids": []}).encode(),
        headers={"Content-Type": "text/plain", "Origin": origin},
    )


def assert_allowed(headers: httpx.Headers, origin: str, *, credentials: bool = False) -> None:
    assert headers.get("access-control-allow-origin") == origin, headers
    assert "origin" in [v.strip().lower() for v in headers.get("vary", "").split(",")], headers
    if credentials:
        assert headers.get("access-control-allow-credentials") == "true", headers
    else:
        assert "access-control-allow-credentials" not in headers, headers


def assert_not_allowed(headers: httpx.Headers) -> None:
    assert "access-control-allow-origin" not in headers, headers
    assert "access-control-allow-credentials" not in headers, headers


async def test_default_pattern_allows_any_origin(sidecar: Sidecar) -> None:
    headers = await stream_headers(sidecar, sidecar.stream_url("alice"), Origin=ORIGIN)
    assert headers["content-type"] == "text/event-stream;charset=UTF-8"
    assert_allowed(headers, ORIGIN)

    reply = await post_ack(sidecar, ORIGIN)
    assert reply.status_code == 204, reply.text
    assert_allowed(reply.headers, ORIGIN)

    for path in ("/healthz", "/readyz", "/sidecar-sse.js"):
        reply = await sidecar.client.get(f"{sidecar.public}{path}", headers={"Origin": ORIGIN})
        assert reply.status_code == 200, reply.text
        assert_allowed(reply.headers, ORIGIN)


async def test_error_answers_carry_cors_headers_too(sidecar: Sidecar) -> None:
    # A browser can only read why a request failed when the error is CORS-readable.
    url = f"{sidecar.public}/io/app/web/sse"
    assert_allowed(await stream_headers(sidecar, url, Origin=ORIGIN), ORIGIN)
    url = sidecar.stream_url("alice")
    headers = await stream_headers(sidecar, url, Origin=ORIGIN, **{"Last-Event-ID": "nope"})
    assert_allowed(headers, ORIGIN)
    reply = await post_ack(sidecar, ORIGIN, user=None)
    assert reply.status_code == 400
    assert_allowed(reply.headers, ORIGIN)


async def test_no_origin_no_cors_headers(sidecar: Sidecar) -> None:
    assert_not_allowed(await stream_headers(sidecar, sidecar.stream_url("alice")))
    reply = await sidecar.client.get(f"{sidecar.public}/healthz")
    assert_not_allowed(reply.headers)


@pytest.mark.parametrize(
    "origin",
    [
        "https://bad.example",
        "https://good.example.evil",  # the pattern must match in full
        "https://goodxexample",  # the dot is escaped
        "http://good.example",
    ],
)
async def test_pattern_refuses_other_origins(tmp_path: Path, origin: str) -> None:
    settings = settings_for(tmp_path, SIDECAR_CORS_PATTERN=r"https://good\.example")
    async with running_sidecar(settings) as sidecar:
        # Refused origins still get their answer; the browser just cannot read it.
        assert_not_allowed(await stream_headers(sidecar, sidecar.stream_url(), Origin=origin))
        reply = await post_ack(sidecar, origin)
        assert reply.status_code == 204
        assert_not_allowed(reply.headers)
        reply = await sidecar.client.get(f"{sidecar.public}/healthz", headers={"Origin": origin})
        assert_not_allowed(reply.headers)
        reply = await sidecar.client.options(
            sidecar.stream_url(),
            headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
        )
        assert reply.status_code == 204
        assert_not_allowed(reply.headers)
        assert "access-control-allow-methods" not in reply.headers

        good = "https://good.example"
        assert_allowed(await stream_headers(sidecar, sidecar.stream_url(), Origin=good), good)
        assert_allowed((await post_ack(sidecar, good)).headers, good)


async def test_credentials_setting(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_CORS_CREDENTIALS="true")
    async with running_sidecar(settings) as sidecar:
        headers = await stream_headers(sidecar, sidecar.stream_url(), Origin=ORIGIN)
        assert_allowed(headers, ORIGIN, credentials=True)
        assert_allowed((await post_ack(sidecar, ORIGIN)).headers, ORIGIN, credentials=True)
        reply = await sidecar.client.get(f"{sidecar.public}/healthz", headers={"Origin": ORIGIN})
        assert_allowed(reply.headers, ORIGIN, credentials=True)
        reply = await sidecar.client.options(
            sidecar.stream_url(),
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"},
        )
        assert_allowed(reply.headers, ORIGIN, credentials=True)


@pytest.mark.parametrize("path", ["/io/app/web/sse", "/io/app/web/sse/ack"])
async def test_preflight(sidecar: Sidecar, path: str) -> None:
    reply = await sidecar.client.options(
        f"{sidecar.public}{path}?userId=alice",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, last-event-id, x-custom",
        },
    )
    assert reply.status_code == 204, reply.text
    assert reply.content == b""
    assert_allowed(reply.headers, ORIGIN)
    methods = {m.strip() for m in reply.headers["access-control-allow-methods"].split(",")}
    assert {"GET", "POST"} <= methods
    assert reply.headers["access-control-allow-headers"] == "content-type, last-event-id, x-custom"
    assert int(reply.headers["access-control-max-age"]) > 0

    # Without Access-Control-Request-Headers the usual ones are allowed.
    reply = await sidecar.client.options(
        f"{sidecar.public}{path}",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"},
    )
    assert reply.status_code == 204
    allowed = {h.strip().lower() for h in reply.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "last-event-id"} <= allowed


async def test_browser_client_is_served(sidecar: Sidecar) -> None:
    reply = await sidecar.client.get(f"{sidecar.public}/sidecar-sse.js")
    assert reply.status_code == 200
    content_type = reply.headers["content-type"].split(";")[0].strip()
    assert content_type in ("text/javascript", "application/javascript")
    assert "SidecarSSE" in reply.text
    # Only on the public listener.
    reply = await sidecar.client.get(f"{sidecar.send_url}/sidecar-sse.js")
    assert reply.status_code == 404
