"""The load generator: one trio process on raw sockets (a client library would be the
bottleneck), run by bench/run.py once per scenario and server; prints one JSON line.

Streams are read without full parsing: every server writes one SSE frame per chunk, so
counting `event: message` in the raw bytes (keeping a tail across reads) counts messages,
and the latency mode finds each message's send stamp `"t":<ns>` in complete frames.

Every run reports the generator's own CPU time and utilisation, so a client limit is not
mistaken for a server limit.

    python -m bench.loadgen MODE JSON_SPEC
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import trio

from bench.common import NOTHING_SEEN, STREAM_PATH, cpu_seconds, percentile, raise_nofile

TOKEN = b"event: message"
PING = b"event: ping"
STAMP = re.compile(rb'"t":(\d+)')
CONNECT_CONCURRENCY = 100


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Phase:
    """Wall time, this process's CPU, and the servers' CPU over one measured phase."""

    def __init__(self, server_pids: list[int]) -> None:
        self.pids = server_pids
        self.wall0 = time.monotonic()
        self.cpu0 = self_cpu()
        self.server0 = [cpu_seconds(p) for p in server_pids]

    def end(self) -> dict[str, Any]:
        wall = time.monotonic() - self.wall0
        gen = self_cpu() - self.cpu0
        server = sum(cpu_seconds(p) for p in self.pids) - sum(self.server0)
        return {
            "wall_s": wall,
            "gen_cpu_s": gen,
            "gen_cpu_util": gen / wall if wall else 0.0,
            "server_cpu_s": server,
            "server_cpu_util": server / wall if wall else 0.0,
        }


def split_url(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port.split("/")[0])


async def read_head(stream: trio.SocketStream) -> tuple[int, bytes, bytes]:
    """Read a response head; (status, head, what came after it)."""
    buffer = b""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("closed before the response head")
        buffer += data
    head = buffer[:end]
    return int(head[9:12]), head, buffer[end + 4 :]


class Poster:
    """One keep-alive connection for POSTs; responses with a content-length or chunked."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host.encode()
        self.buffer = b""

    @classmethod
    async def open(cls, url: str) -> Poster:
        host, port = split_url(url)
        return cls(await trio.open_tcp_stream(host, port), f"{host}:{port}")

    async def post(self, path: bytes, body: bytes) -> tuple[int, bytes]:
        await self.stream.send_all(
            b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (path, self.host, len(body), body)
        )
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._more()
        head, self.buffer = self.buffer[:end].lower(), self.buffer[end + 4 :]
        status = int(head[9:12])
        at = head.find(b"content-length:")
        if at >= 0:
            length = int(head[at + 15 : head.find(b"\r\n", at) if b"\r\n" in head[at:] else None])
            while len(self.buffer) < length:
                await self._more()
            reply, self.buffer = self.buffer[:length], self.buffer[length:]
            return status, reply
        parts = []  # chunked
        while True:
            while (end := self.buffer.find(b"\r\n")) < 0:
                await self._more()
            size = int(self.buffer[:end].split(b";")[0], 16)
            while len(self.buffer) < end + 2 + size + 2:
                await self._more()
            parts.append(self.buffer[end + 2 : end + 2 + size])
            self.buffer = self.buffer[end + 2 + size + 2 :]
            if size == 0:
                return status, b"".join(parts)

    async def _more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("send connection closed")
        self.buffer += data


def send_body(user: str, response: dict[str, Any]) -> bytes:
    return json.dumps({"connectorId": "web", "recipientId": user, "response": response}).encode()


@dataclass
class Reader:
    """One open stream: counts messages, optionally collects latencies."""

    stream: trio.SocketStream
    rest: bytes
    count: int = 0
    closed_by_server: bool = False
    latencies: list[float] | None = None
    first_at: float | None = None
    last_at: float = 0.0


