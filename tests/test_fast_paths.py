"""The optimisation rounds' mechanisms, each on its own: SQLite batches and group commit, the
stream mailbox, the hub's pinger, the send route's fast path next to Quart's answers."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from sidecar.hub import Hub, Mailbox
from sidecar.protocol import sse
from sidecar.protocol.message import Message, new_id
from sidecar.store.base import StoreUnavailable
from sidecar.store.sqlite import SqliteStore
from sidecar.stream import SentMarker, StreamOptions, serve_stream
from tests.sidecar_harness import logged_ids, logged_messages, running_sidecar, settings_for


def msg(n: int = 0) -> Message:
    return Message(new_id(), "web", "alice", {"n": n})


async def stored_ids(store: SqliteStore) -> list[str]:
    return await logged_ids(store)


# --- batches and group commit ------------------------------------------------------------


async def test_concurrent_saves_share_transactions_and_all_commit(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    commits = 0
    insert = store._insert

    def counting(rows: list[tuple[Any, ...]]) -> None:
        nonlocal commits
        commits += 1
        insert(rows)

    store._insert = counting  # type: ignore[method-assign]
    try:
        messages = [msg(n) for n in range(50)]
        async with trio.open_nursery() as nursery:
            for m in messages:
                nursery.start_soon(store.save, [m])
        assert sorted(await stored_ids(store)) == sorted(
            m.id for m in messages
        )  # concurrent: any order
        assert commits < len(messages)  # grouped: the first alone, the rest together
    finally:
        await store.aclose()


async def test_a_failed_group_fails_every_save_in_it_and_the_next_group_runs(
    tmp_path: Path,
) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    insert = store._insert
    fail = True

    def failing(rows: list[tuple[Any, ...]]) -> None:
        if fail:
            raise sqlite3.OperationalError("disk I/O error")
        insert(rows)

    store._insert = failing  # type: ignore[method-assign]
    outcomes: list[str] = []

    async def save(m: Message) -> None:
        try:
            await store.save([m])
        except StoreUnavailable:
            outcomes.append("failed")
        else:
            outcomes.append("saved")

    try:
        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(save, msg(n))
        assert outcomes == ["failed"] * 5
        fail = False
        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(save, msg(n))
        assert outcomes[5:] == ["saved"] * 5
        assert len(await stored_ids(store)) == 5
    finally:
        await store.aclose()


async def test_a_save_cancelled_while_queued_writes_nothing(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    first_writing, release = trio.Event(), trio.Event()
    insert = store._insert

    def slow(rows: list[tuple[Any, ...]]) -> None:
        trio.from_thread.run_sync(first_writing.set)
        trio.from_thread.run(release.wait)
        insert(rows)

    store._insert = slow  # type: ignore[method-assign]
    first, queued = msg(0), msg(1)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.save, [first])
            await first_writing.wait()
            with trio.CancelScope() as scope:
                scope.cancel()
                await store.save([queued])  # queued behind the first, then cancelled
            store._insert = insert  # type: ignore[method-assign]
            release.set()
        assert await stored_ids(store) == [first.id]
        await store.save([msg(2)])  # and the queue still has a writer
    finally:
        await store.aclose()


class Gate:
    """Stands in for `trio.to_thread.run_sync` under the store: each batch waits for the
    gate, then runs in the trio thread, so a test decides when a batch ends."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = trio.Event()
        self.batches = 0
        monkeypatch.setattr(trio.to_thread, "run_sync", self._run_sync)

    async def _run_sync(self, fn: Any, *args: Any, **_: Any) -> Any:
        self.batches += 1
        await self.open.wait()
        return fn(*args)


