"""Message stores. `open_store` picks one from the store URL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sidecar.store.base import Store, StoreError, StoreOptions, StoreUnavailable

__all__ = ["Store", "StoreError", "StoreOptions", "StoreUnavailable", "open_store"]


@asynccontextmanager
async def open_store(options: StoreOptions) -> AsyncIterator[Store]:
    """Open the store `options.url` names, and close it on exit."""
    store: Store
    try:
        if options.url.startswith("sqlite:///"):
            from sidecar.store.sqlite import SqliteStore

            store = await SqliteStore.open(
                options.url.removeprefix("sqlite:///"),
                max_count=options.max_count,
                ttl_days=options.ttl_days,
            )
        else:
            from sidecar.store.mongo import MongoStore

            store = await MongoStore.open(options)
    except StoreError as exc:
        raise type(exc)(f"SIDECAR_STORE: {exc}") from exc
    try:
        yield store
    finally:
        await store.aclose()
