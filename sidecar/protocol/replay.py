"""Merging a replay with live messages on one stream.

A new stream subscribes to live messages first and only then asks the store what to
replay, so nothing falls into the gap between the two. The price is that a message may
come both ways. `SeenWindow` remembers the ids a stream has written so each is written
once; it is bounded, and duplicates can only come from the most recent messages, so a
window of a few thousand ids is enough.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

from sidecar.protocol.message import Message


class SeenWindow:
    def __init__(self, size: int = 4096) -> None:
        if size < 1:
            raise ValueError("size must be positive")
        self._order: deque[str] = deque()
        self._ids: set[str] = set()
        self._size = size

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def add(self, message_id: str) -> bool:
        """Remember `message_id`; False when it was already there (a duplicate)."""
        if message_id in self._ids:
            return False
        self._ids.add(message_id)
        self._order.append(message_id)
        if len(self._order) > self._size:
            self._ids.discard(self._order.popleft())
        return True


def replay_order(batch: Iterable[Message], seen: SeenWindow) -> Iterator[Message]:
    """The messages of a replay batch to write, in id order, none seen before."""
    for message in sorted(batch, key=lambda m: m.id):
        if seen.add(message.id):
            yield message


def live(message: Message, seen: SeenWindow) -> bool:
    """Whether a live message should be written (it was not already replayed or written)."""
    return seen.add(message.id)
