"""The reference: a minimal SSE server on raw trio sockets, hand-written HTTP/1.1.

It is what trio itself can do on this machine: the same endpoints as the sidecar (GET
stream with userId, POST /v1/send and /v1/send/batch fanning out, /healthz), one task per
stream writing everything queued in one send, frames encoded once per message. It keeps
nothing (no store): it is the ceiling, not a peer.

    python -m bench.servers.raw_trio PORT [KEEPALIVE_SECONDS]
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial
from itertools import count
from urllib.parse import parse_qsl

import trio

from bench.common import STREAM_PATH, raise_nofile

BUFFER = 256
MAX_HEAD = 16384
PING = b"event: ping\ndata: 1\n\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream;charset=UTF-8\r\n"
    b"cache-control: no-cache\r\nx-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Stream:
    __slots__ = ("cancel_scope", "send")

    def __init__(self, send: trio.MemorySendChannel[bytes]) -> None:
        self.send = send
        self.cancel_scope = trio.CancelScope()


class Server:
    def __init__(self, keepalive: float) -> None:
        self.keepalive = keepalive
        self.streams: dict[str, set[Stream]] = {}
        self.process = os.urandom(5).hex()
        self.counter = count()

    def new_id(self) -> str:
        return f"{int(time.time()):08x}{self.process}{next(self.counter) & 0xFFFFFF:06x}"

    def publish(self, item: object) -> dict[str, object]:
        if not isinstance(item, dict) or not isinstance(item.get("response"), dict):
            raise ValueError("bad item")
        user = item["recipientId"]
        message_id = self.new_id()
        data = json.dumps(item["response"], separators=(",", ":"), ensure_ascii=False)
        frame = chunk(f"id: {message_id}\nevent: message\ndata: {data}\n\n".encode())
        delivered = 0
        for stream in list(self.streams.get(user, ())):
            try:
                stream.send.send_nowait(frame)
                delivered += 1
            except trio.WouldBlock:
                stream.cancel_scope.cancel()  # too slow: cut off, as the sidecar does
        return {"id": message_id, "deliveredTo": delivered}

    async def handle(self, conn: trio.SocketStream) -> None:
        buffer = b""
        try:
            async with conn:
                while True:
                    while (end := buffer.find(b"\r\n\r\n")) < 0:
                        data = await conn.receive_some(65536)
                        if not data or len(buffer) > MAX_HEAD:
                            return
                        buffer += data
                    head, buffer = buffer[:end], buffer[end + 4 :]
                    lines = head.split(b"\r\n")
                    method, target, _ = lines[0].split(b" ", 2)
                    length = 0
                    for line in lines[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    while len(buffer) < length:
                        data = await conn.receive_some(65536)
                        if not data:
                            return
                        buffer += data
                    body, buffer = buffer[:length], buffer[length:]
                    path, _, query = target.partition(b"?")
                    if method == b"GET" and path == STREAM_PATH.encode():
                        user = dict(parse_qsl(query.decode())).get("userId")
                        if not user:
                            await respond(conn, b"400 Bad Request", b'{"error":"userId"}')
                            continue
                        await self.stream(conn, user)
                        return
                    if method == b"POST" and path in (b"/v1/send", b"/v1/send/batch"):
                        try:
                            payload = json.loads(body)
                            if path == b"/v1/send":
                                result: object = self.publish(payload)
                            else:
                                result = {"results": [self.publish(i) for i in payload]}
                        except (ValueError, KeyError, TypeError):
                            await respond(conn, b"400 Bad Request", b'{"error":"bad request"}')
                            continue
                        await respond(conn, b"202 Accepted", json.dumps(result).encode())
                    elif method == b"GET" and path == b"/healthz":
                        await respond(conn, b"200 OK", b'{"status":"ok"}')
                    else:
                        await respond(conn, b"404 Not Found", b'{"error":"not found"}')
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
            return

    async def stream(self, conn: trio.SocketStream, user: str) -> None:
        send, receive = trio.open_memory_channel[bytes](BUFFER)
        stream = Stream(send)
        self.streams.setdefault(user, set()).add(stream)
        try:
            with stream.cancel_scope:
                await conn.send_all(SSE_HEAD + chunk(PING))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch_eof, conn, nursery.cancel_scope)
                    while True:
                        with trio.move_on_after(self.keepalive):
                            frames = [await receive.receive()]
                            while len(frames) < 64:
                                try:
                                    frames.append(receive.receive_nowait())
                                except trio.WouldBlock:
                                    break
                            await conn.send_all(b"".join(frames))
                            continue
                        await conn.send_all(chunk(PING))
        finally:
            subs = self.streams.get(user)
            if subs is not None:
                subs.discard(stream)
                if not subs:
                    del self.streams[user]


async def watch_eof(conn: trio.SocketStream, cancel_scope: trio.CancelScope) -> None:
    while await conn.receive_some(4096):
        pass
    cancel_scope.cancel()


async def respond(conn: trio.SocketStream, status: bytes, body: bytes) -> None:
    await conn.send_all(
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (status, len(body), body)
    )


async def main(port: int, keepalive: float) -> None:
    server = Server(keepalive)
    await trio.serve_tcp(partial(Server.handle, server), port, host="127.0.0.1", backlog=4096)


if __name__ == "__main__":
    raise_nofile()
    trio.run(main, int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 10.0)
