"""Telling a stream that its client has gone, without a task per stream waiting for it.

An ASGI application learns that its client went away only by awaiting `receive()` until
it returns `http.disconnect`. An SSE stream reads nothing else, so that takes one more
task and a nursery per open stream: about 3 KB of what an idle stream costs. hypercorn
delivers that event from one place, `HTTPStream.handle(StreamClosed)`. Patched here, it
puts an empty list in every HTTP request's scope at `scope["extensions"][ON_DISCONNECT]`,
and when the stream closes, before queueing `http.disconnect` as before, calls (once, in
hypercorn's task) the callables the application appended to that list. The stream route
uses it when the key is there, and falls back to a task awaiting `http.disconnect` when
it is not (another server, or a hypercorn this patch no longer fits).

The list sees the close of every request, also a response finished normally: a callback
is for as long as the application waits, removed once it is done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hypercorn.protocol.http_stream
from hypercorn.protocol.events import Request, StreamClosed

ON_DISCONNECT = "sidecar.on_disconnect"


def disconnect_callbacks(scope: Any) -> list[Callable[[], None]] | None:
    """The list to append a callback to for the close of this request, or None when the
    server does not call them."""
    extensions = scope.get("extensions") or {}
    callbacks: list[Callable[[], None]] | None = extensions.get(ON_DISCONNECT)
    return callbacks


def notify_disconnects() -> None:
    """Patch hypercorn's HTTPStream once (idempotent; skipped if hypercorn changed)."""
    stream: Any = getattr(hypercorn.protocol.http_stream, "HTTPStream", None)
    handle = getattr(stream, "handle", None)
    if handle is None or getattr(handle, "sidecar_notifies", False):
        return

    async def handle_notifying(self: Any, event: Any) -> None:
        kind = type(event)
        if kind is StreamClosed and not self.closed:
            scope = getattr(self, "scope", None)
            callbacks = scope["extensions"].get(ON_DISCONNECT) if scope is not None else None
            if callbacks:
                for callback in list(callbacks):
                    callback()
        await handle(self, event)
        if kind is Request:
            extensions = getattr(self, "scope", {}).get("extensions")
            if extensions is not None:
                # Set before the application runs: hypercorn only starts its task here.
                extensions[ON_DISCONNECT] = []

    handle_notifying.sidecar_notifies = True  # type: ignore[attr-defined]
    stream.handle = handle_notifying