@dataclass
class Streams:
    readers: list[Reader] = field(default_factory=list)
    delivered: int = 0
    # Count a stream that cannot be opened in `failed` instead of failing the run (the idle
    # scenario near the file descriptor limit).
    tolerant: bool = False
    failed: int = 0
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    async def open(
        self,
        nursery: trio.Nursery,
        url: str,
        users: list[str],
        *,
        latencies: list[float] | None = None,
        last_event_id: str | None = None,
    ) -> float:
        """Open one stream per entry of `users` (each seen its first ping); seconds taken."""
        host, port = split_url(url)
        limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
        start = time.monotonic()
        header = f"last-event-id: {last_event_id}\r\n" if last_event_id else ""

        async def connect(user: str) -> tuple[trio.SocketStream, bytes]:
            stream = await trio.open_tcp_stream(host, port)
            try:
                await stream.send_all(
                    f"GET {STREAM_PATH}?userId={user} HTTP/1.1\r\nhost: {host}:{port}\r\n"
                    f"accept: text/event-stream\r\n{header}\r\n".encode()
                )
                status, _, rest = await read_head(stream)
                if status != 200:
                    raise ConnectionError(f"stream answered {status}")
                while PING not in rest:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise ConnectionError("stream closed before its first ping")
                    rest += data
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return stream, rest

        async def one(user: str) -> None:
            try:
                async with limiter:
                    stream, rest = await connect(user)
            except (OSError, ConnectionError, trio.BrokenResourceError):
                if not self.tolerant:
                    raise
                self.failed += 1
                return
            reader = Reader(stream, rest[rest.find(PING) + len(PING) :], latencies=latencies)
            self.readers.append(reader)
            nursery.start_soon(self.read, reader)

        async with trio.open_nursery() as openers:
            for user in users:
                openers.start_soon(one, user)
        return time.monotonic() - start

    async def read(self, reader: Reader) -> None:
        tail = reader.rest
        stream, latencies = reader.stream, reader.latencies
        pending = tail if latencies is not None else b""
        if latencies is None and tail.count(TOKEN):
            reader.count += tail.count(TOKEN)
            self.delivered += tail.count(TOKEN)
            reader.first_at = reader.last_at = time.monotonic()
        try:
            while True:
                data = await stream.receive_some(262144)
                if not data:
                    reader.closed_by_server = True
                    return
                now = time.monotonic()
                if latencies is None:
                    window = tail[-13:] + data
                    n = window.count(TOKEN)
                    tail = window
                else:
                    pending += data
                    end = pending.rfind(b"\n\n")
                    if end < 0:
                        continue
                    complete, pending = pending[:end], pending[end:]
                    now_ns = time.monotonic_ns()
                    stamps = STAMP.findall(complete)
                    latencies.extend((now_ns - int(s)) / 1e6 for s in stamps)
                    n = len(stamps)
                if n:
                    if reader.first_at is None:
                        reader.first_at = now
                    reader.last_at = now
                    reader.count += n
                    self.delivered += n
                    if self.lot:
                        self.lot.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            reader.closed_by_server = True

    async def wait_delivered(self, expected: int, seconds: float) -> None:
        with trio.move_on_after(seconds):
            while self.delivered < expected:
                await self.lot.park()


# --- modes -------------------------------------------------------------------------------


async def mode_idle(spec: dict[str, Any]) -> None:
    """Interactive: `open N` holds N streams in all (answers a JSON line), `quit` ends."""
    prefix = spec["prefix"]
    streams = Streams(tolerant=True)
    stdin = trio.lowlevel.FdStream(0)
    async with trio.open_nursery() as nursery:
        buffer = b""
        while True:
            while b"\n" not in buffer:
                data = await stdin.receive_some(4096)
                if not data:
                    nursery.cancel_scope.cancel()
                    return
                buffer += data
            line, _, buffer = buffer.partition(b"\n")
            command = line.decode().split()
            if command[0] == "quit":
                nursery.cancel_scope.cancel()
                break
            target = int(command[1])
            have = len(streams.readers)
            users = [f"{prefix}{n}" for n in range(have, target)]
            cpu, failed = self_cpu(), streams.failed
            seconds = await streams.open(nursery, spec["public"], users)
            emit(
                {
                    "open": len(streams.readers),
                    "seconds": seconds,
                    "failed": streams.failed - failed,
                    "gen_cpu_s": self_cpu() - cpu,
                    "closed_by_server": sum(r.closed_by_server for r in streams.readers),
                }
            )


