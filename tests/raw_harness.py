"""Raw TCP clients for abuse and half-open tests, and what the process holds (fds, tasks, RSS).

The sidecar runs in the test process (`running_sidecar`), so /proc/self and the trio task
tree show the server's resources; the raw clients here are plain trio sockets.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import os
import socket
import struct
from collections.abc import Callable

import httpx
import trio

from sidecar.protocol import sse
from tests.sidecar_harness import Sidecar

SO_ATTACH_FILTER = 26  # linux/asm-generic/socket.h; not exported by the socket module


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host.strip("[]"), int(port)


async def connect(
    sc: Sidecar, *, rcvbuf: int | None = None, url: str | None = None
) -> trio.socket.SocketType:
    """A connection to `url` (the public listener when None)."""
    sock = trio.socket.socket()
    if rcvbuf is not None:
        # Before connect, so the advertised window is small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await sock.connect(host_port(url or sc.public))
    except BaseException:
        sock.close()
        raise
    return sock


def stream_request(user: str, extra: str = "") -> bytes:
    return f"GET /io/app/web/sse?userId={user} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


async def open_raw_stream(
    sc: Sidecar, user: str, *, rcvbuf: int | None = None
) -> trio.socket.SocketType:
    """A stream opened on a raw socket, returned once its first ping has arrived (so the
    stream is registered in the hub)."""
    sock = await connect(sc, rcvbuf=rcvbuf)
    await sock.send(stream_request(user))
    received = b""
    with trio.fail_after(10):
        while b"event: ping\ndata: 1\n\n" not in received:
            chunk = await sock.recv(4096)
            assert chunk, f"closed before the first ping: {received!r}"
            received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received
    return sock


async def read_until_closed(sock: trio.socket.SocketType, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (EOF or reset), at most `limit` bytes."""
    data = b""
    while len(data) < limit:
        try:
            chunk = await sock.recv(65536)
        except ConnectionError:
            break
        if not chunk:
            break
        data += chunk
    return data


def status_of(response: bytes) -> int | None:
    """The status code of a raw HTTP/1.x response, None when there is none."""
    if not response.startswith(b"HTTP/1."):
        return None
    return int(response.split(b" ", 2)[1])


def blackhole(sock: trio.socket.SocketType) -> None:
    """Make `sock` vanish without a FIN or RST, as a peer that lost its network does: a
    socket filter (classic BPF `ret #0`) drops every packet that arrives for it before TCP
    sees it, so it never acknowledges, answers or resets anything again. Needs no
    privileges and touches no other socket."""
    drop_all = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))  # BPF_RET|BPF_K
    program = struct.pack("HL", 1, ctypes.addressof(drop_all))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)


def server_side_inode(sc: Sidecar, client: trio.socket.SocketType) -> int:
    """The inode of the sidecar's end of `client`'s connection (from /proc/net/tcp)."""
    _, server_port = host_port(sc.public)
    client_port = client.getsockname()[1]
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == server_port and (
                int(remote.split(":")[1], 16) == client_port
            ):
                return int(fields[9])
    raise AssertionError(f"no server socket for client port {client_port}")


def socket_fds() -> dict[int, int]:
    """The sockets this process has open: inode -> fd."""
    sockets = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile, or listdir's own fd
            continue
        if target.startswith("socket:["):
            sockets[int(target[8:-1])] = int(fd)
    return sockets


def socket_inodes() -> set[int]:
    """Inodes of the sockets this process has open."""
    return set(socket_fds())


def count_tasks() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(c) for n in task.child_nurseries for c in n.child_tasks)

    return count(trio.lowlevel.current_root_task())


def task_names() -> list[str]:
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        names.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return names


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@dataclasses.dataclass(frozen=True)
class Usage:
    fds: int
    tasks: int
    rss_kb: int

    @classmethod
    def now(cls, *, release_free_memory: bool = False) -> Usage:
        """With `release_free_memory`, RSS is measured after a garbage collection and after
        glibc gives its free pages back: what is still in use, not what the allocator keeps
        for reuse after a burst."""
        if release_free_memory:
            gc.collect()
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
        return cls(len(os.listdir("/proc/self/fd")), count_tasks(), rss_kb())


async def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> float:
    """Poll `condition` until it holds; fail after `seconds`. Returns the time it took."""
    start = trio.current_time()
    while not condition():
        if trio.current_time() - start > seconds:
            raise AssertionError(f"not within {seconds}s: {what}")
        await trio.sleep(0.05)
    return trio.current_time() - start


async def settle() -> Usage:
    """The process's usage once it stops changing (connections just closed are cleaned up
    by their tasks a moment later)."""
    previous = Usage.now()
    for _ in range(50):
        await trio.sleep(0.2)
        current = Usage.now()
        if (current.fds, current.tasks) == (previous.fds, previous.tasks):
            return Usage.now(release_free_memory=True)
        previous = current
    return Usage.now(release_free_memory=True)


async def back_to_baseline(
    baseline: Usage, *, seconds: float = 10, rss_slack_kb: int = 20 * 1024
) -> Usage:
    """Wait (bounded) until fds and tasks are back to `baseline`; RSS may grow a little."""
    try:
        await wait_until(
            lambda: Usage.now().fds <= baseline.fds and count_tasks() <= baseline.tasks,
            seconds,
            "fds and tasks back to baseline",
        )
    except AssertionError:
        now = Usage.now()
        fds = sorted(_fd_targets())
        raise AssertionError(
            f"baseline {baseline}, now {now}; fds {fds}; tasks {sorted(task_names())}"
        ) from None
    now = Usage.now(release_free_memory=True)
    assert now.rss_kb <= baseline.rss_kb + rss_slack_kb, (baseline, now)
    return now


def _fd_targets() -> list[str]:
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return targets


async def assert_serves(sc: Sidecar, user: str = "good") -> None:
    """A well-behaved client opens a stream and receives a message sent to it, on
    connections of its own that it closes afterwards."""
    with trio.fail_after(10):
        async with httpx.AsyncClient(timeout=10) as client:
            url = sc.stream_url(user)
            async with client.stream("GET", url) as response:
                assert response.status_code == 200
                parser = sse.Parser()
                chunks = response.aiter_raw()
                events: list[sse.Event] = []
                while not any(e.event == "ping" for e in events):
                    events += parser.feed(await chunks.__anext__())
                body = {"connectorId": "web", "recipientId": user, "response": {"ok": user}}
                reply = await client.post(f"{sc.send_url}/v1/send", json=body)
                assert reply.status_code == 202, reply.text
                sent = reply.json()["id"]
                while not any(e.event == "message" for e in events):
                    events += parser.feed(await chunks.__anext__())
                assert [e.id for e in events if e.event == "message"] == [sent]
                await chunks.aclose()
