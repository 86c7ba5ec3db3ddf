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

`ListenerConfig.body_timeout` bounds the other side, how long a request body may take to
arrive; sidecar/http/hypercorn_patches.py applies it.
"""

from __future__ import annotations

import math
import socket

from hypercorn.config import Config, Sockets

from sidecar.config import StartupError

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
    `write_timeout` seconds (see `bound_unacknowledged`), and whose request bodies must
    arrive within `body_timeout` seconds (None: no bound)."""

    write_timeout: float = 30.0
    body_timeout: float | None = None
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