async def mode_fanout(spec: dict[str, Any]) -> dict[str, Any]:
    """Publish as fast as the streams drain (at most `window` deliveries outstanding, well
    under every server's per-stream buffer) for `seconds`; count what arrives."""
    users = [f"f{n}" for n in range(spec["users"])]
    per_user = spec["streams_per_user"]
    window = spec.get("window", max(4096, 32 * per_user))
    streams = Streams()
    sent = errors = 0
    async with trio.open_nursery() as nursery:
        open_s = await streams.open(
            nursery, spec["public"], [u for u in users for _ in range(per_user)]
        )
        posters = [await Poster.open(spec["send"]) for _ in range(spec["publishers"])]
        phase = Phase(spec["server_pids"])
        deadline = trio.current_time() + spec["seconds"]
        next_user = count()

        async def publish(poster: Poster) -> None:
            nonlocal sent, errors
            while trio.current_time() < deadline:
                while sent * per_user - streams.delivered > window:
                    await streams.lot.park()
                user = users[next(next_user) % len(users)]
                status, _ = await poster.post(b"/v1/send", send_body(user, {"text": "fan-out"}))
                if status == 202:
                    sent += 1
                else:
                    errors += 1

        async with trio.open_nursery() as publishers:
            for poster in posters:
                publishers.start_soon(publish, poster)
        publish_s = time.monotonic() - phase.wall0
        await streams.wait_delivered(sent * per_user, spec.get("drain_s", 10))
        measured = phase.end()
        nursery.cancel_scope.cancel()
    expected = sent * per_user
    delivered = streams.delivered
    return {
        "streams": len(streams.readers),
        "open_s": open_s,
        "sent": sent,
        "errors": errors,
        "expected": expected,
        "delivered": delivered,
        "loss": max(0, expected - delivered),
        "extra": max(0, delivered - expected),
        "closed_by_server": sum(r.closed_by_server for r in streams.readers),
        "publish_per_s": sent / publish_s,
        "delivered_per_s": delivered / measured["wall_s"],
        "server_cpu_us_per_delivered": 1e6 * measured["server_cpu_s"] / max(1, delivered),
        **measured,
    }


async def mode_latency(spec: dict[str, Any]) -> dict[str, Any]:
    """Send at a fixed rate (open loop: each message is stamped with its scheduled time, so
    a server or client that falls behind shows as latency), one stream per user."""
    users = [f"l{n}" for n in range(spec["users"])]
    rate, seconds = spec["rate"], spec["seconds"]
    total = int(rate * seconds)
    latencies: list[float] = []
    streams = Streams()
    sent = errors = unsent = 0
    async with trio.open_nursery() as nursery:
        await streams.open(nursery, spec["public"], users, latencies=latencies)
        posters = [await Poster.open(spec["send"]) for _ in range(spec["publishers"])]
        jobs_in, jobs_out = trio.open_memory_channel[tuple[str, int]](total + 1)
        phase = Phase(spec["server_pids"])
        start_ns = time.monotonic_ns() + 10_000_000

        async def schedule() -> None:
            async with jobs_in:
                for i in range(total):
                    due = start_ns + i * 1_000_000_000 // rate
                    delay = (due - time.monotonic_ns()) / 1e9
                    if delay > 0.0005:
                        await trio.sleep(delay)
                    jobs_in.send_nowait((users[i % len(users)], due))

        # A server that cannot keep up is not given the whole backlog: what is still queued
        # a second after the schedule ends is counted as unsent.
        stop_ns = start_ns + int(seconds * 1e9) + 1_000_000_000

        async def post(poster: Poster) -> None:
            nonlocal sent, errors, unsent
            async for user, due in jobs_out:
                if time.monotonic_ns() > stop_ns:
                    unsent += 1
                    continue
                status, _ = await poster.post(b"/v1/send", send_body(user, {"t": due}))
                if status == 202:
                    sent += 1
                else:
                    errors += 1

        async with trio.open_nursery() as senders:
            senders.start_soon(schedule)
            for poster in posters:
                senders.start_soon(post, poster)
        send_s = time.monotonic() - phase.wall0
        await streams.wait_delivered(sent, spec.get("drain_s", 10))
        measured = phase.end()
        nursery.cancel_scope.cancel()
    return {
        "target_rate": rate,
        "sent": sent,
        "errors": errors,
        "unsent": unsent,
        "achieved_rate": sent / send_s,
        "received": len(latencies),
        "loss": max(0, sent - len(latencies)),
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies) if latencies else None,
        "server_cpu_us_per_message": 1e6 * measured["server_cpu_s"] / max(1, sent),
        **measured,
    }