async def test_calls_queued_while_a_batch_runs_share_the_next_in_call_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    gate = Gate(monkeypatch)
    one, two, three = msg(1), msg(2), msg(3)
    results: dict[str, object] = {}

    async def call(name: str, fn: Any) -> None:
        try:
            results[name] = await fn()
        except StoreUnavailable as exc:
            results[name] = exc

    def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.save, [one])  # runs the first batch, held at the gate
        await trio.testing.wait_all_tasks_blocked()
        for name, fn in [
            ("save two", lambda: store.save([two])),
            ("head", lambda: store.head("web", "alice")),
            ("broken", lambda: store._run(broken)),
            ("save three", lambda: store.save([three])),
            ("get three", lambda: store.get(three.id)),
        ]:
            nursery.start_soon(call, name, fn)
            await trio.testing.wait_all_tasks_blocked()
        gate.open.set()
    assert gate.batches == 2
    assert results["head"].seq == 2  # saw the save queued before it only
    assert isinstance(results["broken"], StoreUnavailable)  # failed alone
    assert results["save three"] == []  # none of them was stored already
    got = results["get three"]
    assert isinstance(got, Message)
    assert (got.id, got.seq) == (three.id, 3)  # the user's third message
    await store.aclose()


async def test_a_batch_that_gets_no_thread_fails_its_calls_and_the_queue_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    gate = Gate(monkeypatch)
    outcomes: dict[str, str] = {}

    async def save(name: str, m: Message) -> None:
        try:
            await store.save([m])
        except StoreUnavailable:
            outcomes[name] = "unavailable"
        except RuntimeError:
            outcomes[name] = "no thread"
        else:
            outcomes[name] = "saved"

    async def no_thread(*_: Any, **__: Any) -> None:
        raise RuntimeError("can't start new thread")

    first, last = msg(1), msg(4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(save, "first", first)  # runs a batch, held at the gate
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(save, "second", msg(2))  # runs the next batch...
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(save, "third", msg(3))  # ...with this one in it
        await trio.testing.wait_all_tasks_blocked()
        monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
        gate.open.set()
    assert outcomes == {"first": "saved", "second": "no thread", "third": "unavailable"}
    monkeypatch.undo()
    await store.save([last])  # the queue still has a runner
    assert await stored_ids(store) == [first.id, last.id]
    await store.aclose()


async def test_a_save_cancelled_once_its_batch_runs_returns_as_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save whose batch (run by another caller) is already writing it cannot be taken
    back, so cancelling it must not make it look failed: the send API would then dispatch
    nothing for a message that is stored."""
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    gate = Gate(monkeypatch)
    first, runner, taken = msg(1), msg(2), msg(3)
    outcome: list[str] = []

    async def cancelled_save(scope: trio.CancelScope) -> None:
        with scope:
            try:
                await store.save([taken])
            except trio.Cancelled:
                outcome.append("cancelled")
                raise
            outcome.append("saved")

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.save, [first])  # the first batch, held at the gate
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(store.save, [runner])  # will run the second batch...
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(cancelled_save, scope)  # ...with this save in it
        await trio.testing.wait_all_tasks_blocked()
        first_gate, gate.open = gate.open, trio.Event()
        first_gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert gate.batches == 2  # the second batch has taken the save and is writing
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        while_writing = list(outcome)
        gate.open.set()
    assert while_writing == []  # it waited for its batch
    assert outcome == ["saved"]
    assert await stored_ids(store) == [first.id, runner.id, taken.id]
    await store.aclose()


async def test_a_save_cancelled_as_it_is_handed_the_next_group_hands_it_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group commit ends and wakes the first save queued to write the next group, while
    that save is being cancelled: the next save queued must still be written. trio runs the
    two in a random order, so the race is set up many times."""
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    gate = Gate(monkeypatch)
    written: list[str] = []

    async def cancelled_save(scope: trio.CancelScope) -> None:
        with scope:
            await store.save([msg()])

    async def save(done: trio.Event) -> None:
        message = msg()
        await store.save([message])
        written.append(message.id)
        done.set()

    for _ in range(20):
        gate.open = trio.Event()
        cancelled, last = trio.CancelScope(), trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(save, trio.Event())  # the running commit, held at the gate
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(cancelled_save, cancelled)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(save, last)
            await trio.testing.wait_all_tasks_blocked()
            cancelled.cancel()
            gate.open.set()
            with trio.fail_after(5):
                await last.wait()
    assert await stored_ids(store) == written
    await store.aclose()


# --- mailbox -------------------------------------------------------------------------------


async def test_mailbox_is_a_bounded_channel_for_one_receiver() -> None:
    box = Mailbox(2)
    with pytest.raises(trio.WouldBlock):
        box.receive_nowait()
    one, two = msg(1), msg(2)
    box.send_nowait(one)
    box.send_nowait(two)
    with pytest.raises(trio.WouldBlock):
        box.send_nowait(msg(3))
    assert await box.receive() is one
    assert box.receive_nowait() is two
    async with trio.open_nursery() as nursery:
        got: list[object] = []

        async def receive() -> None:
            got.append(await box.receive())

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        box.send_nowait(one)
    assert got == [one]
    box.close()
    with pytest.raises(trio.BrokenResourceError):
        box.send_nowait(one)
    with pytest.raises(trio.ClosedResourceError):
        await box.receive()


# --- the hub's pinger ------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.parser = sse.Parser()
        self.events: list[sse.Event] = []

    async def send(self, data: bytes) -> None:
        self.events.extend(self.parser.feed(data))

    def pings(self) -> int:
        return sum(e.event == "ping" for e in self.events)


async def test_pings_come_from_the_pinger_then_from_the_stream_once_it_stops(
    tmp_path: Path,
) -> None:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    hub = Hub(16)
    sink = Sink()
    options = StreamOptions(keepalive=0.05, replay_sent=False, replay_page=10)
    try:
        async with trio.open_nursery() as nursery:
            pinger = trio.CancelScope()
            await nursery.start(_pinger_until, hub, pinger)
            assert hub.pinging

            async def stream() -> None:
                await serve_stream(
                    sink, hub=hub, store=store, marker=SentMarker(store), key=("web", "alice"),
                    last_event_id=None, options=options,
                )  # fmt: skip

            nursery.start_soon(stream)
            with trio.fail_after(5):
                while sink.pings() < 4:
                    await trio.sleep(0.01)
            m = msg(1)
            await store.save([m])
            (logged,) = await logged_messages(store)
            hub.dispatch(logged)  # as the feed reports it
            pinger.cancel()  # the pinger stops: the stream keeps pinging by itself
            await trio.testing.wait_all_tasks_blocked()
            assert not hub.pinging
            seen = sink.pings()
            with trio.fail_after(5):
                while sink.pings() < seen + 3:
                    await trio.sleep(0.01)
            assert [e.id for e in sink.events if e.event == "message"] == [m.id]
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def _pinger_until(
    hub: Hub, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
) -> None:
    with scope:
        await hub.run_pings(task_status=task_status)


# --- the send route's fast path ----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1]",
        b'{"connectorId": "web"}',
        b'{"connectorId": "nope", "recipientId": "a", "response": {}}',
        b'{"connectorId": "web", "recipientId": "\\ud800", "response": {}}',
    ],
)
async def test_fast_path_answers_as_quart_does(tmp_path: Path, body: bytes) -> None:
    """With a Content-Length the fast path answers; chunked, Quart does: same answer."""

    async def chunks() -> Any:
        yield body

    async with running_sidecar(settings_for(tmp_path)) as sc:
        url = f"{sc.send_url}/v1/send"
        headers = {"Content-Type": "application/json", "X-Request-ID": "same"}
        fast = await sc.client.post(url, content=body, headers=headers)
        quart = await sc.client.post(url, content=chunks(), headers=headers)
    assert "content-length" not in quart.request.headers  # it did go to Quart
    assert (fast.status_code, fast.headers["content-type"]) == (
        quart.status_code,
        quart.headers["content-type"],
    )
    assert fast.content == quart.content
    assert json.loads(fast.content)["error"]["requestId"] == "same"


async def test_fast_path_checks_the_token_as_quart_does(tmp_path: Path) -> None:
    item = {"connectorId": "web", "recipientId": "a", "response": {"t": 1}}
    async with running_sidecar(settings_for(tmp_path, SIDECAR_SEND_TOKEN="s3cret")) as sc:
        url = f"{sc.send_url}/v1/send"
        client: httpx.AsyncClient = sc.client
        assert (await client.post(url, json=item)).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert (await client.post(url, json=item, headers=bad)).status_code == 401
        good = {"Authorization": "bearer  s3cret"}
        assert (await client.post(url, json=item, headers=good)).status_code == 202
