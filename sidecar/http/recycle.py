"""A fix for hypercorn's HTTP/1.1 keep-alive under quart-trio.

When a response is finished, hypercorn's h11 protocol "recycles" the connection: it makes
the connection ready for the next request and restarts its idle timer
(`keep_alive_timeout`), or, when the client had not finished sending its request body yet,
closes it. hypercorn does that in whichever task reported the response finished, and with
quart-trio that is a task of the request that Quart has already cancelled. The recycling
then dies at its first checkpoint, half done:

- the idle timer is never restarted, so an idle keep-alive connection is never closed
  (`SIDECAR_SEND_IDLE_SECONDS` and the public listener's idle timeout would do nothing);
- a response sent before the request body arrived (an error answered before the body is
  read) leaves the connection neither closed nor ready: the client's next request on it
  waits forever.

Running the recycling under a shield fixes both. It cannot hang there: it only updates the
protocol state, starts the idle timer task, or closes the socket.
"""

from __future__ import annotations

from typing import Any

import hypercorn.protocol.h11
import trio


def shield_connection_recycling() -> None:
    """Patch hypercorn's H11Protocol once (idempotent; skipped if hypercorn changed)."""
    protocol: Any = getattr(hypercorn.protocol.h11, "H11Protocol", None)
    recycle = getattr(protocol, "_maybe_recycle", None)
    if recycle is None or getattr(recycle, "sidecar_shielded", False):
        return

    async def shielded(self: Any) -> None:
        with trio.CancelScope(shield=True):
            await recycle(self)

    shielded.sidecar_shielded = True  # type: ignore[attr-defined]
    protocol._maybe_recycle = shielded
