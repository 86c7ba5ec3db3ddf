"""Merging a replay with live messages on one stream.

A new stream subscribes to live messages first and only then asks the store what to
replay, so nothing falls into the gap between the two. The price is that a message may
come both ways. `SeenWindow` remembers the ids a stream has written so each is written
once; it is bounded, and duplicates can only come from the most recent messages, so a
window of a few thousand ids is enough.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Iterable, Iterator

from sidecar.protocol.message import Message


class SeenWindow:
    """The last `size` ids added. Its containers are made on the first `add`: most open
    streams are idle, and an empty deque alone costs over 600 bytes."""

    __slots__ = ("_ids", "_order", "_size")

    def __init__(self, size: int = 4096) -> None:
        if size < 1:
            raise ValueError("size must be positive")
        self._order: deque[str] | None = None
        self._ids: set[str] | None = None
        self._size = size

    def __len__(self) -> int:
        return 0 if self._ids is None else len(self._ids)

    def __contains__(self, message_id: object) -> bool:
        return self._ids is not None and message_id in self._ids

    def add(self, message_id: str) -> bool:
        """Remember `message_id`; False when it was already there (a duplicate)."""
        ids, order = self._ids, self._order
        if ids is None or order is None:
            self._ids, self._order = {message_id}, deque((message_id,))
            return True
        if message_id in ids:
            return False
        ids.add(message_id)
        order.append(message_id)
        if len(order) > self._size:
            ids.discard(order.popleft())
        return True


def replay_order(
    batch: Iterable[Message],
    seen: SeenWindow,
    skip: Container[str] = frozenset(),
    queued: Iterable[Message] = (),
) -> Iterator[Message]:
    """The messages to write for a replay batch, in id order, none seen before.

    Leaves out the batch's messages in `skip`: this instance's own sends in flight, which
    a replay may find committed ahead of an earlier send still being saved; they come live,
    in id order, instead. Merges in `queued`, live messages already waiting for the stream
    in the batch's range: one that the user's Last-Event-ID acknowledged is not in the
    batch, and written after it, it would come after a later id."""
    kept = [m for m in batch if m.id not in skip]
    for message in sorted([*kept, *queued], key=lambda m: m.id):
        if seen.add(message.id):
            yield message


def live(message: Message, seen: SeenWindow) -> bool:
    """Whether a live message should be written (it was not already replayed or written)."""
    return seen.add(message.id)
