"""Run a real sidecar (hypercorn listeners on loopback) inside a test, and talk to it."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from sidecar import app
from sidecar.config import Settings
from sidecar.protocol import sse
from sidecar.protocol.delivery import Position, Replay
from sidecar.protocol.message import Message
from sidecar.store.base import Store


def settings_for(tmp_path: Path, **env: str) -> Settings:
    base = {
        "SIDECAR_PUBLIC_BIND": "127.0.0.1:0",
        "SIDECAR_SEND_BIND": "127.0.0.1:0",
        "SIDECAR_STORE": f"sqlite:///{tmp_path / 'sidecar.db'}",
        "SIDECAR_SHUTDOWN_SECONDS": "2",
    }
    return Settings.load(base | env)


@dataclasses.dataclass
class Sidecar:
    running: app.Running
    shutdown: trio.Event
    client: httpx.AsyncClient

    @property
    def public(self) -> str:
        return self.running.public_url

    @property
    def send_url(self) -> str:
        return self.running.send_url

    def stream_url(self, user: str = "alice", *, param: str = "userId") -> str:
        return f"{self.public}/io/app/web/sse?{param}={user}"

    async def send(self, recipient: str = "alice", connector: str = "web", **response: Any) -> str:
        body = {
            "connectorId": connector,
            "recipientId": recipient,
            "response": response or {"responses": [{"text": "hi"}]},
        }
        reply = await self.client.post(f"{self.send_url}/v1/send", json=body)
        assert reply.status_code == 202, reply.text
        message_id: str = reply.json()["id"]
        return message_id

    @asynccontextmanager
    async def stream(
        self,
        user: str = "alice",
        *,
        last_event_id: str | None = None,
        query: str = "",
        param: str = "userId",
    ) -> AsyncIterator[SseClient]:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        url = self.stream_url(user, param=param) + query
        async with self.client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            async with aclosing(response.aiter_raw()) as chunks:
                client = SseClient(chunks)
                # The first frame is always a ping; once it is here the stream is registered.
                first = await client.next_event()
                assert first.event == "ping"
                yield client


class SseClient:
    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._parser = sse.Parser()
        self._chunks = chunks
        self._events: list[sse.Event] = []

    async def next_event(self) -> sse.Event:
        while not self._events:
            chunk = await self._chunks.__anext__()
            self._events.extend(self._parser.feed(chunk))
        return self._events.pop(0)

    async def next_message(self) -> sse.Event:
        """The next `message` event, skipping pings."""
        while True:
            event = await self.next_event()
            if event.event == "message":
                return event

    async def messages(self, count: int) -> list[sse.Event]:
        return [await self.next_message() for _ in range(count)]


@asynccontextmanager
async def running_sidecar(settings: Settings) -> AsyncIterator[Sidecar]:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10) as client:
        running = await nursery.start(app.run, settings, shutdown)
        try:
            yield Sidecar(running, shutdown, client)
        finally:
            shutdown.set()


@dataclasses.dataclass
class SidecarProcess:
    """A sidecar run as `python -m sidecar serve` in a process of its own. Its stderr is
    read all along (a full pipe would stop the process at its next log line); `log` keeps
    the last `LOG_KEPT` bytes."""

    process: trio.Process
    public: str
    send_url: str
    log: bytearray
    drained: trio.Event = dataclasses.field(default_factory=trio.Event)

    async def drain(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.receive_some():
            self.log += chunk
            del self.log[:-LOG_KEPT]
        self.drained.set()

    async def read_log(self) -> bytes:
        """What the process wrote to stderr until it exited (its last `LOG_KEPT` bytes)."""
        await self.drained.wait()
        return bytes(self.log)


LOG_KEPT = 1024 * 1024


@asynccontextmanager
async def spawn_sidecar(env: dict[str, str]) -> AsyncIterator[SidecarProcess]:
    """Start a sidecar process with `env` added to this one's environment (binds default to
    free loopback ports) and wait for its "listening" line; kill it on exit if still running."""
    import os
    import sys

    full_env = (
        os.environ
        | {
            "SIDECAR_PUBLIC_BIND": "127.0.0.1:0",
            "SIDECAR_SEND_BIND": "127.0.0.1:0",
            "SIDECAR_SHUTDOWN_SECONDS": "3",
        }
        | env
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "sidecar", "serve"], env=full_env, stderr=-1
    )
    try:
        assert process.stderr is not None
        log = bytearray()
        with trio.fail_after(30):
            while b"sidecar listening:" not in log:
                chunk = await process.stderr.receive_some()
                assert chunk, f"sidecar exited before listening:\n{log.decode()}"
                log += chunk
        line = next(x for x in log.decode().splitlines() if "sidecar listening:" in x)
        words = line.split()
        public, send_url = words[words.index("public") + 1], words[words.index("send") + 1]
        running = SidecarProcess(process, public, send_url, log)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(running.drain)
            yield running
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stderr is not None:
                await process.stderr.aclose()


class BrokenSqliteConnection:
    """Stands in for the SQLite store's connection: every statement fails as a failing
    disk would (`store._db = BrokenSqliteConnection()`)."""

    in_transaction = False

    def execute(self, *args: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    executemany = execute

    def close(self) -> None:
        pass


async def logged_messages(
    store: Store, recipient: str = "alice", connector: str = "web", replay: Replay | None = None
) -> list[Message]:
    """The user's whole log, as the store has it (those `replay` selects, when given)."""
    head = await store.head(connector, recipient)
    if head is None:
        return []
    return await store.logged(
        connector, recipient, Position(head.epoch, 0), through=head.seq, limit=10_000, replay=replay
    )


async def logged_ids(
    store: Store, recipient: str = "alice", connector: str = "web", replay: Replay | None = None
) -> list[str]:
    return [m.id for m in await logged_messages(store, recipient, connector, replay)]
