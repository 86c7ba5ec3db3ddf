"""Releasing concurrent work in the order it started.

Sends on one instance are saved concurrently (MongoDB inserts run in parallel worker
threads), so they finish in any order; but a browser's Last-Event-ID acknowledges every
message up to it, so a stream must never see an id before a smaller one from the same
instance. Each send takes a ticket when its ids are made; its messages are dispatched only
when every earlier ticket has finished, saved or failed.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Sequencer(Generic[T]):
    """Tickets in the order `take` is called; `finish` releases items in ticket order.

    Holds only the items finished ahead of an unfinished earlier ticket, so its size is
    bounded by the work in flight.
    """

    def __init__(self) -> None:
        self._next = 0
        self._head = 0
        self._finished: dict[int, T | None] = {}

    def take(self) -> int:
        ticket = self._next
        self._next += 1
        return ticket

    def finish(self, ticket: int, item: T | None) -> list[T]:
        """Record that `ticket` is done, with `item` to release (None: nothing, it failed);
        return every item whose turn has now come, in ticket order."""
        if not self._head <= ticket < self._next or ticket in self._finished:
            raise ValueError(f"ticket {ticket} is not in flight")
        self._finished[ticket] = item
        released: list[T] = []
        while self._head in self._finished:
            done = self._finished.pop(self._head)
            self._head += 1
            if done is not None:
                released.append(done)
        return released

    @property
    def in_flight(self) -> int:
        return self._next - self._head
