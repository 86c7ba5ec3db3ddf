"""Shared fixtures and the time bound every test runs under.

Each async test body runs inside `trio.fail_after(limit)` (30 s unless the test is marked
`@pytest.mark.time_limit(seconds)`); pytest-timeout backs that up for fixtures and sync
tests (see pyproject.toml).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from sidecar.store.base import Store
from sidecar.store.sqlite import SqliteStore
from tests.sidecar_harness import Sidecar, running_sidecar, settings_for

DEFAULT_TIME_LIMIT = 30.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "time_limit(seconds): absolute time bound for a test")


def _bounded(fn: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def bounded(*args: Any, **kwargs: Any) -> Any:
        with trio.fail_after(seconds):
            return await fn(*args, **kwargs)

    return bounded


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    # Runs before pytest-trio wraps the test, so the bound is inside the test's trio.run.
    if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
        marker = item.get_closest_marker("time_limit")
        item.obj = _bounded(item.obj, marker.args[0] if marker else DEFAULT_TIME_LIMIT)
    yield


@asynccontextmanager
async def open_sqlite_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    store = await SqliteStore.open(str(tmp_path / "sidecar.db"))
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture(scope="session")
def mongodb_server() -> Iterator[str]:
    """A MongoDB URI: MONGODB_URI when set, else one memory-backend mongo-java-server for
    the whole session (stopped at its end)."""
    from tests.mongo_harness import MongoJavaServer, mongodb_uri_from_env

    uri = mongodb_uri_from_env()
    if uri is not None:
        yield uri
        return
    server = MongoJavaServer().start()
    try:
        yield server.uri
    finally:
        server.stop()


@asynccontextmanager
async def open_mongo_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A MongoStore on a database of the test's own (named after its temporary directory:
    opened twice, two writers on one database), dropped afterwards."""
    import hashlib

    import pymongo

    from sidecar.app import store_options
    from sidecar.config import Settings
    from sidecar.store.mongo import MongoStore

    uri: str = request.getfixturevalue("mongodb_server")
    name = f"t_{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]}"
    env = {"SIDECAR_STORE": uri, "SIDECAR_MONGO_DB": name}
    store = await MongoStore.open(store_options(Settings.load(env)))

    def drop() -> None:
        with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
            client.drop_database(name)

    try:
        yield store
    finally:
        await store.aclose()
        await trio.to_thread.run_sync(drop)


# Every store implementation, by name: an async context manager giving a fresh, empty store
# (opened twice with the same arguments: a second writer on the same data). The store
# conformance suite runs once per entry.
STORE_OPENERS: dict[
    str, Callable[[pytest.FixtureRequest, Path], AbstractAsyncContextManager[Store]]
] = {"mongo": open_mongo_store, "sqlite": open_sqlite_store}


@pytest.fixture(params=sorted(STORE_OPENERS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with STORE_OPENERS[request.param](request, tmp_path) as opened:
        yield opened


@pytest.fixture
async def other_writer(
    request: pytest.FixtureRequest, tmp_path: Path, store: Store
) -> AsyncIterator[Store]:
    """Another store on `store`'s data, as another process would open it."""
    async with STORE_OPENERS[request.node.callspec.params["store"]](request, tmp_path) as opened:
        yield opened


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[Sidecar]:
    async with running_sidecar(settings_for(tmp_path)) as running:
        yield running
