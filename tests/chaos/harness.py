"""Fault injection across several sidecar processes on one mongo-java-server.

A `Fleet` runs sidecar processes, each in a slot that can be SIGKILLed (by the PID this
harness started) and restarts on fresh ports; `pick` plays the load balancer, a random
instance per request. A `Tab` behaves as `sidecar-sse.js` does: its place (the last id it
handed to the page) lives in the tab's sessionStorage and survives reloads; a reload opens
a new page with `?lastEventId=`, an EventSource reconnect after a dropped connection sends
`Last-Event-ID` (the page's URL keeps the id of its load); whatever was in flight when a
connection drops is lost; the page drops an id it has already shown, and acks what it
shows; a `place` event's id is kept as a message's is, and neither shown nor acked. A
`Bot` sends each user's turns one after the other, each with an Idempotency-Key,
retrying through any instance until it gets a `202`, and sometimes sends a turn twice
(its first answer lost).

`Ledger` holds what was accepted, per user in send order, and what each tab showed across
its reloads; `Ledger.report` counts what the issue asks: messages lost, shown twice on one
tab, and pairs of sends made one after the other shown in the other order, naming the
tab and turn of each loss. For a failed run, `Ledger.diagnose` writes what is needed to
find its cause: each lost message's send (when, through which instance) and the tab's
history (connects, shows, reloads, drops) with the user's log as the store has it, and
`Fleet.logs` keeps the log of every instance that ran.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, cast

import httpx
import trio

from sidecar.protocol.delivery import SEEN_NOTHING
from tests.sidecar_harness import SidecarProcess, SseClient, spawn_sidecar
from tests.tock_documents import tock_text

SCALE = float(os.environ.get("CHAOS_SCALE", "1"))
PATH = "/io/app/web/sse"


def scaled(n: float) -> int:
    return max(1, round(n * SCALE))


@dataclasses.dataclass(eq=False)
class Slot:
    """One instance's place in the fleet: the process running there now, if any."""

    index: int
    process: SidecarProcess | None = None
    kill: trio.Event = dataclasses.field(default_factory=trio.Event)
    up: trio.Event = dataclasses.field(default_factory=trio.Event)
    starts: int = 0


