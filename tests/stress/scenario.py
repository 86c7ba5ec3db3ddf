"""The stress scenario both stores run: logical clients across users, the send API (single
and batch) and another writer of the store, roaming disconnects and reconnects; then the
delivery checks, and the checks that nothing is left behind.

Users get messages from one source each (the send API, or the other writer through the
store's feed), and only one tab per user roams; every connection must show its user's
messages in the user's log order (`order_violations`).
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence

import trio

from sidecar import stream
from sidecar.hub import Hub
from sidecar.protocol.message import IdGenerator, Message
from tests.sidecar_harness import Sidecar, logged_messages
from tests.stress.harness import (
    SCALE,
    HttpConnection,
    LogicalClient,
    Snapshot,
    SseConnection,
    order_violations,
    quiet,
    rss_bytes,
    settle,
)
from tests.tock_documents import tock_text

PATH = "/io/app/web/sse"


@dataclasses.dataclass(frozen=True)
class Sizes:
    streams: int
    users: int
    api_messages: int  # through the send API, about half in batches
    foreign_messages: int  # written to the store by another writer
    api_senders: int = 4  # concurrent connections to the send API
    mean_lifetime: float = 0.5  # seconds a roaming tab's connection lasts, on average
    deliver_within: float = 30.0  # after the last send, for every tab to have everything


@dataclasses.dataclass
class Outcome:
    peak_rss: int
    peak_blocks: int
    summary: str


SaveForeign = Callable[[Sequence[Message]], Awaitable[None]]
# How far above where the first run left it a second run of the same load may leave RSS:
# 8 MiB at the normal run's size (observed: 1-2 MiB), more in proportion for bigger runs.
RSS_SLACK = round(max(1.0, SCALE) * (8 << 20))


async def warm_up(sidecar: Sidecar) -> None:
    """One stream and a few sends, so one-time allocations are not counted as growth."""
    stream = await SseConnection.open(sidecar.public, f"{PATH}?userId=warm-up", None)
    sender = await HttpConnection.open(sidecar.send_url)
    try:
        for n in range(3):
            body = {"connectorId": "web", "recipientId": "warm-up", "response": tock_text(str(n))}
            status, _ = await sender.post_json("/v1/send", body)
            assert status == 202
        with trio.move_on_after(5):
            received = 0
            while received < 3:
                received += sum(e.event == "message" for e in await stream.next_events())
    finally:
        await sender.aclose()
        await stream.aclose()


async def baseline(sidecar: Sidecar) -> Snapshot:
    hub = sidecar.running.hub
    await warm_up(sidecar)
    return await quiet(lambda: hub.stream_count() == 0)


async def exercise(
    sidecar: Sidecar,
    sizes: Sizes,
    rng: random.Random,
    save_foreign: SaveForeign,
    user_prefix: str,
) -> Outcome:
    """Run the scenario in one nursery, cancel it, and check what every tab received."""
    hub = sidecar.running.hub
    users = [f"{user_prefix}{n}" for n in range(sizes.users)]
    api_users, foreign_users = users[: sizes.users // 2], users[sizes.users // 2 :]
    clients = [
        LogicalClient(
            users[n % sizes.users],
            roams=n < sizes.users,  # the first tab of each user
            rng=random.Random(rng.random()),
            mean_lifetime=sizes.mean_lifetime,
        )
        for n in range(sizes.streams)
    ]
    expected: dict[str, set[str]] = defaultdict(set)
    connect_limit = trio.CapacityLimiter(64)
    timings: dict[str, float] = {}

    async def api_sender(count: int, seed: float) -> None:
        local = random.Random(seed)
        connection = await HttpConnection.open(sidecar.send_url)
        try:
            sent = 0
            while sent < count:
                size = 1 if local.random() < 0.5 else min(local.randint(2, 40), count - sent)
                items = [
                    {
                        "connectorId": "web",
                        "recipientId": local.choice(api_users),
                        "response": tock_text(f"api {sent + i}"),
                    }
                    for i in range(size)
                ]
                if size == 1:
                    status, reply = await connection.post_json("/v1/send", items[0])
                    results = [reply]
                else:
                    status, reply = await connection.post_json("/v1/send/batch", items)
                    results = reply["results"]
                assert status == 202, reply
                for item, result in zip(items, results, strict=True):
                    expected[item["recipientId"]].add(result["id"])
                sent += size
        finally:
            await connection.aclose()

    async def foreign_writer(count: int, seed: float) -> None:
        """Another writer of the store (another process, Tock): its messages reach the
        streams only through the sidecar's feed."""
        local = random.Random(seed)
        new_id = IdGenerator()
        written = 0
        while written < count:
            size = min(local.randint(1, 20), count - written)
            messages = [
                Message(new_id(), "web", local.choice(foreign_users), {"n": written + i})
                for i in range(size)
            ]
            for message in messages:
                expected[message.recipient_id].add(message.id)
            await save_foreign(messages)
            written += size
            await trio.sleep(local.uniform(0, 0.02))

    def complete() -> bool:
        return all(expected[c.user] <= c.seen for c in clients)

    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.run, sidecar.public, PATH, connect_limit)
        with trio.fail_after(60):
            for client in clients:
                await client.connected.wait()
        assert hub.stream_count() == sizes.streams
        timings["connect"] = time.monotonic() - start
        for client in clients:
            client.roam(True)
        async with trio.open_nursery() as senders:
            per_sender = sizes.api_messages // sizes.api_senders
            for _ in range(sizes.api_senders):
                senders.start_soon(api_sender, per_sender, rng.random())
            senders.start_soon(foreign_writer, sizes.foreign_messages, rng.random())
        timings["send"] = time.monotonic() - start - timings["connect"]
        for client in clients:
            client.roam(False)
        peak_rss, peak_blocks = rss_bytes(), sys.getallocatedblocks()
        with trio.move_on_after(sizes.deliver_within):
            while not complete():
                await trio.sleep(0.05)
        peak_rss = max(peak_rss, rss_bytes())
        peak_blocks = max(peak_blocks, sys.getallocatedblocks())
        timings["drain"] = time.monotonic() - start - timings["connect"] - timings["send"]
        nursery.cancel_scope.cancel()

    total = sum(len(ids) for ids in expected.values())
    api_total = sizes.api_messages // sizes.api_senders * sizes.api_senders
    assert total == api_total + sizes.foreign_messages
    missing = {
        (n, c.user): len(expected[c.user] - c.seen)
        for n, c in enumerate(clients)
        if expected[c.user] - c.seen
    }
    foreign = [c.user for c in clients if c.seen - expected[c.user]]
    seq_of = {
        m.id: m.seq for user in expected for m in await logged_messages(sidecar.running.store, user)
    }
    violations = [v for c in clients for v in order_violations(c, seq_of)]
    problems = []
    if missing:
        problems.append(
            f"tabs missing messages {{(tab, user): count}}: {dict(list(missing.items())[:10])}"
        )
    if foreign:
        problems.append(f"tabs got another user's messages: {foreign[:10]}")
    if violations:
        problems.append(
            f"out of log order on one connection (tab, before, after): {violations[:5]}"
        )
    assert not problems, "\n".join(problems)
    # Nothing was cut off (the buffers are sized for it), so only roaming tabs reconnected.
    assert sum(c.server_closes for c in clients) == 0
    assert hub.stats.cut_off == 0
    reconnects = sum(len(c.connections) - 1 for c in clients)
    assert reconnects > 0
    writes = sum(len(ids) for c in clients for ids in c.connections)
    repeats = sum(c.duplicates for c in clients)
    summary = (
        f"{sizes.streams} streams / {sizes.users} users, {total} messages, {writes} writes, "
        f"{reconnects} reconnects, {repeats} repeats dropped by the clients; "
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    )
    return Outcome(peak_rss, peak_blocks, summary)


def forget_cached_frames() -> None:
    """Empty the streams' shared frame cache: it keeps up to FRAME_CACHE_BYTES of the most
    recent frames with their response objects (about 70,000 Python blocks with the small
    messages here), bounded but not given back, and would hide what a leak keeps."""
    cache = stream._frame.__self__  # type: ignore[attr-defined]
    cache._frames.clear()
    cache._bytes = 0


async def nothing_left(
    hub: Hub, base: Snapshot, outcome: Outcome, pooled_ports: Iterable[int] = ()
) -> Snapshot:
    """After a run's nursery: no stream, task, thread or file descriptor left (but the
    database client's pooled connections to `pooled_ports`), and the objects the run
    allocated given back (the instance keeps only bounded windows of recent ids)."""
    forget_cached_frames()
    after = await settle(base, lambda: hub.stream_count() == 0, pooled_ports=pooled_ports)
    assert hub.stream_count() == 0
    leaks = after.leaks_against(base, pooled_ports)
    assert not leaks, leaks
    kept_blocks = after.blocks - base.blocks
    assert kept_blocks <= max(50_000, (outcome.peak_blocks - base.blocks) // 4), (
        f"Python blocks {base.blocks} before, {outcome.peak_blocks} at peak, {after.blocks} after"
    )
    return after


async def exercise_twice(
    sidecar: Sidecar,
    sizes: Sizes,
    rng: random.Random,
    save_foreign: SaveForeign,
    pooled_ports: Iterable[int] = (),
) -> str:
    """The scenario twice at the same size (other users the second time), nothing left after
    either, and RSS back near where the first run left it once the second is over.

    The first run primes the allocators: CPython keeps an arena while any object in it
    lives and glibc keeps fragmented heap, so RSS does not fall back to its cold start. A
    second run of the same load reuses that memory; what it leaves on top is growth."""
    hub = sidecar.running.hub
    cold = await baseline(sidecar)
    first = await exercise(sidecar, sizes, rng, save_foreign, user_prefix="first-")
    primed = await nothing_left(hub, cold, first, pooled_ports)
    second = await exercise(sidecar, sizes, rng, save_foreign, user_prefix="second-")
    after = await nothing_left(hub, primed, second, pooled_ports)
    memory = (
        f"RSS {cold.rss >> 20} MiB cold, {primed.rss >> 20} after the first run, "
        f"{second.peak_rss >> 20} at the second's peak, {after.rss >> 20} after it; "
        f"Python blocks {cold.blocks} cold, {primed.blocks}, {second.peak_blocks}, {after.blocks}"
    )
    assert after.rss <= primed.rss + RSS_SLACK, memory
    return f"{second.summary}; {memory}"
