"""Smoke test of the h11 prototype listener (bench/servers/h11_sidecar.py), so it does not
silently rot: it runs in-process on loopback over the sidecar's own hub and SQLite store,
and must put Tock's exact bytes on the wire (head, first ping, message frame, replay)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from bench.servers.h11_sidecar import serve
from tests.sidecar_harness import settings_for

PING = b"event: ping\ndata: 1\n\n"
NOTHING_SEEN = "0" * 24


def frame(message_id: str, response: object) -> bytes:
    data = json.dumps(response, separators=(",", ":"), ensure_ascii=False)
    return f"id: {message_id}\nevent: message\ndata: {data}\n\n".encode()


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@asynccontextmanager
async def prototype(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    settings = settings_for(tmp_path, SIDECAR_SHUTDOWN_SECONDS="1")
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve, settings, shutdown)
        try:
            yield urls
        finally:
            shutdown.set()


class Poster:
    """One keep-alive connection to the send listener."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def post(self, path: str, body: object) -> tuple[bytes, dict[str, object]]:
        data = json.dumps(body).encode()
        await self.stream.send_all(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += await self.stream.receive_some()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(self.buffer) < length:
            self.buffer += await self.stream.receive_some()
        reply, self.buffer = self.buffer[:length], self.buffer[length:]
        return head.split(b"\r\n")[0], json.loads(reply)

    async def send(self, user: str, response: dict[str, object]) -> str:
        status, reply = await self.post(
            "/v1/send", {"connectorId": "web", "recipientId": user, "response": response}
        )
        assert status == b"HTTP/1.1 202 Accepted", reply
        message_id = reply["id"]
        assert isinstance(message_id, str)
        return message_id


def dechunk(body: bytes) -> bytes:
    """The payload of the complete chunks at the start of a chunked body (a chunk boundary
    is transport detail: serve_stream may write several frames as one chunk)."""
    out = b""
    while (end := body.find(b"\r\n")) >= 0:
        size = int(body[:end], 16)
        if len(body) < end + 2 + size + 2:
            break
        assert body[end + 2 + size : end + 4 + size] == b"\r\n"
        out += body[end + 2 : end + 2 + size]
        body = body[end + 4 + size :]
    return out


class Stream:
    """One SSE stream on a raw connection: its response head, then its SSE bytes."""

    def __init__(self, conn: trio.SocketStream, head: bytes, body: bytes) -> None:
        self.conn = conn
        self.head = head
        self.body = body

    @classmethod
    async def open(cls, public: str, query: str, headers: str = "") -> Stream:
        conn = await trio.open_tcp_stream(*address(public))
        await conn.send_all(
            f"GET /io/app/web/sse?{query} HTTP/1.1\r\nHost: x\r\n"
            f"Accept: text/event-stream\r\n{headers}\r\n".encode()
        )
        received = b""
        while b"\r\n\r\n" not in received:
            data = await conn.receive_some()
            assert data, received
            received += data
        head, _, body = received.partition(b"\r\n\r\n")
        stream = cls(conn, head, body)
        await stream.read_until(PING)
        return stream

    def events(self) -> bytes:
        return dechunk(self.body)

    async def read_until(self, expected: bytes) -> None:
        while expected not in self.events():
            data = await self.conn.receive_some()
            assert data, self.body
            self.body += data


@pytest.mark.time_limit(5)
async def test_tock_bytes_keepalive_sends_and_replay(tmp_path: Path) -> None:
    async with prototype(tmp_path) as (public, send_url):
        poster = Poster(await trio.open_tcp_stream(*address(send_url)))
        stream = await Stream.open(public, "userid=bob")
        lines = stream.head.split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 200 OK"
        headers = {k.lower(): v for k, v in (line.split(b": ", 1) for line in lines[1:])}
        assert headers == {
            b"content-type": b"text/event-stream;charset=UTF-8",
            b"cache-control": b"no-cache",
            b"connection": b"keep-alive",
            b"x-accel-buffering": b"no",
            b"transfer-encoding": b"chunked",
        }
        assert stream.events() == PING  # the first bytes of the stream are exactly the ping

        # Two sends on one keep-alive connection; each frame exactly Tock's.
        first = {"responses": [{"text": "Hello\nworld é ✓", "buttons": []}]}
        first_id = await poster.send("bob", first)
        await stream.read_until(PING + frame(first_id, first))
        second_id = await poster.send("bob", {"n": 2})
        await stream.read_until(PING + frame(first_id, first) + frame(second_id, {"n": 2}))
        await stream.conn.aclose()

        # Stored while bob has no stream: replayed on connect, in id order, after the ping.
        third_id = await poster.send("bob", {"n": 3})
        status, batch = await poster.post(
            "/v1/send/batch",
            [{"connectorId": "web", "recipientId": "bob", "response": {"n": 4}}],
        )
        assert status == b"HTTP/1.1 202 Accepted"
        results = batch["results"]
        assert isinstance(results, list)
        fourth_id = results[0]["id"]
        assert results[0]["deliveredTo"] == 0
        stream = await Stream.open(public, "userId=bob")
        await stream.read_until(PING + frame(third_id, {"n": 3}) + frame(fourth_id, {"n": 4}))
        await stream.conn.aclose()

        # A client that says it has seen nothing gets everything undelivered again.
        stream = await Stream.open(public, "userId=bob", f"Last-Event-ID: {NOTHING_SEEN}\r\n")
        replay = [(first_id, first), (second_id, {"n": 2}), (third_id, {"n": 3})]
        await stream.read_until(PING + b"".join(frame(i, r) for i, r in replay))
        await stream.conn.aclose()

        # Errors keep the send connection alive; a missing user id is a JSON 400.
        status, reply = await poster.post("/v1/send", {"connectorId": "web"})
        assert status == b"HTTP/1.1 400 Bad Request"
        assert reply["error"]["code"] == "missing_field"  # type: ignore[index]
        assert await poster.send("bob", {"n": 5})
        await poster.stream.aclose()
        probe = await trio.open_tcp_stream(*address(public))
        await probe.send_all(b"GET /io/app/web/sse HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"missing_user_id" not in answer:
            answer += await probe.receive_some()
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        await probe.aclose()
