"""The Python peer: sse-starlette on uvicorn (uvloop + httptools), one process. Same
endpoints as the reference; per-stream bounded asyncio queues, cut off when full.

    python -m bench.servers.starlette_sse PORT [KEEPALIVE_SECONDS]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from itertools import count
from typing import Any

import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.common import STREAM_PATH, raise_nofile

BUFFER = 256
KEEPALIVE = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
PROCESS = os.urandom(5).hex()
COUNTER = count()
STREAMS: dict[str, set[asyncio.Queue[bytes | None]]] = {}


def publish(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict) or not isinstance(item.get("response"), dict):
        raise ValueError("bad item")
    message_id = f"{int(time.time()):08x}{PROCESS}{next(COUNTER) & 0xFFFFFF:06x}"
    data = json.dumps(item["response"], separators=(",", ":"), ensure_ascii=False)
    frame = ServerSentEvent(data=data, event="message", id=message_id, sep="\n").encode()
    delivered = 0
    for queue in list(STREAMS.get(item["recipientId"], ())):
        try:
            queue.put_nowait(frame)
            delivered += 1
        except asyncio.QueueFull:
            queue._queue.clear()  # type: ignore[attr-defined]
            queue.put_nowait(None)  # cut off: the stream ends
    return {"id": message_id, "deliveredTo": delivered}


async def stream(request: Request) -> Response:
    user = request.query_params.get("userId")
    if not user:
        return JSONResponse({"error": "userId"}, 400)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(BUFFER)
    STREAMS.setdefault(user, set()).add(queue)

    async def events() -> AsyncIterator[Any]:
        try:
            yield ServerSentEvent(data="1", event="ping", sep="\n")
            while True:
                frame = await queue.get()
                if frame is None:
                    return
                yield frame
        finally:
            subs = STREAMS.get(user)
            if subs is not None:
                subs.discard(queue)
                if not subs:
                    del STREAMS[user]

    return EventSourceResponse(
        events(),
        sep="\n",
        ping=KEEPALIVE,
        ping_message_factory=lambda: ServerSentEvent(data="1", event="ping", sep="\n"),
    )


async def send(request: Request) -> Response:
    try:
        return JSONResponse(publish(await request.json()), 202)
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": "bad request"}, 400)


async def send_batch(request: Request) -> Response:
    try:
        return JSONResponse({"results": [publish(i) for i in await request.json()]}, 202)
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": "bad request"}, 400)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route(STREAM_PATH, stream),
        Route("/v1/send", send, methods=["POST"]),
        Route("/v1/send/batch", send_batch, methods=["POST"]),
        Route("/healthz", healthz),
    ]
)

if __name__ == "__main__":
    raise_nofile()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=60,
    )
