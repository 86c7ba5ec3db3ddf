"""What `sidecar serve` checks and adjusts once its settings are loaded and logging is set
up, before anything listens (`sidecar.cli.main` calls `prepare`, in this order):

1. RLIMIT_NOFILE: the soft limit is raised to the hard one (both listeners share the fd
   table, and every open stream holds a socket); start-up stops with a ConfigError naming
   SIDECAR_MAX_STREAMS when `max_streams + FD_RESERVE` does not fit in it.
2. An environment variable named `SIDECAR_*` that is no setting: one WARNING line each,
   naming the closest setting (a misspelt setting is otherwise silently ignored).
3. The send listener bound beyond loopback without SIDECAR_SEND_TOKEN: one WARNING line
   (anyone who reaches it can send to any user).
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import resource
from collections.abc import Mapping

from sidecar.config import OPTIONS, ConfigError, Settings

log = logging.getLogger("sidecar")

# Descriptors a full instance needs besides its streams' sockets: stdio and trio's own (about
# 10), the two listening sockets (4 when a name binds IPv4 and IPv6), the store (SQLite: 2
# connections of 3 files; MongoDB: a pooled socket per worker thread, which trio caps at
# 40, and 2 monitor sockets per replica set member: about 60), and the rest for the send
# API's connections and the public side's non-stream requests (acks, preflights, probes) in
# flight at once.
FD_RESERVE = 512


def prepare(settings: Settings, env: Mapping[str, str]) -> None:
    """Raise the descriptor limit and log the warnings above; raise ConfigError when
    `settings.max_streams` cannot be served within the limit."""
    _raise_fd_limit(settings.max_streams)
    known = {o.env.removeprefix("SIDECAR_"): o.env for o in OPTIONS}
    for name in sorted(env):
        if not name.upper().startswith("SIDECAR_") or name in known.values():
            continue
        # Compared without the prefix every name shares, which would make any two alike.
        close = difflib.get_close_matches(name[len("SIDECAR_") :].upper(), known, n=1)
        hint = f"did you mean {known[close[0]]}?" if close else "no setting has a name like it"
        log.warning("%s is not a setting and is ignored; %s", name, hint)
    if settings.send_token is None and not _loopback(settings.send_bind.host):
        log.warning(
            "the send listener (SIDECAR_SEND_BIND %s) binds beyond loopback and"
            " SIDECAR_SEND_TOKEN is not set: anyone who reaches it can send to any user",
            settings.send_bind,
        )


def _raise_fd_limit(max_streams: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit (macOS) is refused as a soft one: the soft one stays.
    if soft != hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    needed = max_streams + FD_RESERVE
    if soft != resource.RLIM_INFINITY and needed > soft:
        raise ConfigError(
            f"SIDECAR_MAX_STREAMS: {max_streams} streams need {needed} file descriptors"
            f" ({FD_RESERVE} more for the listeners, the store and requests) and the"
            f" limit (RLIMIT_NOFILE, ulimit -n) is {soft}: raise it to {needed}"
            + (f" or lower the setting to {soft - FD_RESERVE}" if soft > FD_RESERVE else "")
        )


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything
