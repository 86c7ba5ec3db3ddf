"""Delivery under faults (issue #13): several sidecar processes on one mongo-java-server,
tabs that follow sidecar-sse.js, a load balancer that picks an instance per request,
reloads, connections dropped with bytes in flight, SIGKILLed instances, a MongoDB restart,
and a bot that retries every send with its Idempotency-Key.

Asserted: no accepted message lost on any tab, none shown twice on one tab across its
reloads, and no two sends made one after the other shown in the other order. Sized for CI;
`just chaos` runs it longer (CHAOS_SCALE).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest
import trio

from sidecar.store.documents import DELIVERY
from tests.chaos.harness import SCALE, Bot, Fleet, Ledger, Tab, scaled
from tests.mongo_harness import MongoJavaServer

SEED = 20261203
# A larger run is longer, and busier only up to MAX_USERS users (two tabs each): on this
# machine's two cores the tabs and bots of this process take one, and past 20 users the
# fleet falls behind the load (docs/delivery.md, "Where it stands").
MAX_USERS = int(os.environ.get("CHAOS_MAX_USERS", "20"))
# How long the tabs get to catch up once the faults stop (a larger run has more to catch
# up on, and on this machine's two cores the tabs and bots take one of them).
DRAIN_SECONDS = 60.0 * max(1.0, SCALE)


@pytest.mark.time_limit(max(120.0, 120.0 * SCALE) + DRAIN_SECONDS)
async def test_nothing_lost_nothing_twice_in_order_under_faults(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    server = MongoJavaServer()
    h2 = tmp_path / "mongo.h2"
    await trio.to_thread.run_sync(lambda: server.start(h2_path=h2))
    ledger = Ledger()
    env = {
        "SIDECAR_STORE": server.uri,
        "SIDECAR_MONGO_DB": "chaos",
        "SIDECAR_KEEPALIVE_SECONDS": "1",
    }
    fleet = Fleet(env, 3, rng)
    users = [f"user-{n}" for n in range(min(scaled(5), MAX_USERS))]
    turns = scaled(40)
    try:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(fleet.run)
            tabs = [
                Tab(f"{user}/tab-{t}", user, fleet, ledger, client)
                for user in users
                for t in range(2)
            ]
            for tab in tabs:
                nursery.start_soon(tab.run, random.Random(rng.random()))
            with trio.fail_after(30):
                for tab in tabs:
                    await tab.connected.wait()

            async def faults() -> None:
                await trio.sleep(2)
                fleet.sigkill()
                await trio.sleep(3)
                await trio.to_thread.run_sync(server.stop)
                ledger.counts["mongodb restarts"] += 1
                await trio.sleep(1.5)
                await trio.to_thread.run_sync(lambda: server.start(h2_path=h2, port=server.port))
                while True:
                    await trio.sleep(rng.uniform(3, 6))
                    fleet.sigkill()

            async with trio.open_nursery() as load:
                load.start_soon(faults)
                async with trio.open_nursery() as bots:
                    for user in users:
                        bot = Bot(user, fleet, ledger, client)
                        bots.start_soon(bot.run, turns, random.Random(rng.random()))
                load.cancel_scope.cancel()
            for tab in tabs:
                tab.faulty = False
            # The fleet's lag, apart from what it lost: how long the tabs took to have every
            # accepted message once the faults stopped.
            quiet = trio.current_time()
            with trio.move_on_after(DRAIN_SECONDS):
                while not ledger.complete():
                    await trio.sleep(0.1)
            ledger.counts["seconds to catch up"] = round(trio.current_time() - quiet, 1)
            nursery.cancel_scope.cancel()
        lacking = {ledger.user_of[tab] for tab, _, _ in ledger.lost()}
        log_of = await trio.to_thread.run_sync(lambda: user_logs(server.uri, lacking))
    finally:
        await trio.to_thread.run_sync(server.stop)
    report = ledger.report() | {"sigkills": fleet.kills, "failed starts": fleet.failed_starts}
    print(f"\nchaos: {report}")
    failed = (report["lost"], report["shown twice"], report["order violations"]) != (0, 0, 0)
    if failed:
        # pytest keeps only its last three temporary directories: a long run's diagnosis
        # outlives the runs after it where CHAOS_DIAGNOSIS says.
        where = Path(os.environ.get("CHAOS_DIAGNOSIS", tmp_path)) / f"diagnosis-{os.getpid()}"
        where.mkdir(parents=True)
        (where / "lost.txt").write_text(ledger.diagnose(log_of))
        for name, log in fleet.logs.items():
            (where / f"{name}.log").write_bytes(log)
        print(f"chaos: what the failed run left is in {where}")
    assert report["accepted"] == len(users) * turns
    assert not failed, report


def user_logs(uri: str, users: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Each user's log records as the store has them (`sidecar_delivery`), in seq order."""
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
        records = client["chaos"][DELIVERY]
        return {
            user: list(records.find({"recipientId": user}).sort([("epoch", 1), ("seq", 1)]))
            for user in sorted(users)
        }
