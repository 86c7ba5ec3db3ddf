"""What the stress tests share: sizes, raw HTTP/1.1 clients on trio sockets, logical SSE
clients that disconnect and reconnect with Last-Event-ID, and the leak checks.

The clients speak HTTP through h11 on plain trio sockets (no client library: at a few
thousand streams httpx would be the bottleneck) and parse the stream with the sidecar's
own `sse.Parser`.

Sizes scale with `STRESS_SCALE` (1 in the normal test run; `just stress` runs bigger).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import random
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from sidecar.protocol import sse

SCALE = float(os.environ.get("STRESS_SCALE", "1"))
NOTHING_SEEN = "0" * 24
_LINGER_RST = struct.pack("ii", 1, 0)


def scaled(n: int) -> int:
    return max(1, round(n * SCALE))


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None, url
    assert parts.port is not None, url
    return parts.hostname, parts.port


class HttpConnection:
    """One keep-alive HTTP/1.1 connection for requests with a body (the send API)."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self._stream = stream
        self._host = host
        self._conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, url: str) -> HttpConnection:
        host, port = host_port(url)
        return cls(await trio.open_tcp_stream(host, port), f"{host}:{port}")

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def post_json(self, path: str, payload: Any) -> tuple[int, Any]:
        body = json.dumps(payload).encode()
        request = h11.Request(
            method="POST",
            target=path,
            headers=[
                ("host", self._host),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
            ],
        )
        await self._stream.send_all(
            self._conn.send(request)
            + self._conn.send(h11.Data(data=body))  # type: ignore[operator]
            + self._conn.send(h11.EndOfMessage())  # type: ignore[operator]
        )
        status, chunks = 0, []
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                data = await self._stream.receive_some(65536)
                self._conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the send connection")
        self._conn.start_next_cycle()
        return status, json.loads(b"".join(chunks)) if chunks else None


class ServerClosed(Exception):
    """The server ended the stream (or the connection)."""


class SseConnection:
    """One SSE stream on a raw socket: `events()` yields parsed events until the server
    ends the response."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._conn = h11.Connection(h11.CLIENT)
        self._parser = sse.Parser()

    @classmethod
    async def open(cls, url: str, path_and_query: str, last_event_id: str | None) -> SseConnection:
        host, port = host_port(url)
        stream = await trio.open_tcp_stream(host, port)
        connection = cls(stream)
        try:
            headers = [("host", f"{host}:{port}"), ("accept", "text/event-stream")]
            if last_event_id is not None:
                headers.append(("last-event-id", last_event_id))
            request = h11.Request(method="GET", target=path_and_query, headers=headers)
            data = connection._conn.send(request)
            assert data is not None
            await stream.send_all(data)
            while True:
                event = await connection._next()
                if isinstance(event, h11.Response):
                    if event.status_code != 200:
                        raise AssertionError(f"stream answered {event.status_code}")
                    return connection
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def _next(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self._conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self._stream.receive_some(65536)
            self._conn.receive_data(data)

    async def next_events(self) -> list[sse.Event]:
        """The events of the next chunk(s) of body; raises ServerClosed at the end."""
        while True:
            event = await self._next()
            if isinstance(event, h11.Data):
                events = self._parser.feed(bytes(event.data))
                if events:
                    return events
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                raise ServerClosed

    def reset(self) -> None:
        """Make the close an abrupt RST rather than a FIN."""
        sock = self._stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)


@dataclasses.dataclass
class LogicalClient:
    """One browser tab: its stream may be cut and reopened with its last id many times; it
    must end up with every message of its user.

    A roaming client closes its connection at random moments (FIN or RST, seeded) and
    reconnects after a short pause with `Last-Event-ID`, or "nothing seen" before its first
    message. Every client reconnects when the server ends its stream."""

    user: str
    roams: bool
    rng: random.Random
    mean_lifetime: float = 1.0
    # Per connection, the ids it wrote, each with whether the client had it already.
    connections: list[list[tuple[str, bool]]] = dataclasses.field(default_factory=list)
    seen: set[str] = dataclasses.field(default_factory=set)
    last_id: str | None = None
    server_closes: int = 0
    client_closes: int = 0
    duplicates: int = 0
    connected: trio.Event = dataclasses.field(default_factory=trio.Event)
    _roaming: bool = False
    _scope: trio.CancelScope | None = None

    async def run(self, public_url: str, path: str, connect_limit: trio.CapacityLimiter) -> None:
        """Keep a stream open until cancelled; `roam(True)` starts cutting it at random."""
        query = f"{path}?userId={self.user}"
        while True:
            async with connect_limit:
                connection = await SseConnection.open(
                    public_url, query, self.last_id or NOTHING_SEEN
                )
            ids: list[tuple[str, bool]] = []
            self.connections.append(ids)
            abrupt = self.rng.random() < 0.5
            try:
                with trio.CancelScope() as self._scope:
                    self._set_lifetime()
                    while True:
                        for event in await connection.next_events():
                            if event.event == "ping":
                                self.connected.set()
                            elif event.event == "message":
                                assert event.id is not None
                                self._receive(event.id, ids)
                self.client_closes += 1
                if abrupt:
                    connection.reset()
            except ServerClosed:
                self.server_closes += 1
            finally:
                self._scope = None
                await connection.aclose()
            await trio.sleep(self.rng.uniform(0, 0.05) if self.roams else 0.01)

    def roam(self, on: bool) -> None:
        """Start (or stop) closing the connection at random moments, if this tab roams."""
        self._roaming = on and self.roams
        self._set_lifetime()

    def _set_lifetime(self) -> None:
        if self._scope is not None:
            self._scope.deadline = (
                trio.current_time() + self.rng.expovariate(1 / self.mean_lifetime)
                if self._roaming
                else float("inf")
            )

    def _receive(self, message_id: str, ids: list[tuple[str, bool]]) -> None:
        repeat = message_id in self.seen
        ids.append((message_id, repeat))
        if repeat:
            self.duplicates += 1
        else:
            self.seen.add(message_id)
        self.last_id = message_id


def order_violations(client: LogicalClient, seq_of: dict[str, int]) -> list[tuple[int, str, str]]:
    """Pairs of messages that came out of their user's log order on one connection, among
    those new to the client: (connection, before, after). The log order is the order of
    the commits, whichever writer made them (docs/delivery.md)."""
    found = []
    for index, ids in enumerate(client.connections):
        previous: str | None = None
        for message_id, repeat in ids:
            if repeat:
                continue
            if previous is not None and seq_of[message_id] <= seq_of[previous]:
                found.append((index, previous, message_id))
            previous = message_id
    return found


# --- leak checks -------------------------------------------------------------------------


def task_names() -> list[str]:
    """Every trio task of this run, found by walking the nurseries down from the root."""
    names = []
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        names.append(task.name)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


def open_fds() -> list[str]:
    """What each open file descriptor of this process points at; a TCP socket as
    `tcp LOCALPORT->REMOTEPORT`."""
    tcp = _tcp_sockets()
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the one listdir itself used, closed by now
            continue
        if target.startswith("socket:["):
            target = tcp.get(target[8:-1], target)
        targets.append(target)
    return sorted(targets)


def _tcp_sockets() -> dict[str, str]:
    """inode -> `tcp LOCALPORT->REMOTEPORT` for this network namespace's TCP sockets."""
    found = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    local, remote, inode = fields[1], fields[2], fields[9]
                    found[inode] = f"tcp {int(local[-4:], 16)}->{int(remote[-4:], 16)}"
        except OSError:
            continue
    return found


