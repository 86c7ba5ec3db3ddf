"""The Store interface every message store implements, and its errors.

Every method may block on I/O in its implementation but never blocks the trio loop: stores
run their blocking calls in worker threads. Methods raise `StoreUnavailable` when the
backing database cannot be reached or written; nothing else escapes for I/O failures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import trio

from sidecar.protocol.delivery import Replay
from sidecar.protocol.message import Message


class StoreUnavailable(Exception):
    """The store could not be reached or written; the operation may be retried later."""


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryLost:
    """Put in the feed when the store could not tell what was written while it was not
    looking (for example a change stream's resume point fell off the oplog): every open
    stream should ask the store again for what it has not been sent."""


FeedItem = Message | HistoryLost


class Store(Protocol):
    async def save(self, messages: Sequence[Message]) -> list[str]:
        """Store `messages` durably, all or none, before returning the ids among them that
        were stored already. Saving an id that is already stored is not an error and
        changes nothing (a retried save succeeds).
        Cancelled, it either stores nothing and raises, or returns once they are stored:
        the send API dispatches what a save that returned stored."""

    async def pending(
        self, connector_id: str, recipient_id: str, replay: Replay, *, after: str | None, limit: int
    ) -> list[Message]:
        """Up to `limit` messages of this recipient that `replay` selects, with an id after
        `after` when it is set, in id order."""

    async def mark_sent(self, ids: Sequence[str]) -> int:
        """Move the ENQUEUED ones of `ids` to SENT; returns how many moved."""

    async def ack(self, connector_id: str, recipient_id: str, ids: Sequence[str]) -> int:
        """Move the messages of `ids` that belong to this recipient and are not yet
        DELIVERED to DELIVERED; returns how many moved."""

    async def ack_through(self, connector_id: str, recipient_id: str, last_event_id: str) -> int:
        """Move this recipient's SENT messages with an id <= `last_event_id` to DELIVERED
        (see `delivery.acked_by_last_event_id`); returns how many moved."""

    async def get(self, message_id: str) -> Message | None:
        """One message by id, or None."""

    async def ping(self) -> dict[str, Any]:
        """Return when the store answers, with what an operator should know about it
        (JSON-able; /readyz shows it); raise StoreUnavailable otherwise."""

    async def run_feed(
        self,
        send: trio.MemorySendChannel[FeedItem],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until cancelled, send every message saved from now on by any other writer of
        this store's data (another process, another store object) into `send`, or
        `HistoryLost` when some may have been missed. Calls `task_status.started()` once it
        is watching. Saves made through this store object may be sent too or left out (the
        instance dispatches those itself), and a message may be sent more than once:
        consumers drop repeats by id."""

    async def aclose(self) -> None:
        """Release the store's resources."""
