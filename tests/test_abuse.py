"""Raw-socket abuse of the public listener: the sidecar keeps serving, and gives back what
the abuse took.

Each test runs a real sidecar (hypercorn on loopback) in this process, measures the
process's open file descriptors, trio tasks and RSS once it has served a first stream, abuses
it while a well-behaved client keeps streaming, then checks that a well-behaved client is
still served and that fds and tasks are back to that baseline (after a bounded wait for the
connections' tasks to finish) and RSS within 20 MB of it (both measured after a garbage
collection and glibc's `malloc_trim`, so RSS counts memory in use, not the allocator's
free pages kept after a burst).
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.settings
import pytest
import trio

from tests.raw_harness import (
    Usage,
    assert_serves,
    back_to_baseline,
    connect,
    open_raw_stream,
    read_until_closed,
    server_side_inode,
    settle,
    socket_inodes,
    status_of,
    stream_request,
    wait_until,
)
from tests.sidecar_harness import Sidecar, running_sidecar, settings_for

WRITE_TIMEOUT = 2.0


@pytest.fixture
async def abused(tmp_path: Path) -> AsyncIterator[tuple[Sidecar, Usage]]:
    settings = settings_for(
        tmp_path,
        SIDECAR_WRITE_TIMEOUT_SECONDS=str(WRITE_TIMEOUT),
        SIDECAR_KEEPALIVE_SECONDS="1",
        SIDECAR_STREAM_BUFFER="16",
    )
    async with running_sidecar(settings) as sc:
        # Warm up (lazy imports, the store's connections, the thread cache), then measure.
        for _ in range(3):
            await assert_serves(sc)
        yield sc, await settle()


async def while_serving(sc: Sidecar, abuse: Callable[[], Awaitable[None]]) -> None:
    """Run `abuse` while a well-behaved client streams again and again; it must be served
    at least once during the abuse and once after."""
    served = 0
    done = trio.Event()

    async def keep_serving() -> None:
        nonlocal served
        while not done.is_set():
            await assert_serves(sc, "good")
            served += 1
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_serving)
        await abuse()
        # At least one full stream ran while the abuse did (or right at its end).
        with trio.fail_after(10):
            while served == 0:
                await trio.sleep(0.01)
        done.set()
    await assert_serves(sc, "after")


def reset_on_close(sock: trio.socket.SocketType) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- malformed requests ---------------------------------------------------------------------

HOST = b"Host: t\r\n"
SSE = b"/io/app/web/sse?userId=m"
ACK = b"POST /io/app/web/sse/ack?userId=m HTTP/1.1\r\n" + HOST
MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"\r\n\r\n\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET " + SSE + b"\r\n\r\n",  # HTTP/0.9
    b"GET " + SSE + b" HTTP/9.9\r\n" + HOST + b"\r\n",
    b"GET " + SSE + b" HTTP/1.1\r\n\r\n",  # no Host
    b"GET " + SSE + b" HTTP/1.1\r\n" + HOST + b"No colon\r\n\r\n",
    b"GET " + SSE + b" HTTP/1.1\r\n" + HOST + b": no name\r\n\r\n",
    b"GET " + SSE + b" HTTP/1.1\r\n" + HOST + b"X: a\x00b\r\n\r\n",
    b"GET " + SSE + b" HTTP/1.1\r\n" + HOST + b" folded: line\r\n\r\n",
    b"GET /io/app/web/sse?userId=\xff\xfe HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET /io/app/web/sse?userId=%ff%00%0a HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET /io/app/web/sse?userId= HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET /io/app/web/sse?userId=a&userId=b&userid=c HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET http://elsewhere" + SSE + b" HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET /io/app/web/../web/sse?userId=m HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET " + SSE + b" HTTP/1.1\r" + HOST[:-2] + b"\r\r",  # bare CRs
    b"GET " + SSE + b" HTTP/1.1\r\n" + HOST + b"Last-Event-ID: \xff\xfe\r\n\r\n",
    b"GET " + SSE + b" HTTP/1.1\r\n" + HOST + b"Last-Event-ID: " + b"9" * 25 + b"\r\n\r\n",
    b"GET " + SSE + b" HTTP/1.1\r\n" + HOST + b"Origin: \x7f\r\n\r\n",
    b"DELETE " + SSE + b" HTTP/1.1\r\n" + HOST + b"\r\n",
    ACK + b"Content-Length: -1\r\n\r\n",
    ACK + b"Content-Length: 99999999999999999999999\r\n\r\n",
    ACK + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ACK + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    ACK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    ACK + b"Transfer-Encoding: gzip\r\n\r\n",
    ACK + b"Content-Type: application/json\r\nContent-Length: 9\r\n\r\n\xff\xfe{[\"\x00]}",
    ACK + b"Content-Type: application/json\r\nContent-Length: 40\r\n\r\n" + b"[" * 40,
    b"GET " + SSE + b" HTTP/1.1\r\n" + HOST + b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET " + SSE + b" HTTP/1.1\r\n" + HOST
    + b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: !!\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" * 4,
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(range(256)),
    bytes(range(256)) * 4,
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 200,  # a TLS ClientHello
    b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n" + HOST + b"\r\n",
    b"OPTIONS * HTTP/1.1\r\n" + HOST + b"\r\n",
    b"TRACE / HTTP/1.1\r\n" + HOST + b"\r\n",
]  # fmt: skip


@pytest.mark.time_limit(60)
async def test_malformed_requests_get_4xx_or_a_close(abused: tuple[Sidecar, Usage]) -> None:
    sc, baseline = abused
    answers: dict[bytes, bytes] = {}

    async def one(payload: bytes) -> None:
        with await connect(sc) as sock:
            try:
                await sock.send(payload)
            except OSError:
                return
            # A valid-enough request may open a stream: read what comes for a while.
            with trio.move_on_after(3):
                answers[payload] = await read_until_closed(sock, limit=4096)
            answers.setdefault(payload, b"")

    async def abuse() -> None:
        async with trio.open_nursery() as nursery:
            for payload in MALFORMED:
                nursery.start_soon(one, payload)

    await while_serving(sc, abuse)
    statuses = {payload: status_of(answer) for payload, answer in answers.items()}
    # 501 is what RFC 9112 asks for a transfer coding the server does not know.
    assert statuses.pop(ACK + b"Transfer-Encoding: gzip\r\n\r\n") == 501
    # 505 (HTTP Version Not Supported): the HTTP/2 preface (sidecar/http/hypercorn_patches.py).
    assert [statuses.pop(p) for p in MALFORMED if p.startswith(b"PRI * HTTP/2.0")] == [505, 505]
    assert not [p for p, s in statuses.items() if s is not None and s >= 500], statuses
    assert statuses[b"GARBAGE\r\n\r\n"] == 400
    assert statuses[MALFORMED[5]] == 400  # no Host
    await back_to_baseline(baseline)


@pytest.mark.time_limit(60)
async def test_invalid_chunked_body_on_an_early_answer_does_not_stop_the_listener(
    abused: tuple[Sidecar, Usage],
) -> None:
    """The ack view answers 415 before reading the body while hypercorn finds the chunked
    body invalid: its 400 races the close of the connection, and without
    `sidecar.http.hypercorn_patches._TCPServer` the BusyResourceError stopped the whole
    listener."""
    sc, baseline = abused
    payload = ACK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    limiter = trio.CapacityLimiter(50)
    statuses: list[int | None] = []

    async def one() -> None:
        async with limiter:
            with await connect(sc) as sock:
                await sock.send(payload)
                with trio.fail_after(10):
                    statuses.append(status_of(await read_until_closed(sock)))

    async def abuse() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(300):
                nursery.start_soon(one)

    await while_serving(sc, abuse)
    assert len(statuses) == 300
    assert set(statuses) <= {400, 415, None}, statuses
    await back_to_baseline(baseline)


@pytest.mark.time_limit(60)
async def test_idle_keep_alive_connections_are_closed(abused: tuple[Sidecar, Usage]) -> None:
    """After a response, a connection that sends nothing more is closed after hypercorn's
    keep-alive timeout (5 s; under quart-trio only with http/hypercorn_patches.py): holding
    many of them open costs the holder, not the sidecar."""
    sc, baseline = abused
    closed_after: list[float] = []

    async def one(request: bytes) -> None:
        with await connect(sc) as sock:
            await sock.send(request)
            start = trio.current_time()
            with trio.fail_after(10):
                answer = await read_until_closed(sock)
            assert status_of(answer) in (200, 204, 415), answer
            closed_after.append(trio.current_time() - start)

    requests = [
        b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n",
        b"GET /sidecar-sse.js HTTP/1.1\r\n" + HOST + b"\r\n",
        b"OPTIONS " + SSE + b" HTTP/1.1\r\n" + HOST + b"Origin: http://x\r\n\r\n",
        ACK + b"Content-Length: 2\r\n\r\n{}",
    ]

    async def abuse() -> None:
        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(one, requests[n % len(requests)])

    await while_serving(sc, abuse)
    assert len(closed_after) == 40
    assert min(closed_after) > 4, closed_after
    assert max(closed_after) < 8, closed_after
    await back_to_baseline(baseline)


# --- HTTP/2 and request smuggling ----------------------------------------------------------


def h2_attempt(path: str = "/io/app/web/sse") -> bytes:
    """What an HTTP/2 client with prior knowledge sends first: the preface, SETTINGS with
    a zero initial window (with which hypercorn's HTTP/2 never finished an answer) and a
    GET of `path` (the stream route without a user: a 400 answered in plain ASGI)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", "t"), (":path", path)]
    client.send_headers(1, headers, end_stream=True)
    return client.data_to_send()


async def test_http2_prior_knowledge_is_refused_and_the_connection_closed(
    sidecar: Sidecar,
) -> None:
    for url in (sidecar.public, sidecar.send_url):
        with await connect(sidecar, url=url) as sock:
            await sock.send(h2_attempt())
            with trio.fail_after(5):
                answer = await read_until_closed(sock)
        assert status_of(answer) == 505, (url, answer)
        assert b"connection: close" in answer.lower()


async def test_h2c_upgrade_is_answered_in_http_1_1(sidecar: Sidecar) -> None:
    upgrade = (
        b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    )
    for url in (sidecar.public, sidecar.send_url):
        with await connect(sidecar, url=url) as sock:
            await sock.send(b"GET /healthz HTTP/1.1\r\n" + HOST + upgrade + b"\r\n")
            received = b""
            with trio.fail_after(5):
                while b"ok" not in received.partition(b"\r\n\r\n")[2]:
                    chunk = await sock.recv(4096)
                    assert chunk, received
                    received += chunk
        assert received.startswith(b"HTTP/1.1 200 "), (url, received)
        assert received.endswith(b'{"status":"ok"}'), (url, received)


@pytest.mark.time_limit(60)
async def test_a_stream_whose_reading_is_paused_ends_when_its_client_goes(
    abused: tuple[Sidecar, Usage],
) -> None:
    """h11 stops reading a connection while a response is under way when the client has
    offered a protocol switch (`Upgrade: h2c`, answered in HTTP/1.1) or pipelined another
    request behind the stream, so the end of the connection is never read: it is known
    only from the stream's failed write. hypercorn handled that failure in the stream's own
    task, which the disconnect cancels, so the connection's reader waited forever, with its
    socket and task (sidecar/http/hypercorn_patches.py, `_TCPServer.protocol_send`)."""
    sc, baseline = abused
    upgrade = b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: !!\r\n"
    requests = [
        stream_request("paused")[:-2] + upgrade + b"\r\n",
        stream_request("paused") + b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n",
    ]
    for request in requests * 5:
        with await connect(sc) as sock:
            await sock.send(request)
            received = b""
            with trio.fail_after(10):
                while b"event: ping" not in received:
                    chunk = await sock.recv(4096)
                    assert chunk, received
                    received += chunk
            assert received.startswith(b"HTTP/1.1 200"), received
            reset_on_close(sock)
    await back_to_baseline(baseline)


@pytest.mark.time_limit(90)
async def test_refused_http2_attempts_leave_nothing_behind(abused: tuple[Sidecar, Usage]) -> None:
    """hypercorn's HTTP/2 kept every connection of these (its fd, task and buffers) after
    the client went; refused, they end at once."""
    sc, baseline = abused
    attempt = h2_attempt()
    limiter = trio.CapacityLimiter(100)
    answers: list[bytes] = []

    async def one(url: str) -> None:
        async with limiter:
            with await connect(sc, url=url) as sock:
                await sock.send(attempt)
                with trio.move_on_after(2):  # hypercorn's HTTP/2 answered, then waited
                    answers.append(await read_until_closed(sock))

    async def abuse() -> None:
        async with trio.open_nursery() as nursery:
            for n in range(1000):
                nursery.start_soon(one, (sc.public, sc.send_url)[n % 2])

    await while_serving(sc, abuse)
    # sc.client's pooled connection to the send listener is not part of the baseline.
    await sc.client.aclose()
    await back_to_baseline(baseline)
    assert [status_of(answer) for answer in answers] == [505] * 1000


async def test_content_length_with_transfer_encoding_is_answered_then_closed(
    sidecar: Sidecar,
) -> None:
    """RFC 9112 6.3: the two headers disagree on where the body ends, so the connection
    closes after the answer, and what follows the body is never run as a request."""
    smuggled = b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n"
    framing = b"Transfer-Encoding: chunked\r\nContent-Length: 7\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    json_type = b"Content-Type: application/json\r\n"
    for url, head in (
        (sidecar.public, ACK + json_type),
        (sidecar.send_url, b"POST /v1/send HTTP/1.1\r\n" + HOST + json_type),
    ):
        with await connect(sidecar, url=url) as sock:
            await sock.send(head + framing + smuggled)
            with trio.fail_after(5):
                answer = await read_until_closed(sock)
        assert answer.count(b"HTTP/1.1 ") == 1, (url, answer)
        assert status_of(answer) == 400, (url, answer)
        assert b"connection: close" in answer.lower(), (url, answer)


# --- truncated requests ---------------------------------------------------------------------


@pytest.mark.time_limit(60)
async def test_requests_cut_short_then_closed(abused: tuple[Sidecar, Usage]) -> None:
    sc, baseline = abused
    stream = stream_request("cut", "Origin: http://x\r\nLast-Event-ID: " + "0" * 24 + "\r\n")
    ack = ACK + b'Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{"lastEventId": '
    prefixes = [stream[:n] for n in range(len(stream))] + [ack[:n] for n in range(0, len(ack), 3)]
    limiter = trio.CapacityLimiter(50)

    async def one(n: int, prefix: bytes) -> None:
        async with limiter:
            with await connect(sc) as sock:
                if n % 2:
                    reset_on_close(sock)
                if prefix:
                    await sock.send(prefix)
                await trio.sleep(0.01)

    async def abuse() -> None:
        async with trio.open_nursery() as nursery:
            for n, prefix in enumerate(prefixes * 2):
                nursery.start_soon(one, n, prefix)

    await while_serving(sc, abuse)
    await back_to_baseline(baseline)


# --- oversized requests ---------------------------------------------------------------------

BIG = 2 * 1024 * 1024
OVERSIZED = {
    "one huge header": stream_request("big", "X-Big: " + "a" * BIG + "\r\n"),
    "many headers": stream_request("big", "".join(f"X-{n}: {n}\r\n" for n in range(50_000))),
    "huge request line": b"GET " + SSE + b"&pad=" + b"a" * BIG + b" HTTP/1.1\r\n" + HOST + b"\r\n",
    "headers that never end": b"GET " + SSE + b" HTTP/1.1\r\n" + HOST + b"X: y\r\n" * 400_000,
    "huge ack body": ACK + f"Content-Length: {BIG}\r\n\r\n".encode() + b"[" * BIG,
}


@pytest.mark.time_limit(60)
async def test_oversized_requests_are_refused_without_buffering(
    abused: tuple[Sidecar, Usage],
) -> None:
    sc, baseline = abused
    answers: dict[str, bytes] = {}

    async def one(name: str, payload: bytes) -> None:
        with await connect(sc) as sock:
            try:
                for start in range(0, len(payload), 65536):
                    await sock.send(payload[start : start + 65536])
            except OSError:
                pass  # the server closed on us, as it should
            with trio.fail_after(10):  # and it closes: the answer ends
                answers[name] = await read_until_closed(sock)

    async def abuse() -> None:
        async with trio.open_nursery() as nursery:
            for name, payload in OVERSIZED.items():
                nursery.start_soon(one, name, payload)

    await while_serving(sc, abuse)
    statuses = {name: status_of(answer) for name, answer in answers.items()}
    assert all(s is None or 400 <= s < 500 for s in statuses.values()), statuses
    await back_to_baseline(baseline)


# --- slowloris ------------------------------------------------------------------------------

TRICKLE_EVERY = 0.05
TRICKLE_MAX_BYTES = 300  # 15 s at most per connection


@pytest.mark.time_limit(60)
async def test_slowloris_trickle_is_closed_by_the_server(abused: tuple[Sidecar, Usage]) -> None:
    """A request whose headers come one byte every 50 ms never completes: hypercorn closes a
    connection that has not sent a whole request within its keep-alive timeout (5 s)."""
    sc, baseline = abused
    closed_after: list[float] = []

    async def trickle(n: int) -> None:
        request = stream_request(f"slow{n}", "X-Pad: " + "a" * TRICKLE_MAX_BYTES + "\r\n")
        with await connect(sc) as sock:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    await read_until_closed(sock)
                    closed_after.append(trio.current_time() - start)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                for byte in request[:TRICKLE_MAX_BYTES]:
                    try:
                        await sock.send(bytes([byte]))
                    except OSError:
                        break
                    await trio.sleep(TRICKLE_EVERY)
                nursery.cancel_scope.cancel()

    async def abuse() -> None:
        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(trickle, n)

    await while_serving(sc, abuse)
    assert len(closed_after) == 40, "the server let a trickling request hang on"
    assert max(closed_after) < 9, closed_after
    await back_to_baseline(baseline)


@pytest.mark.time_limit(30)
async def test_a_body_trickled_to_the_send_listener_is_cut_off_at_its_deadline(
    tmp_path: Path,
) -> None:
    """SIDECAR_SEND_READ_SECONDS bounds the whole body, not each read: a byte every 0.2 s
    (well within any read timeout) of a 100-byte body does not hold the connection for the
    20 s it would take."""
    settings = settings_for(tmp_path, SIDECAR_SEND_READ_SECONDS="1")
    async with running_sidecar(settings) as sc:
        body = json.dumps({"connectorId": "web", "recipientId": "slow", "response": {}})
        body = body[:-1] + " " * (100 - len(body)) + "}"
        with await connect(sc, url=sc.send_url) as sock:
            await sock.send(
                b"POST /v1/send HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n"
            )
            start = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def trickle() -> None:
                    for byte in body.encode():
                        try:
                            await sock.send(bytes([byte]))
                        except OSError:
                            return
                        await trio.sleep(0.2)

                nursery.start_soon(trickle)
                with trio.fail_after(5):
                    answer = await read_until_closed(sock)
                nursery.cancel_scope.cancel()
            took = trio.current_time() - start
        assert answer == b""
        assert 0.9 <= took < 3, took
        assert await sc.running.store.head("web", "slow") is None  # nothing half-read stored
        assert (await sc.client.get(f"{sc.send_url}/healthz")).status_code == 200


# --- connect/disconnect churn ---------------------------------------------------------------

CHURN = 10_000
CHURN_CONCURRENCY = 50


@pytest.mark.time_limit(90)
async def test_connect_disconnect_churn(abused: tuple[Sidecar, Usage]) -> None:
    sc, baseline = abused
    opened = 0

    async def one(n: int) -> None:
        nonlocal opened
        kind = n % 10
        with await connect(sc) as sock:
            if kind in (1, 3, 9):
                reset_on_close(sock)
            if kind in (2, 3):
                await sock.send(stream_request(f"churn{n}")[:20])
            elif kind == 8:
                # A whole stream: registered, then gone.
                await sock.send(stream_request(f"churn{n % 7}"))
                with trio.fail_after(10):
                    first = await sock.recv(4096)
                assert first.startswith(b"HTTP/1.1 200"), first
                opened += 1
            elif kind == 9:
                await sock.send(stream_request(f"churn{n % 7}"))

    async def abuse() -> None:
        start = trio.current_time()
        numbers = iter(range(CHURN))

        async def worker() -> None:
            for n in numbers:  # shared: each number goes to one worker
                await one(n)

        async with trio.open_nursery() as nursery:
            for _ in range(CHURN_CONCURRENCY):
                nursery.start_soon(worker)
        assert trio.current_time() - start < 45

    await while_serving(sc, abuse)
    assert opened == CHURN // 10
    await wait_until(lambda: sc.running.hub.stream_count() == 0, 10, "churned streams gone")
    await back_to_baseline(baseline, seconds=15)


# --- clients that never read ----------------------------------------------------------------


@pytest.mark.time_limit(90)
async def test_clients_that_never_read_are_cut_off_and_closed(
    abused: tuple[Sidecar, Usage],
) -> None:
    """Never-reading streams fill their buffers and are cut off by the hub; their writes,
    stuck on a zero window, end at the write timeout, and every socket closes."""
    sc, baseline = abused
    hub = sc.running.hub
    users = ["deaf0", "deaf0", "deaf1", "deaf2"]
    inodes: list[int] = []
    clients: list[trio.socket.SocketType] = []
    big = "x" * 60_000

    async def abuse() -> None:
        for user in users:
            sock = await open_raw_stream(sc, user, rcvbuf=4096)
            clients.append(sock)
            inodes.append(server_side_inode(sc, sock))
        # ~4 MB per user: more than the socket buffers and the stream buffer hold.
        for user in sorted(set(users)):
            items = [
                {"connectorId": "web", "recipientId": user, "response": {"n": n, "text": big}}
                for n in range(70)
            ]
            for start in range(0, len(items), 16):
                reply = await sc.client.post(
                    f"{sc.send_url}/v1/send/batch", json=items[start : start + 16]
                )
                assert reply.status_code == 202, reply.text
        await wait_until(
            lambda: not set(inodes) & socket_inodes() and hub.stream_count() == 0,
            WRITE_TIMEOUT + 8,
            "never-reading streams dropped and their sockets closed",
        )

    try:
        await while_serving(sc, abuse)
    finally:
        for sock in clients:
            sock.close()
    assert hub.stats.cut_off >= 1
    # sc.client's pooled connection to the send listener is not part of the baseline.
    await sc.client.aclose()
    await back_to_baseline(baseline, seconds=15)


@pytest.mark.time_limit(60)
async def test_a_stream_the_hub_cut_off_frees_its_slot_while_its_writes_are_stuck(
    tmp_path: Path,
) -> None:
    """With SIDECAR_MAX_STREAMS=1, a never-reading stream is cut off as slow while its write
    waits on a zero window (until the write timeout, 30 s): a new stream gets the slot at
    once, not a 503 until then."""
    settings = settings_for(
        tmp_path, SIDECAR_MAX_STREAMS="1", SIDECAR_STREAM_BUFFER="4", SIDECAR_KEEPALIVE_SECONDS="1"
    )
    async with running_sidecar(settings) as sc:
        hub = sc.running.hub
        deaf = await open_raw_stream(sc, "deaf", rcvbuf=4096)
        try:
            inode = server_side_inode(sc, deaf)
            big = "x" * 60_000
            batch = [
                {"connectorId": "web", "recipientId": "deaf", "response": {"n": n, "text": big}}
                for n in range(16)
            ]
            # More than the socket buffers hold (a few MB on loopback): the write blocks, the
            # buffer fills, the hub cuts the stream off.
            for _ in range(12):
                reply = await sc.client.post(f"{sc.send_url}/v1/send/batch", json=batch)
                assert reply.status_code == 202, reply.text
                if hub.stats.cut_off:
                    break
            await wait_until(lambda: hub.stats.cut_off == 1, 10, "the deaf stream cut off")
            assert hub.stream_count() == 0
            async with sc.stream("next") as client:
                message_id = await sc.send("next")
                assert (await client.next_message()).id == message_id
            # The cut-off stream's connection is still there, its write still stuck.
            assert inode in socket_inodes()
        finally:
            deaf.close()
