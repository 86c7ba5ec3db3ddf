"""The Store interface every message store implements, what a store is opened with
(`StoreOptions`), and its errors.

Every method may block on I/O in its implementation but never blocks the trio loop: stores
run their blocking calls in worker threads. Methods raise `StoreUnavailable` when the
backing database cannot be reached or written now, and `StoreError` when it refused in a
way a retry will not change (an authorisation failure, a query it rejects); nothing else
escapes for the database's failures.

A store knows nothing of the settings (sidecar/config.py): `sidecar.app` builds its
`StoreOptions` from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import trio

from sidecar.errors import SidecarError
from sidecar.protocol.delivery import Position, Replay
from sidecar.protocol.feed import FeedItem
from sidecar.protocol.message import Message


class StoreError(SidecarError):
    """The store refused the operation, and retrying it will not help: answered 500 and
    logged (sidecar.errors)."""


class StoreUnavailable(StoreError):
    """The store could not be reached or written; the operation may be retried later."""

    status = 503
    code = "store_unavailable"
    retry_after = 1

    @property
    def public_message(self) -> str:
        return "the message store is unavailable; retry later"


@dataclasses.dataclass(frozen=True, slots=True)
class StoreOptions:
    """What a store is opened with: `url` (`sqlite:///PATH` or `mongodb://...`), the
    connectors whose messages its feed reports, and the retention rules (Tock's): at most
    `max_count` messages, kept `ttl_days` (None: the store's default; 0: forever). The
    MongoDB store alone reads the rest: its database (None: the URL's, else Tock's), and
    whether a collection it creates is capped (at `max_size_kb`, None: 2 KB a message)."""

    url: str
    connector_ids: tuple[str, ...]
    max_count: int
    ttl_days: float | None
    mongo_database: str | None
    mongo_capped: bool
    max_size_kb: int | None


class Store(Protocol):
    """A message store and its users' logs.

    The log contract (docs/delivery.md), which the store conformance suite holds every
    store to: each message a store holds for delivery has a place in its user's log, an
    (epoch, seq) that never changes; the seqs of one epoch are 1, 2, ... with no gap but
    those that expiry makes, and a seq is only given once every lower seq of its epoch was.
    When a save returned before another save of the same user began, its messages have
    the lower seqs; the messages of one save are logged in their order. A user's epoch
    changes only when none of its logged messages is left."""

    async def save(self, messages: Sequence[Message]) -> list[str]:
        """Store `messages` durably, in their order, before returning the ids among them
        that were stored already. Saving an id that is already stored is not an error and
        stores nothing (a retried save succeeds).
        Cancelled, it either stores nothing and raises, or returns once they are stored."""

    async def head(self, connector_id: str, recipient_id: str) -> Position | None:
        """The user's latest logged place, or None when the user has no log."""

    async def position_of(
        self, connector_id: str, recipient_id: str, message_id: str
    ) -> Position | None:
        """The place of this user's message `message_id` in its log, or None when the store
        has no logged message of that id for this user."""

    async def logged(
        self,
        connector_id: str,
        recipient_id: str,
        after: Position,
        *,
        through: int,
        limit: int,
        replay: Replay | None = None,
    ) -> list[Message]:
        """Up to `limit` of the user's messages in `after`'s epoch with a seq after
        `after.seq` and up to `through`, in seq order; only those `replay` selects by state
        when it is given."""

    async def mark_sent(self, ids: Sequence[str]) -> int:
        """Move the ENQUEUED ones of `ids` to SENT; returns how many moved."""

    async def ack(self, connector_id: str, recipient_id: str, ids: Sequence[str]) -> int:
        """Move the messages of `ids` that belong to this recipient and are not yet
        DELIVERED to DELIVERED; returns how many moved."""

    async def acknowledge_through(
        self, connector_id: str, recipient_id: str, position: Position
    ) -> int:
        """Move this user's messages in `position`'s epoch with a seq up to its seq, not yet
        DELIVERED, to DELIVERED; returns how many moved."""

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
        """Until cancelled, send every message logged from now on, by any writer of this
        store's data (this store object included), into `send` with its epoch and seq, or
        `HistoryLost` when some may have been missed. Calls `task_status.started()` once it
        is watching. A message may be sent more than once, and late: streams place each by
        its seq."""

    @property
    def feed_resumes(self) -> int:
        """How many times the feed reopened its source after an interruption (0 for a feed
        that never does); /metrics shows it."""

    async def aclose(self) -> None:
        """Release the store's resources."""
