"""A bare ASGI app on the same hypercorn trio setup as the sidecar (same Config): what
hypercorn allows, without any framework or store. Same endpoints as the reference; each
stream sends everything queued as one body message.

    python -m bench.servers.bare_asgi PORT [KEEPALIVE_SECONDS]
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from functools import partial
from itertools import count
from typing import Any
from urllib.parse import parse_qsl

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from bench.common import STREAM_PATH, raise_nofile

BUFFER = 256
PING = b"event: ping\ndata: 1\n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream;charset=UTF-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
JSON = [(b"content-type", b"application/json")]


class App:
    def __init__(self, keepalive: float) -> None:
        self.keepalive = keepalive
        self.streams: dict[str, set[tuple[trio.MemorySendChannel[bytes], trio.CancelScope]]] = {}
        self.process = os.urandom(5).hex()
        self.counter = count()

    def publish(self, item: Any) -> dict[str, Any]:
        if not isinstance(item, dict) or not isinstance(item.get("response"), dict):
            raise ValueError("bad item")
        message_id = f"{int(time.time()):08x}{self.process}{next(self.counter) & 0xFFFFFF:06x}"
        data = json.dumps(item["response"], separators=(",", ":"), ensure_ascii=False)
        frame = f"id: {message_id}\nevent: message\ndata: {data}\n\n".encode()
        delivered = 0
        for send, scope in list(self.streams.get(item["recipientId"], ())):
            try:
                send.send_nowait(frame)
                delivered += 1
            except trio.WouldBlock:
                scope.cancel()
        return {"id": message_id, "deliveredTo": delivered}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == STREAM_PATH:
            user = dict(parse_qsl(scope["query_string"].decode())).get("userId")
            if user:
                return await self.stream(user, receive, send)
            return await respond(send, 400, b'{"error":"userId"}')
        if method == "POST" and path in ("/v1/send", "/v1/send/batch"):
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            try:
                payload = json.loads(body)
                if path == "/v1/send":
                    result: Any = self.publish(payload)
                else:
                    result = {"results": [self.publish(i) for i in payload]}
            except (ValueError, KeyError, TypeError):
                return await respond(send, 400, b'{"error":"bad request"}')
            return await respond(send, 202, json.dumps(result).encode())
        if path == "/healthz":
            return await respond(send, 200, b'{"status":"ok"}')
        return await respond(send, 404, b'{"error":"not found"}')

    async def stream(self, user: str, receive: Any, send: Any) -> None:
        queue, frames_in = trio.open_memory_channel[bytes](BUFFER)
        entry = (queue, trio.CancelScope())
        self.streams.setdefault(user, set()).add(entry)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            with entry[1]:
                async with trio.open_nursery() as nursery:

                    async def watch() -> None:
                        while (await receive())["type"] != "http.disconnect":
                            pass
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(watch)
                    await body(send, PING)
                    while True:
                        with trio.move_on_after(self.keepalive):
                            frames = [await frames_in.receive()]
                            while len(frames) < 64:
                                try:
                                    frames.append(frames_in.receive_nowait())
                                except trio.WouldBlock:
                                    break
                            await body(send, b"".join(frames))
                            continue
                        await body(send, PING)
        finally:
            subs = self.streams.get(user)
            if subs is not None:
                subs.discard(entry)
                if not subs:
                    del self.streams[user]


async def body(send: Any, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def respond(send: Any, status: int, data: bytes) -> None:
    headers = [*JSON, (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def config(port: int) -> Config:
    """As sidecar/app.py sets up its listeners."""
    cfg = Config()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("bare")
    cfg.include_server_header = False
    cfg.keep_alive_max_requests = 2**62
    return cfg


if __name__ == "__main__":
    raise_nofile()
    logging.basicConfig(level=logging.WARNING)
    port, keepalive = int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    trio.run(partial(serve, App(keepalive), config(port), mode="asgi"))
