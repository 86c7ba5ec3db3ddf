"""Message stores. `open_store` picks one from the store URL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sidecar.config import Settings
from sidecar.store.base import FeedItem, HistoryLost, Store, StoreUnavailable

__all__ = ["FeedItem", "HistoryLost", "Store", "StoreUnavailable", "open_store"]


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    """Open the store `settings.store` names, and close it on exit."""
    store: Store
    try:
        if settings.store.startswith("sqlite:///"):
            from sidecar.store.sqlite import SqliteStore

            store = await SqliteStore.open(
                settings.store.removeprefix("sqlite:///"),
                max_count=settings.queue_max_count,
                ttl_days=settings.queue_ttl_days,
            )
        else:
            from sidecar.store.mongo import MongoStore

            store = await MongoStore.open(settings)
    except StoreUnavailable as exc:
        raise StoreUnavailable(f"SIDECAR_STORE: {exc}") from exc
    try:
        yield store
    finally:
        await store.aclose()