async def mode_send(spec: dict[str, Any]) -> dict[str, Any]:
    """The send API alone (no stream open): single or batch requests, `concurrency`
    connections, for `seconds`."""
    batch = spec.get("batch", 1)
    users = [f"s{n}" for n in range(1000)]
    messages = requests = errors = 0
    latencies: list[float] = []
    posters = [await Poster.open(spec["send"]) for _ in range(spec["concurrency"])]
    phase = Phase(spec["server_pids"])
    deadline = trio.current_time() + spec["seconds"]
    counter = count()

    def body() -> tuple[bytes, bytes]:
        if batch == 1:
            return b"/v1/send", send_body(users[next(counter) % 1000], {"text": "single"})
        items = [
            {"connectorId": "web", "recipientId": users[next(counter) % 1000], "response": {"b": 1}}
            for _ in range(batch)
        ]
        return b"/v1/send/batch", json.dumps(items).encode()

    async def loop(poster: Poster) -> None:
        nonlocal messages, requests, errors
        while trio.current_time() < deadline:
            path, payload = body()
            t0 = time.monotonic()
            status, _ = await poster.post(path, payload)
            latencies.append((time.monotonic() - t0) * 1000)
            if status == 202:
                requests += 1
                messages += batch
            else:
                errors += 1

    async with trio.open_nursery() as nursery:
        for poster in posters:
            nursery.start_soon(loop, poster)
    measured = phase.end()
    for poster in posters:
        await poster.stream.aclose()
    return {
        "batch": batch,
        "concurrency": spec["concurrency"],
        "requests": requests,
        "messages": messages,
        "errors": errors,
        "messages_per_s": messages / measured["wall_s"],
        "requests_per_s": requests / measured["wall_s"],
        "request_p50_ms": percentile(latencies, 50),
        "request_p99_ms": percentile(latencies, 99),
        "server_cpu_us_per_message": 1e6 * measured["server_cpu_s"] / max(1, messages),
        **measured,
    }


async def mode_replay(spec: dict[str, Any]) -> dict[str, Any]:
    """Store `count` messages for a user with no stream open (batches of 1000), then time
    a stream that says it has seen nothing until all of them have arrived."""
    n, user = spec["count"], spec["user"]
    poster = await Poster.open(spec["send"])
    t0 = time.monotonic()
    stored = 0
    while stored < n:
        size = min(1000, n - stored)
        items = [
            {"connectorId": "web", "recipientId": user, "response": {"n": stored + i}}
            for i in range(size)
        ]
        status, reply = await poster.post(b"/v1/send/batch", json.dumps(items).encode())
        if status != 202:
            raise RuntimeError(f"batch answered {status}: {reply[:200]!r}")
        stored += size
    store_s = time.monotonic() - t0
    await poster.stream.aclose()
    streams = Streams()
    async with trio.open_nursery() as nursery:
        phase = Phase(spec["server_pids"])
        open_s = await streams.open(nursery, spec["public"], [user], last_event_id=NOTHING_SEEN)
        await streams.wait_delivered(n, spec.get("cap_s", 60))
        measured = phase.end()
        reader = streams.readers[0]
        nursery.cancel_scope.cancel()
    first = None if reader.first_at is None else reader.first_at - phase.wall0
    return {
        "count": n,
        "received": streams.delivered,
        "store_s": store_s,
        "open_s": open_s,
        "first_message_s": first,
        "replay_s": reader.last_at - phase.wall0 if reader.count else None,
        "messages_per_s": streams.delivered / max(1e-9, reader.last_at - phase.wall0),
        **measured,
    }


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


MODES = {
    "fanout": mode_fanout,
    "latency": mode_latency,
    "send": mode_send,
    "replay": mode_replay,
}


def main() -> None:
    raise_nofile()
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    if mode == "idle":
        trio.run(mode_idle, spec)
        return
    emit(trio.run(capped, MODES[mode], spec))


async def capped(fn: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Every mode is bounded in time whatever the server does."""
    with trio.fail_after(spec.get("time_cap_s", 180)):
        result: dict[str, Any] = await fn(spec)
        return result


if __name__ == "__main__":
    main()
