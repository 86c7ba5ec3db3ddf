"""TCP options on the listening sockets, so a client that vanished is found and dropped.

hypercorn writes each response chunk inside a shielded cancel scope, so nothing in the
application can interrupt a write to a peer that no longer acknowledges: a browser whose
machine went to sleep or whose network dropped (no FIN, no RST) would hold its socket and
its blocked task for the kernel's retransmission limit (`tcp_retries2`, about 15 minutes),
and a client that keeps its receive window at zero (never reads) forever. The kernel bounds
both when asked:

- `TCP_USER_TIMEOUT`: a connection whose transmitted data stays unacknowledged this long
  is aborted; on Linux this also bounds zero-window probing, so a client that stops reading
  is cut off too. The blocked write then fails, hypercorn reports the disconnect, the
  stream leaves the hub, and its messages stay undelivered in the store until it
  reconnects. A stream always has something to write (a ping every keepalive interval),
  so a vanished browser is found within keepalive + timeout.
- TCP keepalive (idle = the timeout, probes every third of it): a connection on which the
  server only reads (a request body that never completes) is probed, and aborted once the
  probes have gone unanswered past the user timeout (about 1.5 x the timeout in all).

Linux copies these options from a listening socket to every connection it accepts, so they
are set once, on the sockets hypercorn creates from `Config.bind`.

`contain_connection_errors` fixes two things the raw-socket abuse tests (tests/test_abuse.py)
found in hypercorn 0.18's trio connection handler: one bad request could stop the
listener, and a connection outlived its client by the keep-alive timeout. (The keep-alive
timer itself, which never restarted under quart-trio, is fixed in sidecar/http/recycle.py.)
"""

from __future__ import annotations

import logging
import math
import socket

import hypercorn.trio.run
import trio
from hypercorn.config import Config, Sockets
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from sidecar.config import StartupError

log = logging.getLogger("sidecar.http")

MAX_USER_TIMEOUT_MS = 2**31 - 1
MAX_KEEPALIVE_SECONDS = 32767  # the kernel's limit for TCP_KEEPIDLE and TCP_KEEPINTVL


def bound_unacknowledged(sock: socket.socket, timeout: float) -> None:
    """Abort connections of `sock` (a listening TCP socket, or one connection) on which the
    peer acknowledges nothing for about `timeout` seconds. Options the platform lacks are
    skipped."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    if user_timeout is not None:
        millis = min(max(1, math.ceil(timeout * 1000)), MAX_USER_TIMEOUT_MS)
        sock.setsockopt(socket.IPPROTO_TCP, user_timeout, millis)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = min(max(1, math.ceil(timeout)), MAX_KEEPALIVE_SECONDS)
    interval = min(max(1, math.ceil(timeout / 3)), MAX_KEEPALIVE_SECONDS)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", 3)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class ListenerConfig(Config):
    """hypercorn's Config whose listening sockets bound unacknowledged data to
    `write_timeout` seconds (see `bound_unacknowledged`)."""

    write_timeout: float = 30.0
    setting: str = "bind"  # named when the address cannot be listened on

    def create_sockets(self) -> Sockets:
        try:
            sockets = super().create_sockets()
        except OSError as exc:
            raise StartupError(
                f"{self.setting} {' '.join(self.bind)}: cannot listen: {exc}"
            ) from exc
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            bound_unacknowledged(sock, self.write_timeout)
        return sockets


class _ContainedTCPServer(TCPServer):
    """hypercorn's connection handler, with its failures kept to its own connection.

    hypercorn runs every connection in the listener's nursery, so an exception escaping one
    connection takes the whole listener (and the sidecar) down. Malformed requests can
    cause one: an invalid chunked body on a request the application answers at once makes
    hypercorn's error response race the application's close of the connection, and
    `send_eof` raises `trio.BusyResourceError` (see also pgjones/hypercorn#203). Here the
    connection is logged and dropped (trio closes its socket); cancellation still
    propagates."""

    async def run(self) -> None:
        try:
            await super().run()
        except* Exception as group:
            log.warning("connection dropped after an HTTP server error: %r", group.exceptions[0])

    async def _read_data(self) -> None:
        if self.config.read_timeout:
            await super()._read_data()
        else:
            # hypercorn's loop without its `fail_after(inf)`: no cancel scope per read, which
            # an idle SSE connection would hold (about 1 KB) for as long as it is open.
            while True:
                try:
                    data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                await self.protocol.handle(RawData(bytes(data)))
                if data == b"":
                    break
            await self.protocol.handle(Closed())
        # The client closed (or reading failed): nothing more can come. hypercorn would keep
        # the connection, its socket and tasks, until its keep-alive timer ran out (5 s),
        # so a client that connects and closes in a loop would pile up file descriptors.
        await self.idle_task.stop()


def contain_connection_errors() -> None:
    """Make hypercorn's trio worker use `_ContainedTCPServer` for every connection."""
    hypercorn.trio.run.TCPServer = _ContainedTCPServer  # type: ignore[attr-defined]
