"""End to end through real hypercorn listeners on loopback."""

from __future__ import annotations

import json

import pytest
import trio

from sidecar.protocol.message import State
from tests.sidecar_harness import Sidecar


async def test_exact_tock_bytes_on_the_wire(sidecar: Sidecar) -> None:
    host, port = sidecar.public.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            b"GET /io/app/web/sse?userid=bob HTTP/1.1\r\n"
            b"Host: x\r\nAccept: text/event-stream\r\n\r\n"
        )
        received = b""
        while b"event: ping\ndata: 1\n\n" not in received:
            received += await stream.receive_some()
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 200")
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        headers = {k.lower(): v for k, v in headers.items()}
        assert headers[b"content-type"] == b"text/event-stream;charset=UTF-8"
        assert headers[b"cache-control"] == b"no-cache"
        assert headers[b"connection"] == b"keep-alive"
        assert headers[b"x-accel-buffering"] == b"no"
        # chunked framing: the first chunk's payload is exactly the ping
        size, _, rest = body.partition(b"\r\n")
        assert rest[: int(size, 16)] == b"event: ping\ndata: 1\n\n"

        response = {"responses": [{"text": "Hello\nworld é ✓", "buttons": []}]}
        message_id = await sidecar.send("bob", **response)
        expected = (
            f"id: {message_id}\nevent: message\ndata: "
            + json.dumps(response, separators=(",", ":"), ensure_ascii=False)
            + "\n\n"
        ).encode()
        received = b""
        while expected not in received:
            received += await stream.receive_some()
        assert len(message_id) == 24


async def test_userid_and_userId_both_identify(sidecar: Sidecar) -> None:
    for param in ("userId", "userid"):
        async with sidecar.stream("carol", param=param) as client:
            message_id = await sidecar.send("carol")
            assert (await client.next_message()).id == message_id


async def test_missing_user_id_is_400_json(sidecar: Sidecar) -> None:
    reply = await sidecar.client.get(f"{sidecar.public}/io/app/web/sse")
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "missing_user_id"


@pytest.mark.parametrize(
    ("query", "code"),
    [
        # Decoded loosely, both would be the same user, U+FFFD.
        ("userId=%FF", "invalid_query"),
        ("userId=%FE", "invalid_query"),
        ("userId=%C3", "invalid_query"),
        ("userId=a%0Ab", "invalid_user_id"),
        ("userId=a%00", "invalid_user_id"),
    ],
)
async def test_user_id_that_is_not_text_is_400(sidecar: Sidecar, query: str, code: str) -> None:
    for path in ("/io/app/web/sse", "/io/app/web/sse/ack"):
        method = "GET" if path.endswith("/sse") else "POST"
        reply = await sidecar.client.request(
            method,
            f"{sidecar.public}{path}?{query}",
            json={"ids": []},
        )
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["code"] == code
    url = f"{sidecar.public}/io/app/web/sse?userId=%C3%A9"
    async with sidecar.client.stream("GET", url) as utf8:
        assert utf8.status_code == 200


async def test_keepalive_pings_at_the_interval(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.sidecar_harness import running_sidecar, settings_for

    settings = settings_for(tmp_path, SIDECAR_KEEPALIVE_SECONDS="0.2")
    async with running_sidecar(settings) as sc, sc.stream("dave") as client:
        start = trio.current_time()
        for _ in range(3):
            assert (await client.next_event()).event == "ping"
        assert 0.5 <= trio.current_time() - start < 3


async def test_live_message_reaches_every_stream_of_the_user(sidecar: Sidecar) -> None:
    async with (
        sidecar.stream("erin") as one,
        sidecar.stream("erin") as two,
        sidecar.stream("frank") as other,
    ):
        message_id = await sidecar.send("erin", text="both")
        assert (await one.next_message()).id == message_id
        assert (await two.next_message()).id == message_id
        mine = await sidecar.send("frank")
        assert (await other.next_message()).id == mine  # erin's never came here


async def test_offline_message_replayed_on_reconnect_then_sent(sidecar: Sidecar) -> None:
    ids = [await sidecar.send("gina", n=i) for i in range(3)]
    async with sidecar.stream("gina") as client:
        events = await client.messages(3)
        assert [e.id for e in events] == ids
        assert [json.loads(e.data)["n"] for e in events] == [0, 1, 2]
    with trio.fail_after(5):
        while (await sidecar.running.store.get(ids[-1])).state != State.SENT:  # type: ignore[union-attr]
            await trio.sleep(0.02)
    # A legacy client (no Last-Event-ID) is not sent SENT messages again
    async with sidecar.stream("gina") as client:
        fresh = await sidecar.send("gina", n=3)
        assert (await client.next_message()).id == fresh


async def test_other_methods_on_the_stream_are_405(sidecar: Sidecar) -> None:
    for method in ("POST", "PUT", "DELETE"):
        reply = await sidecar.client.request(method, sidecar.stream_url("zed"))
        assert reply.status_code == 405
        assert reply.headers["Allow"] == "GET"
        assert reply.json()["error"]["code"] == "method_not_allowed"
