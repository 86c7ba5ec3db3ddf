"""Several sidecar processes on one MongoDB, and an unmodified Tock writing to it.

Each test runs sidecars as separate processes (`python -m sidecar serve`) on a database of
its own, with a real HTTP client.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest
import trio
from bson import ObjectId

from sidecar.protocol import sse
from tests.mongo_harness import MongoJavaServer, not_messages
from tests.sidecar_harness import SidecarProcess, SseClient, spawn_sidecar
from tests.tock_documents import fixtures, tock_text

NOTHING_SEEN = "0" * 24


@pytest.fixture
def db_name(mongodb_server: str) -> Iterator[str]:
    name = f"mi_{uuid.uuid4().hex[:12]}"
    yield name
    with pymongo.MongoClient(mongodb_server, serverSelectionTimeoutMS=5000) as client:
        client.drop_database(name)


@asynccontextmanager
async def instances(
    uri: str, db: str, count: int, **settings: str
) -> AsyncIterator[list[SidecarProcess]]:
    env = {"SIDECAR_STORE": uri, "SIDECAR_MONGO_DB": db, "SIDECAR_KEEPALIVE_SECONDS": "1"}
    env |= settings
    async with AsyncExitStack() as stack:
        # The first creates the collection; the others then find it.
        first = await stack.enter_async_context(spawn_sidecar(env))
        # One after the other: each process's context (with the task reading its log)
        # must be entered by this task, which also leaves it.
        rest = [await stack.enter_async_context(spawn_sidecar(env)) for _ in range(count - 1)]
        yield [first, *rest]


@asynccontextmanager
async def stream(
    client: httpx.AsyncClient, sidecar: SidecarProcess, user: str, last_event_id: str | None = None
) -> AsyncIterator[SseClient]:
    url = f"{sidecar.public}/io/app/web/sse?userId={user}"
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        async with aclosing(response.aiter_raw()) as chunks:
            sse_client = SseClient(chunks)
            assert (await sse_client.next_event()).event == "ping"
            yield sse_client


def response(**fields: Any) -> dict[str, Any]:
    """A response Tock decodes (the send API on MongoDB takes no other), naming `fields`."""
    return tock_text(json.dumps(fields))


async def send(client: httpx.AsyncClient, sidecar: SidecarProcess, user: str, **body: Any) -> str:
    reply = await client.post(
        f"{sidecar.send_url}/v1/send",
        json={"connectorId": "web", "recipientId": user, "response": response(**body)},
    )
    assert reply.status_code == 202, reply.text
    message_id: str = reply.json()["id"]
    return message_id


@pytest.mark.time_limit(90)
async def test_three_instances_deliver_wherever_the_user_is(
    mongodb_server: str, db_name: str
) -> None:
    async with (
        instances(mongodb_server, db_name, 3) as (a, b, c),
        httpx.AsyncClient(timeout=10) as client,
    ):
        # Stream on B, send through A: delivered on B, once.
        async with stream(client, b, "u1") as on_b:
            first = await send(client, a, "u1", n=1)
            assert (await on_b.next_message()).id == first
            second = await send(client, a, "u1", n=2)
            assert (await on_b.next_message()).id == second  # nothing in between

        # Streams on A and C, send through B: both get it.
        async with stream(client, a, "u2") as on_a, stream(client, c, "u2") as on_c:
            message_id = await send(client, b, "u2")
            assert (await on_a.next_message()).id == message_id
            assert (await on_c.next_message()).id == message_id

        # The sender's own stream gets it once, not again when its insert comes back
        # through the change stream.
        async with stream(client, a, "u3") as own:
            ids = [await send(client, a, "u3", n=n) for n in range(5)]
            marker = await send(client, b, "u3", marker=True)  # arrives through the feed
            got = [(await own.next_message()).id for _ in range(6)]
            assert got == [*ids, marker]


@pytest.mark.time_limit(60)
async def test_a_bot_retrying_through_another_instance_stores_and_shows_the_message_once(
    mongodb_server: str, db_name: str
) -> None:
    """Issue #13, case 4: the send's connection broke after the commit and the bot retries,
    the load balancer picking another instance."""
    async with (
        instances(mongodb_server, db_name, 2) as (a, b),
        httpx.AsyncClient(timeout=10) as client,
        stream(client, b, "rita") as tab,
    ):
        body = {"connectorId": "web", "recipientId": "rita", "response": response(turn=1)}
        headers = {"Idempotency-Key": "conversation-9/turn-1"}
        first = await client.post(f"{a.send_url}/v1/send", json=body, headers=headers)
        retry = await client.post(f"{b.send_url}/v1/send", json=body, headers=headers)
        assert first.status_code == retry.status_code == 202, (first.text, retry.text)
        assert retry.json()["id"] == first.json()["id"]
        marker = await send(client, a, "rita", marker=True)
        assert [(await tab.next_message()).id for _ in range(2)] == [first.json()["id"], marker]
        other = {**body, "response": response(turn=2)}
        conflict = await client.post(f"{b.send_url}/v1/send", json=other, headers=headers)
        assert conflict.status_code == 409, conflict.text


@pytest.mark.time_limit(60)
async def test_a_document_written_by_tock_is_delivered_and_replayed(
    mongodb_server: str, db_name: str
) -> None:
    raw: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongodb_server, tz_aware=True)
    collection = raw[db_name]["web_channel_event"]
    # As Tock 26.3.2 and 23.9.0 stored them (tests/tock_documents.py).
    by_version = {f.tock: f for f in fixtures() if f.case == "buttons: postback, url, quick reply"}
    try:
        async with (
            instances(mongodb_server, db_name, 1) as (sidecar,),
            httpx.AsyncClient(timeout=10) as client,
        ):
            for version, fixture in by_version.items():
                live = fixture.renamed(f"live-{version}")
                async with stream(client, sidecar, live.recipient) as events:
                    await trio.to_thread.run_sync(collection.insert_one, live.document)
                    event = await events.next_message()
                    assert (event.id, event.data) == (live.id, sse.dumps(live.response))

                offline = fixture.renamed(f"offline-{version}", ObjectId())
                await trio.to_thread.run_sync(collection.insert_one, offline.document)
                async with stream(client, sidecar, offline.recipient) as later:
                    event = await later.next_message()
                    assert (event.id, event.data) == (offline.id, sse.dumps(offline.response))
    finally:
        raw.close()


@pytest.mark.time_limit(60)
async def test_documents_that_are_not_messages_break_no_stream(
    mongodb_server: str, db_name: str
) -> None:
    """Another writer's documents a browser could not parse are skipped, live and in a
    replay, and the replay goes on past them to its last page."""
    raw: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongodb_server, tz_aware=True)
    collection = raw[db_name]["web_channel_event"]

    def message(recipient: str, n: int) -> dict[str, Any]:
        return {"_id": ObjectId(), "appId": "web", "recipientId": recipient, "status": 0,
                "webConnectorResponse": {"n": n}}  # fmt: skip

    try:
        async with (
            instances(mongodb_server, db_name, 1, SIDECAR_REPLAY_PAGE="2") as (sidecar,),
            httpx.AsyncClient(timeout=10) as client,
        ):
            async with stream(client, sidecar, "carol") as live:
                good = message("carol", 1)
                await trio.to_thread.run_sync(
                    collection.insert_many, [*not_messages("carol"), good]
                )
                assert (await live.next_message()).id == str(good["_id"])

            first = message("dave", 0)
            skipped = not_messages("dave")
            later = [message("dave", n) for n in (1, 2)]
            await trio.to_thread.run_sync(collection.insert_many, [first, *skipped, *later])
            async with stream(client, sidecar, "dave") as replayed:
                got = [(await replayed.next_message()).id for _ in range(3)]
            assert got == [str(d["_id"]) for d in (first, *later)]
    finally:
        raw.close()


@pytest.mark.time_limit(120)
async def test_killed_instance_loses_nothing_for_a_client_that_reconnects(
    mongodb_server: str, db_name: str
) -> None:
    total = 300
    async with (
        instances(mongodb_server, db_name, 2) as (doomed, survivor),
        httpx.AsyncClient(timeout=10) as client,
    ):
        connections: list[list[str]] = []
        all_done = trio.Event()
        seen: set[str] = set()
        killed_at = 100

        async def browser() -> None:
            # Like sidecar-sse.js: keep the last id, reconnect elsewhere with it.
            last = NOTHING_SEEN
            for target in (doomed, survivor):
                received: list[str] = []
                connections.append(received)
                try:
                    async with stream(client, target, "kim", last_event_id=last) as events:
                        while len(seen) < total:
                            event = await events.next_message()
                            assert event.id is not None
                            received.append(event.id)
                            seen.add(event.id)
                            last = event.id
                            if target is doomed and len(seen) == killed_at:
                                doomed.process.kill()
                except (httpx.TransportError, StopAsyncIteration):
                    assert target is doomed
                    continue
                all_done.set()
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(browser)
            sent = [await send(client, survivor, "kim", n=n) for n in range(total)]
            await all_done.wait()
        assert seen == set(sent)
        for received in connections:
            # Each id appears at most once per connection, and in the sender's order.
            assert len(received) == len(set(received))
            assert received == sorted(received, key=sent.index)
        assert len(connections) == 2


@pytest.mark.time_limit(150)
async def test_mongodb_restart_under_load(tmp_path: Path) -> None:
    server = MongoJavaServer()
    h2 = tmp_path / "mongo.h2"
    await trio.to_thread.run_sync(lambda: server.start(h2_path=h2))
    try:
        async with (
            instances(server.uri, "restart", 2) as (sender, receiver),
            httpx.AsyncClient(timeout=15) as client,
        ):
            accepted: list[str] = []
            refused = 0
            delivered: list[str] = []
            phase = {"down": False}
            stop = trio.Event()

            async def load() -> None:
                nonlocal refused
                n = 0
                while not stop.is_set():
                    body = {"connectorId": "web", "recipientId": "lee", "response": response(n=n)}
                    reply = await client.post(f"{sender.send_url}/v1/send", json=body)
                    if reply.status_code == 202:
                        accepted.append(reply.json()["id"])
                    else:
                        assert reply.status_code == 503, reply.text
                        assert reply.json()["error"]["code"] == "store_unavailable"
                        refused += 1
                    n += 1
                    await trio.sleep(0.01)

            async with stream(client, receiver, "lee", last_event_id=NOTHING_SEEN) as events:

                async def read() -> None:
                    while True:
                        event = await events.next_message()
                        assert event.id is not None
                        delivered.append(event.id)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read)
                    nursery.start_soon(load)
                    while len(accepted) < 30:
                        await trio.sleep(0.05)
                    await trio.to_thread.run_sync(server.stop)
                    phase["down"] = True
                    while refused < 3:
                        await trio.sleep(0.05)
                    before_restart = len(accepted)
                    await trio.to_thread.run_sync(
                        lambda: server.start(h2_path=h2, port=server.port)
                    )
                    while len(accepted) < before_restart + 30:
                        await trio.sleep(0.05)
                    stop.set()
                    # Tailing resumed by itself: what was sent after the restart reaches
                    # the stream held by the other instance, which was never restarted.
                    with trio.fail_after(30):
                        while not set(accepted) <= set(delivered):
                            await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
            assert refused >= 3
            assert len(delivered) == len(set(delivered))
    finally:
        await trio.to_thread.run_sync(server.stop)
