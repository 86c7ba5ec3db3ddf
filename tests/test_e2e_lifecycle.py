"""End to end: slow consumers, replay racing live traffic, and SIGTERM draining."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
from pathlib import Path

import httpx
import pytest
import trio

from sidecar.protocol import sse
from tests.sidecar_harness import Sidecar, running_sidecar, settings_for, spawn_sidecar

NOTHING_SEEN = "0" * 24  # a Last-Event-ID before every id: "replay all that is undelivered"


async def test_slow_consumer_is_cut_off_and_its_messages_replay(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_STREAM_BUFFER="4")
    async with running_sidecar(settings) as sc:
        host, port = sc.public.removeprefix("http://").rsplit(":", 1)
        # A client that never reads, with a tiny receive buffer so the server's writes block.
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        await sock.send(b"GET /io/app/web/sse?userId=slow HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            while sc.running.hub.stream_count(("web", "slow")) == 0:
                await trio.sleep(0.01)
        big = "x" * 60_000
        sent: list[str] = []
        with trio.fail_after(20):
            while sc.running.hub.stats.cut_off == 0:
                assert len(sent) < 500, "never cut off"
                sent.append(await sc.send("slow", text=big))
        # Cut off at once: the hub holds nothing for it any more, whatever the socket does.
        assert sc.running.hub.stream_count(("web", "slow")) == 0
        sock.close()

        # Everything is still stored and replays, in order, once.
        async with sc.stream("slow", last_event_id=NOTHING_SEEN) as client:
            events = await client.messages(len(sent))
            assert [e.id for e in events] == sent
            assert all(json.loads(e.data)["text"] == big for e in events)


@pytest.mark.time_limit(60)
async def test_live_sends_during_a_long_replay_arrive_once_in_order(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_REPLAY_PAGE="25", SIDECAR_STREAM_BUFFER="1024")
    async with running_sidecar(settings) as sc:
        stored_count, live_count = 400, 100
        items = [
            {"connectorId": "web", "recipientId": "rita", "response": {"n": n}}
            for n in range(stored_count)
        ]
        reply = await sc.client.post(f"{sc.send_url}/v1/send/batch", json=items)
        assert reply.status_code == 202
        url = sc.stream_url("rita")
        received: list[sse.Event] = []
        async with sc.client.stream("GET", url) as response, trio.open_nursery() as nursery:

            async def send_live() -> None:
                for n in range(stored_count, stored_count + live_count):
                    await sc.send("rita", n=n)

            nursery.start_soon(send_live)
            parser = sse.Parser()
            async for chunk in response.aiter_raw():
                received.extend(e for e in parser.feed(chunk) if e.event == "message")
                if len(received) >= stored_count + live_count:
                    break
        numbers = [json.loads(e.data)["n"] for e in received]
        ids = [e.id for e in received]
        assert numbers == list(range(stored_count + live_count))
        assert len(set(ids)) == len(ids)
        assert ids == sorted(ids)  # one sender instance: id order is arrival order


@pytest.mark.time_limit(60)
async def test_sigterm_drains_streams_and_loses_no_acknowledged_send(tmp_path: Path) -> None:
    db = tmp_path / "sidecar.db"
    accepted: list[str] = []
    async with spawn_sidecar({"SIDECAR_STORE": f"sqlite:///{db}"}) as sc:
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream("GET", f"{sc.public}/io/app/web/sse?userId=sam") as stream,
        ):
            chunks = stream.aiter_raw()
            assert (await chunks.__anext__()).startswith(b"event: ping")
            stop_sending = trio.Event()

            async def keep_sending() -> None:
                n = 0
                while not stop_sending.is_set():
                    body = {"connectorId": "web", "recipientId": "sam", "response": {"n": n}}
                    try:
                        reply = await client.post(f"{sc.send_url}/v1/send", json=body)
                    except httpx.TransportError:
                        return  # the listener is gone
                    if reply.status_code == 202:
                        accepted.append(reply.json()["id"])
                    n += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_sending)
                while len(accepted) < 20:
                    await trio.sleep(0.01)
                sc.process.send_signal(signal.SIGTERM)
                # The stream ends cleanly (the response completes) soon after SIGTERM.
                with trio.fail_after(5):
                    async for _ in chunks:
                        pass
                stop_sending.set()
        with trio.fail_after(10):
            assert await sc.process.wait() == 0
        assert b"stopped" in await sc.read_log()
    # Every 202 is durably stored.
    with sqlite3.connect(db) as connection:
        stored = {row[0] for row in connection.execute("SELECT id FROM messages")}
    assert accepted
    assert set(accepted) <= stored


async def test_new_connections_are_refused_after_drain(sidecar: Sidecar) -> None:
    sidecar.shutdown.set()
    with trio.fail_after(5):
        while True:
            try:
                await sidecar.client.get(f"{sidecar.public}/healthz")
            except httpx.ConnectError:
                break
            await trio.sleep(0.02)