class Fleet:
    def __init__(self, env: dict[str, str], size: int, rng: random.Random) -> None:
        self._env = env
        self.slots = [Slot(i) for i in range(size)]
        self._rng = rng
        self.kills = 0
        self.failed_starts = 0
        self.logs: dict[str, bytes] = {}  # "slot-<index>-start-<n>" -> that process's log

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep every slot running an instance until cancelled; started once all are up."""
        async with trio.open_nursery() as nursery:
            for slot in self.slots:  # one after the other: the first creates the collections
                nursery.start_soon(self._keep, slot)
                await slot.up.wait()
            task_status.started()

    async def _keep(self, slot: Slot) -> None:
        while True:
            try:
                await self._serve(slot)
            except AssertionError as exc:  # it exited at start-up (MongoDB down): again
                if "exited before listening" not in str(exc):
                    raise
                self.failed_starts += 1
            await trio.sleep(0.3)

    async def _serve(self, slot: Slot) -> None:
        async with spawn_sidecar(self._env) as process:
            slot.process, slot.starts = process, slot.starts + 1
            slot.up.set()
            try:
                await slot.kill.wait()
                slot.process, slot.up, slot.kill = None, trio.Event(), trio.Event()
                process.process.kill()  # SIGKILL, of the process this harness started
                await process.process.wait()
            finally:
                self.logs[f"slot-{slot.index}-start-{slot.starts}"] = bytes(process.log)

    def instance_name(self, process: SidecarProcess) -> str:
        return next(
            (f"slot-{s.index}-start-{s.starts}" for s in self.slots if s.process is process),
            process.public,
        )

    def sigkill(self) -> None:
        """Kill a random running instance; its slot starts another."""
        running = [s for s in self.slots if s.process is not None]
        if len(running) > 1:
            self._rng.choice(running).kill.set()
            self.kills += 1

    def pick(self) -> SidecarProcess | None:
        """The load balancer: a random running instance."""
        running = [s.process for s in self.slots if s.process is not None]
        return self._rng.choice(running) if running else None


@dataclasses.dataclass
class Ledger:
    accepted: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # send order
    shown: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # tab -> ids
    user_of: dict[str, str] = dataclasses.field(default_factory=dict)  # tab -> user
    counts: Counter[str] = dataclasses.field(default_factory=Counter)
    # message id -> when it was accepted, through which instance, which turn
    sends: dict[str, str] = dataclasses.field(default_factory=dict)
    history: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # tab -> events

    def note(self, tab: str, event: str) -> None:
        self.history[tab].append(f"{trio.current_time():10.3f} {event}")

    def lost(self) -> list[tuple[str, int, str]]:
        """(tab, turn, message id) of every accepted message a tab of its user lacks."""
        return [
            (tab, turn, message_id)
            for tab, user in self.user_of.items()
            for turn, message_id in enumerate(self.accepted.get(user, []))
            if message_id not in set(self.shown[tab])
        ]

    def diagnose(self, log_of: dict[str, list[dict[str, Any]]]) -> str:
        """What is known of each lost message: its send, its user's log (`log_of`: the
        store's records of each user, in seq order) and its tab's history."""
        lines = []
        for tab, turn, message_id in self.lost():
            user = self.user_of[tab]
            lines.append(f"== {tab} lacks turn {turn}: {message_id}, {self.sends.get(message_id)}")
            shown = set(self.shown[tab])
            for record in log_of.get(user, []):
                mark = "shown" if record.get("_id") in shown else "NOT SHOWN"
                lines.append(f"   log {record}: {mark} on {tab}")
            lines.extend(f"   {event}" for event in self.history[tab])
        return "\n".join(lines)

    def complete(self) -> bool:
        return all(
            set(self.accepted.get(user, ())) <= set(self.shown[tab])
            for tab, user in self.user_of.items()
        )

    def report(self) -> dict[str, Any]:
        lost = twice = order = 0
        for tab, turn, _ in self.lost():
            lost += 1
            self.counts[f"lost on {tab}, turn {turn}"] += 1
        for tab, user in self.user_of.items():
            shown, sent = self.shown[tab], self.accepted.get(user, [])
            twice += sum(n - 1 for n in Counter(shown).values() if n > 1)
            first_shown = {}
            for i, message_id in enumerate(shown):
                first_shown.setdefault(message_id, i)
            placed = [(turn, first_shown[m]) for turn, m in enumerate(sent) if m in first_shown]
            for (turn, a), (_, b) in itertools.pairwise(placed):
                if a > b:
                    order += 1
                    self.counts[f"order violations of {user}, turn {turn}"] += 1
        return {
            "accepted": sum(len(ids) for ids in self.accepted.values()),
            "tabs": len(self.user_of),
            "lost": lost,
            "shown twice": twice,
            "order violations": order,
            **dict(self.counts),
        }


class Tab:
    """One browser tab of `user` running the browser client (see the module docstring)."""

    def __init__(
        self, name: str, user: str, fleet: Fleet, ledger: Ledger, client: httpx.AsyncClient
    ) -> None:
        self.name, self.user = name, user
        self._fleet, self._ledger, self._client = fleet, ledger, client
        self._stored: str | None = None  # sessionStorage: the last id shown, across reloads
        self._page_id: str | None = None  # the lastEventId of this page's URL
        self._seen: set[str] = set()  # this page's ids already shown
        self._acks: list[str] = []
        self.faulty = True  # reloads and drops while true
        self.connected = trio.Event()
        ledger.shown[name] = []
        ledger.user_of[name] = user
        ledger.history[name] = []

    async def run(self, rng: random.Random) -> None:
        self._reload()
        header: str | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ack_loop, rng)
            while True:
                instance = self._fleet.pick()
                if instance is None:
                    await trio.sleep(0.1)
                    continue
                lifetime = rng.uniform(0.2, 1.5) if self.faulty else 3600.0
                try:
                    await self._stream(instance, header, lifetime)
                except (httpx.HTTPError, StopAsyncIteration, trio.BrokenResourceError):
                    self._ledger.counts["connections broken"] += 1
                    await trio.sleep(rng.uniform(0.05, 0.3))
                if self.faulty and rng.random() < 0.4:
                    self._reload()
                    header = None
                    self._ledger.counts["reloads"] += 1
                    self._ledger.note(self.name, f"reload, page id {self._page_id}")
                else:  # EventSource reconnects, with the last id it processed
                    header = self._stored
                    self._ledger.counts["drops"] += 1
                    self._ledger.note(self.name, f"drop, reconnects with {header}")

    def _reload(self) -> None:
        self._page_id, self._seen = self._stored, set()

    async def _stream(self, instance: SidecarProcess, header: str | None, lifetime: float) -> None:
        page_id = self._page_id or SEEN_NOTHING
        url = f"{instance.public}{PATH}?userId={self.user}&lastEventId={page_id}"
        headers = {"Last-Event-ID": header} if header else {}
        with trio.move_on_after(lifetime):  # then the connection drops, bytes in flight lost
            async with self._client.stream("GET", url, headers=headers) as response:
                self._ledger.note(
                    self.name,
                    f"connect to {self._fleet.instance_name(instance)}: page id {page_id},"
                    f" Last-Event-ID {header}, {response.status_code}",
                )
                if response.status_code != 200:
                    self._ledger.counts[f"streams refused {response.status_code}"] += 1
                    await trio.sleep(0.2)
                    return
                raw = cast(AsyncIterator[bytes], response.aiter_raw())
                async with aclosing(raw) as chunks:  # type: ignore[type-var]
                    events = SseClient(chunks)
                    self.connected.set()
                    while True:
                        event = await events.next_event()
                        if event.event == "message" and event.id is not None:
                            self._show(event.id)
                        elif event.event == "place" and event.id is not None:
                            self._stored = event.id  # kept, never shown or acked
                            self._ledger.note(self.name, f"place {event.id}")

    def _show(self, message_id: str) -> None:
        self._ledger.note(self.name, f"frame {message_id}")
        if message_id in self._seen:  # the client's second line of defence
            self._ledger.counts["repeats dropped by a page"] += 1
        else:
            self._seen.add(message_id)
            self._ledger.shown[self.name].append(message_id)
        self._stored = message_id
        self._acks.append(message_id)

    async def _ack_loop(self, rng: random.Random) -> None:
        while True:
            await trio.sleep(rng.uniform(0.2, 0.6))
            instance = self._fleet.pick()
            if not self._acks or instance is None:
                continue
            ids, self._acks = self._acks[:500], self._acks[500:]
            try:
                await self._client.post(
                    f"{instance.public}{PATH}/ack?userId={self.user}", json={"ids": ids}
                )
            except httpx.HTTPError:
                self._acks[:0] = ids  # retried, as the client does


class Bot:
    """Sends `turns` turns to `user`, one after the other (see the module docstring)."""

    def __init__(self, user: str, fleet: Fleet, ledger: Ledger, client: httpx.AsyncClient) -> None:
        self.user = user
        self._fleet, self._ledger, self._client = fleet, ledger, client
        ledger.accepted[user] = []

    async def run(self, turns: int, rng: random.Random) -> None:
        for turn in range(turns):
            key = f"{self.user}/turn-{turn}"
            body = {"connectorId": "web", "recipientId": self.user, "response": tock_text(key)}
            if rng.random() < 0.15:  # a first attempt whose answer the bot never reads
                await self._attempt(body, key, answer_lost=True)
            ids = set()
            while True:
                message_id = await self._attempt(body, key)
                if message_id is not None:
                    ids.add(message_id)
                    break
                await trio.sleep(rng.uniform(0.05, 0.3))
            assert len(ids) == 1
            message_id = ids.pop()
            self._ledger.accepted[self.user].append(message_id)
            self._ledger.sends[message_id] += f", turn {turn}"
            await trio.sleep(rng.uniform(0.05, 0.4))

    async def _attempt(
        self, body: dict[str, Any], key: str, answer_lost: bool = False
    ) -> str | None:
        instance = self._fleet.pick()
        if instance is None:
            return None
        counts = self._ledger.counts
        try:
            with trio.move_on_after(5) as timed_out:
                reply = await self._client.post(
                    f"{instance.send_url}/v1/send", json=body, headers={"Idempotency-Key": key}
                )
            if timed_out.cancelled_caught:
                counts["sends timed out"] += 1
                return None
        except httpx.HTTPError:
            counts["sends broken"] += 1
            return None
        if answer_lost:
            counts["answers lost"] += 1
            return None
        if reply.status_code != 202:
            assert reply.status_code == 503, reply.text
            counts["sends refused 503"] += 1
            return None
        counts["sends accepted"] += 1
        message_id = cast(str, reply.json()["id"])
        self._ledger.sends.setdefault(
            message_id,
            f"accepted at {trio.current_time():.3f} by {self._fleet.instance_name(instance)}",
        )
        return message_id
