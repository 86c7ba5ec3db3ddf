"""End to end: every configurable limit, and the HTTP answer it gives."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio

from tests.sidecar_harness import Sidecar, SseClient, running_sidecar, settings_for


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def _drain_until_closed(client: SseClient) -> None:
    """Read `client` until the server ends the response."""
    while True:
        try:
            await client.next_event()
        except StopAsyncIteration:
            return


async def _closed_by_server(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := await stream.receive_some():
        received += chunk
    return received


async def _metric(sidecar: Sidecar, line_start: str) -> float:
    text = (await sidecar.client.get(f"{sidecar.send_url}/metrics")).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {line_start} in /metrics")


# --- streams per user --------------------------------------------------------------------


async def test_a_users_oldest_stream_is_replaced_past_the_per_user_limit(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_MAX_STREAMS_PER_USER="2")
    async with running_sidecar(settings) as sc:
        hub = sc.running.hub
        async with (
            sc.stream("alice") as first,
            sc.stream("alice") as second,
            sc.stream("bob") as bob,
        ):
            assert hub.stream_count(("web", "alice")) == 2
            async with sc.stream("alice") as third:
                # The oldest ended cleanly (so EventSource reconnects); the others stay.
                with trio.fail_after(5):
                    await _drain_until_closed(first)
                assert hub.stream_count(("web", "alice")) == 2
                assert hub.stream_count(("web", "bob")) == 1
                message_id = await sc.send("alice")
                for client in (second, third):
                    assert (await client.next_message()).id == message_id
                bob_id = await sc.send("bob")
                assert (await bob.next_message()).id == bob_id
        assert await _metric(sc, 'sidecar_streams_closed_total{reason="replaced"}') == 1


async def test_per_user_limit_of_one_keeps_only_the_newest(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_MAX_STREAMS_PER_USER="1")
    async with (
        running_sidecar(settings) as sc,
        sc.stream("alice") as old,
        sc.stream("alice") as new,
    ):
        with trio.fail_after(5):
            await _drain_until_closed(old)
        message_id = await sc.send("alice")
        assert (await new.next_message()).id == message_id
        assert sc.running.hub.stream_count(("web", "alice")) == 1


# --- streams per instance ----------------------------------------------------------------


async def test_past_the_instance_stream_limit_a_stream_gets_503_with_retry_after(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path, SIDECAR_MAX_STREAMS="2")
    async with running_sidecar(settings) as sc:
        async with sc.stream("alice"):
            async with sc.stream("bob"):
                reply = await sc.client.get(
                    sc.stream_url("carol"), headers={"X-Request-ID": "limit-1"}
                )
                assert reply.status_code == 503
                assert reply.headers["retry-after"] == "5"
                assert reply.headers["content-type"] == "application/json"
                assert reply.json() == {
                    "error": {
                        "code": "too_many_streams",
                        "message": "this instance holds as many streams as it may; retry later",
                        "requestId": "limit-1",
                    }
                }
                # Other routes are not limited.
                assert (await sc.client.get(f"{sc.public}/healthz")).status_code == 200
            # One went away: there is room again (as soon as its handler has ended).
            with trio.fail_after(5):
                while True:
                    try:
                        async with sc.stream("carol") as carol:
                            message_id = await sc.send("carol")
                            assert (await carol.next_message()).id == message_id
                            break
                    except AssertionError:
                        await trio.sleep(0.02)
        rejected = 'sidecar_streams_rejected_total{reason="instance_limit"}'
        assert await _metric(sc, rejected) >= 1


# --- ack body ------------------------------------------------------------------------------


async def test_ack_body_limit_is_a_setting(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_MAX_ACK_BYTES="100")
    async with running_sidecar(settings) as sc:
        url = f"{sc.public}/io/app/web/sse/ack?userId=alice"
        small = json.dumps({"lastEventId": "0" * 24}).encode()
        large = json.dumps({"ids": ["0" * 24] * 4}).encode()
        assert len(small) <= 100 < len(large)
        headers = {"content-type": "application/json"}
        assert (await sc.client.post(url, content=small, headers=headers)).status_code == 204
        reply = await sc.client.post(url, content=large, headers=headers)
        assert reply.status_code == 413
        error = reply.json()["error"]
        assert error["code"] == "request_entity_too_large"
        assert error["requestId"] == reply.headers["x-request-id"]


# --- request header size -------------------------------------------------------------------


async def test_request_headers_over_the_limit_get_431_on_both_listeners(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_MAX_HEADER_BYTES="2048")
    async with running_sidecar(settings) as sc:
        for base in (sc.public, sc.send_url):
            fits = await sc.client.get(f"{base}/healthz", headers={"X-Pad": "a" * 1500})
            assert fits.status_code == 200
            # A fresh connection each time: the server closes the one it answers 431 on.
            async with httpx.AsyncClient(timeout=5) as client:
                reply = await client.get(f"{base}/healthz", headers={"X-Pad": "a" * 3000})
            assert reply.status_code == 431
            assert reply.headers.get("connection") == "close"
            error = reply.json()["error"]
            assert error["code"] == "request_header_fields_too_large"
            assert error["requestId"] == reply.headers["x-request-id"]
            # Past what the HTTP server buffers of an incomplete request, it answers 431
            # itself (empty body) before the application sees anything.
            async with httpx.AsyncClient(timeout=5) as client:
                reply = await client.get(f"{base}/healthz", headers={"X-Pad": "a" * 100_000})
            assert reply.status_code == 431


async def test_default_header_limit_is_16_kib(sidecar: Sidecar) -> None:
    fits = await sidecar.client.get(f"{sidecar.send_url}/healthz", headers={"X-Pad": "a" * 15000})
    assert fits.status_code == 200
    async with httpx.AsyncClient(timeout=5) as client:
        reply = await client.get(f"{sidecar.send_url}/healthz", headers={"X-Pad": "a" * 17000})
    assert reply.status_code == 431


# --- send listener timeouts ----------------------------------------------------------------


async def test_send_listener_closes_idle_keep_alive_connections(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_SEND_IDLE_SECONDS="0.3")
    async with running_sidecar(settings) as sc:
        stream = await trio.open_tcp_stream(*_host_port(sc.send_url))
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(5):
                received = await _closed_by_server(stream)
            assert received.startswith(b"HTTP/1.1 200 ")
            assert received.count(b"HTTP/1.1") == 1


async def test_send_listener_closes_a_connection_stuck_in_its_headers(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_SEND_IDLE_SECONDS="0.3")
    async with running_sidecar(settings) as sc:
        stream = await trio.open_tcp_stream(*_host_port(sc.send_url))
        async with stream:
            await stream.send_all(b"POST /v1/send HTTP/1.1\r\nHost: x\r\n")
            with trio.fail_after(5):
                assert await _closed_by_server(stream) == b""


async def test_send_listener_read_timeout_closes_a_stalled_body(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, SIDECAR_SEND_READ_SECONDS="0.3", SIDECAR_SEND_IDLE_SECONDS="30"
    )
    async with running_sidecar(settings) as sc:
        stream = await trio.open_tcp_stream(*_host_port(sc.send_url))
        async with stream:
            await stream.send_all(
                b"POST /v1/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            with trio.fail_after(5):
                await _closed_by_server(stream)
        # Nothing half-read was stored, and the listener still serves.
        assert (await sc.client.get(f"{sc.send_url}/healthz")).status_code == 200


async def test_send_timeouts_do_not_touch_the_public_listener(tmp_path: Path) -> None:
    """SSE clients send nothing after their request: a read timeout there would cut every
    stream between pings."""
    settings = settings_for(
        tmp_path,
        SIDECAR_SEND_READ_SECONDS="0.2",
        SIDECAR_SEND_IDLE_SECONDS="0.2",
        SIDECAR_KEEPALIVE_SECONDS="60",
    )
    async with running_sidecar(settings) as sc, sc.stream("alice") as client:
        await trio.sleep(1.0)  # five read timeouts of the send listener, without a byte
        message_id = await sc.send("alice")
        assert (await client.next_message()).id == message_id


async def test_an_answer_sent_before_the_request_body_does_not_wedge_the_connection(
    sidecar: Sidecar,
) -> None:
    """An error answered before the body is read: the connection then serves the next
    request, or is closed (the client retries on a new one), instead of leaving the next
    request waiting forever (sidecar/http/hypercorn_patches.py)."""
    for base, path in ((sidecar.public, "/io/app/web/sse/ack"), (sidecar.send_url, "/nowhere")):
        stream = await trio.open_tcp_stream(*_host_port(base))
        async with stream:
            await stream.send_all(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 11\r\n\r\n".encode()
            )
            received = b""
            with trio.fail_after(5):
                while b"\r\n\r\n" not in received:
                    received += await stream.receive_some()
            assert received.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 404 "))
            await stream.send_all(
                b'{"ids": []}GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
            )
            with trio.fail_after(5):
                rest = received + await _closed_by_server(stream)
            assert rest.count(b"HTTP/1.1 ") in (1, 2)
            if rest.count(b"HTTP/1.1 ") == 2:
                assert b"HTTP/1.1 200 " in rest