def busy_threads() -> list[str]:
    """Threads other than trio's idle cached workers (which linger for a few seconds by
    design and are reused)."""
    return sorted(t.name for t in threading.enumerate() if not t.name.startswith("Trio thread"))


def _malloc_trim() -> None:
    """Hand glibc's free heap memory back to the system, so RSS shows what is in use."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.malloc_trim(0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass
class Snapshot:
    tasks: list[str]
    fds: list[str]
    threads: list[str]
    rss: int
    blocks: int  # memory blocks Python's allocator has handed out and not had back

    @classmethod
    def take(cls) -> Snapshot:
        gc.collect()
        _malloc_trim()
        return cls(task_names(), open_fds(), busy_threads(), rss_bytes(), sys.getallocatedblocks())

    def leaks_against(self, base: Snapshot, pooled_ports: Iterable[int] = ()) -> list[str]:
        """What is here and was not in `base`. TCP connections to `pooled_ports` are left
        out: a database client keeps a pool of them open by design."""
        pooled = tuple(f"->{port}" for port in pooled_ports)
        problems = []
        extra = _multiset_minus(self.tasks, base.tasks)
        if extra:
            problems.append(f"{len(extra)} tasks left: {extra[:10]}")
        fds = [fd for fd in _multiset_minus(self.fds, base.fds) if not fd.endswith(pooled)]
        if fds:
            problems.append(f"{len(fds)} file descriptors left: {fds}")
        threads = _multiset_minus(self.threads, base.threads)
        if threads:
            problems.append(f"threads left: {threads}")
        return problems


def _multiset_minus(a: Iterable[str], b: Iterable[str]) -> list[str]:
    remaining = list(b)
    out = []
    for item in a:
        if item in remaining:
            remaining.remove(item)
        else:
            out.append(item)
    return out


async def settle(
    base: Snapshot,
    ready: Callable[[], bool],
    seconds: float = 15.0,
    pooled_ports: Iterable[int] = (),
) -> Snapshot:
    """Wait (bounded) until `ready()` and nothing is left over against `base`; the last
    snapshot taken."""
    with trio.move_on_after(seconds):
        while True:
            if ready():
                snapshot = Snapshot.take()
                if not snapshot.leaks_against(base, pooled_ports):
                    return snapshot
            await trio.sleep(0.1)
    return Snapshot.take()


async def quiet(ready: Callable[[], bool], seconds: float = 10.0) -> Snapshot:
    """The baseline: once `ready()`, a snapshot that stays the same for a moment."""
    with trio.move_on_after(seconds):
        previous = None
        while True:
            await trio.sleep(0.2)
            if not ready():
                continue
            snapshot = Snapshot.take()
            if (
                previous is not None
                and not snapshot.leaks_against(previous)
                and not previous.leaks_against(snapshot)
            ):
                return snapshot
            previous = snapshot
    return Snapshot.take()
