"""`InstrumentedStore`: a store decorator that counts, in the instance's `Metrics`, the
state transitions a store makes and the operations that fail as unavailable. It changes
nothing else: every call, result and error is the wrapped store's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import trio

from sidecar.metrics import STORE_OPERATIONS, Metrics
from sidecar.protocol.delivery import Position, Replay
from sidecar.protocol.feed import FeedItem
from sidecar.protocol.message import Message
from sidecar.store.base import Store, StoreUnavailable

T = TypeVar("T")


class InstrumentedStore:
    """The store the instance uses: `store` itself, counting the state transitions it makes
    and the operations that fail as unavailable."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._errors = {op: metrics.store_errors.labels(op) for op in STORE_OPERATIONS}

    async def _counted(self, operation: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except StoreUnavailable:
            self._errors[operation].inc()
            raise

    async def save(self, messages: Sequence[Message]) -> list[str]:
        stored = await self._counted("save", self._store.save(messages))
        self._metrics.enqueued.inc(len(messages) - len(stored))
        return stored

    async def head(self, connector_id: str, recipient_id: str) -> Position | None:
        return await self._counted("head", self._store.head(connector_id, recipient_id))

    async def position_of(
        self, connector_id: str, recipient_id: str, message_id: str
    ) -> Position | None:
        return await self._counted(
            "position_of", self._store.position_of(connector_id, recipient_id, message_id)
        )

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
        return await self._counted(
            "logged",
            self._store.logged(
                connector_id, recipient_id, after, through=through, limit=limit, replay=replay
            ),
        )

    async def mark_sent(self, ids: Sequence[str]) -> int:
        moved = await self._counted("mark_sent", self._store.mark_sent(ids))
        self._metrics.sent.inc(moved)
        return moved

    async def ack(self, connector_id: str, recipient_id: str, ids: Sequence[str]) -> int:
        moved = await self._counted("ack", self._store.ack(connector_id, recipient_id, ids))
        self._metrics.delivered.inc(moved)
        return moved

    async def acknowledge_through(
        self, connector_id: str, recipient_id: str, position: Position
    ) -> int:
        moved = await self._counted(
            "acknowledge_through",
            self._store.acknowledge_through(connector_id, recipient_id, position),
        )
        self._metrics.delivered.inc(moved)
        return moved

    async def get(self, message_id: str) -> Message | None:
        return await self._counted("get", self._store.get(message_id))

    async def ping(self) -> dict[str, Any]:
        return await self._counted("ping", self._store.ping())

    async def run_feed(
        self,
        send: trio.MemorySendChannel[FeedItem],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._store.run_feed(send, task_status=task_status)

    @property
    def feed_resumes(self) -> int:
        return self._store.feed_resumes

    async def aclose(self) -> None:
        await self._store.aclose()
