"""Clients that vanish without a FIN, or stop reading, are dropped after the write timeout.

hypercorn's writes cannot be cancelled, so only the kernel can end them: the listening
sockets carry TCP_USER_TIMEOUT and keepalive (sidecar/net.py). A vanished client is made
with a socket filter that drops every packet for it (`blackhole`): it never acknowledges
or resets anything again, exactly like a browser whose network went away.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import trio

from sidecar.config import Settings
from sidecar.net import bound_unacknowledged
from tests.raw_harness import (
    assert_serves,
    blackhole,
    connect,
    open_raw_stream,
    server_side_inode,
    socket_fds,
    socket_inodes,
    wait_until,
)
from tests.sidecar_harness import Sidecar, running_sidecar, settings_for

NOTHING_SEEN = "0" * 24
WRITE_TIMEOUT = 2.0


def settings(tmp_path: Path, **env: str) -> Settings:
    return settings_for(
        tmp_path,
        SIDECAR_WRITE_TIMEOUT_SECONDS=str(WRITE_TIMEOUT),
        SIDECAR_KEEPALIVE_SECONDS="1",
        **env,
    )


async def test_accepted_connections_carry_the_write_timeout(tmp_path: Path) -> None:
    async with running_sidecar(settings(tmp_path)) as sc:
        client = await open_raw_stream(sc, "opts")
        inode = server_side_inode(sc, client)
        # The server's socket object is hypercorn's; look it up by inode through a dup.
        server = socket.socket(fileno=os.dup(socket_fds()[inode]))
        try:
            assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2000
            assert server.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 2
            assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 1
        finally:
            server.close()
            client.close()


def test_option_values_are_clamped_to_what_the_kernel_takes() -> None:
    with socket.socket() as sock:
        bound_unacknowledged(sock, 1e-6)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1
        bound_unacknowledged(sock, 1e9)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2**31 - 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 32767
    with socket.socket(socket.AF_UNIX) as unix:
        bound_unacknowledged(unix, 2)  # not TCP: left alone


async def test_vanished_client_is_dropped_and_its_messages_replay(tmp_path: Path) -> None:
    async with running_sidecar(settings(tmp_path)) as sc:
        hub, key = sc.running.hub, ("web", "gone")
        client = await open_raw_stream(sc, "gone")
        inode = server_side_inode(sc, client)
        blackhole(client)
        sent = [await sc.send("gone", n=n) for n in range(3)]
        vanished_at = trio.current_time()

        # Before the timeout the stream is still there, stuck in a write the peer never
        # acknowledges, and the sidecar serves everyone else meanwhile.
        await assert_serves(sc, "bob")
        await trio.sleep_until(vanished_at + WRITE_TIMEOUT / 2)
        assert hub.stream_count(key) == 1
        assert inode in socket_inodes()

        # Within the timeout (plus retransmission granularity) the kernel aborts the
        # connection; the stream leaves the hub and the sidecar closes its socket.
        await wait_until(
            lambda: hub.stream_count(key) == 0 and inode not in socket_inodes(),
            WRITE_TIMEOUT + 3,
            "vanished stream dropped and its socket closed",
        )
        assert trio.current_time() - vanished_at >= WRITE_TIMEOUT * 0.9
        assert hub.stats.cut_off == 0  # the kernel did it, not the hub's buffer
        await assert_serves(sc, "bob")

        # Nothing was delivered: everything replays, in order, when the browser is back.
        async with sc.stream("gone", last_event_id=NOTHING_SEEN) as back:
            events = await back.messages(len(sent))
        assert [e.id for e in events] == sent
        assert [json.loads(e.data)["n"] for e in events] == [0, 1, 2]
        client.close()


@pytest.mark.time_limit(60)
async def test_client_that_never_reads_is_dropped_after_the_write_timeout(
    tmp_path: Path,
) -> None:
    # A buffer big enough that the hub never cuts it off: only the kernel can end it.
    async with running_sidecar(settings(tmp_path, SIDECAR_STREAM_BUFFER="1024")) as sc:
        hub, key = sc.running.hub, ("web", "stuck")
        client = await open_raw_stream(sc, "stuck", rcvbuf=4096)
        inode = server_side_inode(sc, client)
        big = "x" * 60_000
        # More than the socket buffers hold (the server's grows to a few MB on loopback),
        # so the stream's write blocks on a zero window.
        items = [
            {"connectorId": "web", "recipientId": "stuck", "response": {"n": n, "text": big}}
            for n in range(80)
        ]
        sent: list[str] = []
        for start in range(0, len(items), 16):
            reply = await sc.client.post(
                f"{sc.send_url}/v1/send/batch", json=items[start : start + 16]
            )
            assert reply.status_code == 202, reply.text
            sent += [r["id"] for r in reply.json()["results"]]
        await wait_until(
            lambda: hub.stream_count(key) == 0 and inode not in socket_inodes(),
            WRITE_TIMEOUT + 8,
            "never-reading stream dropped and its socket closed",
        )
        assert hub.stats.cut_off == 0
        await assert_serves(sc, "bob")

        client.close()
        async with sc.stream("stuck", last_event_id=NOTHING_SEEN) as back:
            events = await back.messages(len(sent))
        assert [e.id for e in events] == sent


async def test_client_vanished_while_the_server_reads_is_dropped(tmp_path: Path) -> None:
    """No write pending: the keepalive probes go unanswered and the connection is aborted."""
    async with running_sidecar(settings(tmp_path)) as sc:
        client = await connect(sc)
        await client.send(
            b"POST /io/app/web/sse/ack?userId=gone HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        await wait_until(lambda: _has_server_side(sc, client), 5, "connection accepted")
        inode = server_side_inode(sc, client)
        blackhole(client)
        # Keepalive idle (the timeout), then unanswered probes for the user timeout.
        took = await wait_until(
            lambda: inode not in socket_inodes(), 2 * WRITE_TIMEOUT + 4, "socket closed"
        )
        assert took >= WRITE_TIMEOUT
        await assert_serves(sc, "bob")
        client.close()


def _has_server_side(sc: Sidecar, client: trio.socket.SocketType) -> bool:
    try:
        server_side_inode(sc, client)
    except AssertionError:
        return False
    return True
