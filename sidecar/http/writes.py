"""Fewer socket writes per HTTP/1.1 response from hypercorn.

hypercorn's h11 protocol writes every h11 event to the socket on its own, and each write
costs a lock, a shielded cancel scope and a `send` system call: a small JSON answer is
three writes (the head, the body, then an empty end of message: a content-length body
needs no trailer), and an SSE stream's head goes out alone before its first ping. Here
the head is held back and goes out with the next bytes of the response (its body, or the
end of an empty one), and writes of nothing are skipped. What reaches the client, and in
what order, is unchanged; only the number of writes drops (one per small response). A
held head is written before the connection is recycled or closed at the end of the
stream, whatever happens.
"""

from __future__ import annotations

from typing import Any

import h11
import hypercorn.protocol.h11
import trio
from hypercorn.events import RawData


def write_head_with_body() -> None:
    """Patch hypercorn's H11Protocol once (idempotent; skipped if hypercorn changed)."""
    protocol: Any = getattr(hypercorn.protocol.h11, "H11Protocol", None)
    send_event = getattr(protocol, "_send_h11_event", None)
    recycle = getattr(protocol, "_maybe_recycle", None)
    if send_event is None or recycle is None or getattr(send_event, "sidecar_corked", False):
        return

    async def flush_head(self: Any) -> None:
        head = self._sidecar_head
        if head:
            self._sidecar_head = b""
            await self.send(RawData(data=head))

    async def send_h11_event(self: Any, event: Any) -> None:
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            await flush_head(self)
            return
        if type(event) is h11.Response:  # a final head: it waits for the body's first bytes
            self._sidecar_head += data
            return
        head = self._sidecar_head
        if head:
            self._sidecar_head = b""
            data = head + data
        if data:
            await self.send(RawData(data=data))

    async def recycle_flushing(self: Any) -> None:
        # hypercorn recycles (or closes) the connection when the stream closes: whatever
        # the stream left unsent goes first.
        with trio.CancelScope(shield=True):  # as the recycling (sidecar/http/recycle.py)
            await flush_head(self)
        await recycle(self)

    send_h11_event.sidecar_corked = True  # type: ignore[attr-defined]
    protocol._sidecar_head = b""
    protocol._send_h11_event = send_h11_event
    protocol._maybe_recycle = recycle_flushing
