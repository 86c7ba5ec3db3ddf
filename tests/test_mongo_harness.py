"""Tests proving the MongoDB test harness works (mongo-java-server or MONGODB_URI)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pymongo
import pytest
from bson import Timestamp
from pymongo.change_stream import ChangeStream
from pymongo.errors import ConnectionFailure

from tests.mongo_harness import MongoJavaServer, TcpProxy, mongodb_uri_from_env

_DocT = TypeVar("_DocT", bound=Mapping[str, Any])

# Short client timeouts: every operation below fails (or succeeds) within seconds.
CLIENT_OPTS: dict[str, Any] = {
    "serverSelectionTimeoutMS": 5000,
    "connectTimeoutMS": 2000,
    "socketTimeoutMS": 2000,
}


@pytest.fixture(scope="module")
def mongo_uri() -> Iterator[str]:
    """MONGODB_URI if set, else a fresh memory-backend mongo-java-server."""
    uri = mongodb_uri_from_env()
    if uri is not None:
        yield uri
        return
    with MongoJavaServer() as server:
        yield server.uri


@pytest.fixture
def client(mongo_uri: str) -> Iterator[pymongo.MongoClient[dict[str, Any]]]:
    with pymongo.MongoClient(mongo_uri, **CLIENT_OPTS) as c:
        yield c


@pytest.fixture
def db_name(client: pymongo.MongoClient[dict[str, Any]]) -> Iterator[str]:
    name = f"harness_{uuid.uuid4().hex[:12]}"
    yield name
    client.drop_database(name)


def next_change(stream: ChangeStream[_DocT], timeout: float = 10.0) -> _DocT:
    """Poll ``try_next`` until a change arrives (bounded; paced, no time.sleep)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        change = stream.try_next()
        if change is not None:
            return change
        pause.wait(0.05)  # mongo-java-server ignores maxAwaitTimeMS: empty batches are instant
    raise AssertionError(f"no change event within {timeout}s")


def test_insert_and_find(client: pymongo.MongoClient[dict[str, Any]], db_name: str) -> None:
    coll = client[db_name]["items"]
    result = coll.insert_one({"name": "alpha", "n": 1})
    found = coll.find_one({"_id": result.inserted_id})
    assert found is not None
    assert found["name"] == "alpha"
    assert found["n"] == 1
    assert client.admin.command("isMaster")["maxWireVersion"] >= 9


def test_change_stream_insert_and_resume(
    client: pymongo.MongoClient[dict[str, Any]], db_name: str
) -> None:
    coll = client[db_name]["events"]
    pipeline = [{"$match": {"operationType": "insert"}}]
    start = Timestamp(int(time.time()) - 3, 0)
    with coll.watch(
        pipeline,
        full_document="updateLookup",
        start_at_operation_time=start,
        max_await_time_ms=100,
    ) as stream:
        assert stream.try_next() is None  # nothing yet (and no postBatchResumeToken needed)
        coll.insert_one({"k": "one"})
        first = next_change(stream)
        assert first["operationType"] == "insert"
        assert first["fullDocument"]["k"] == "one"
        assert "_id" in first["documentKey"]
        token = stream.resume_token
        assert token is not None
        assert token == first["_id"]

    coll.insert_one({"k": "two"})
    with coll.watch(
        pipeline, full_document="updateLookup", resume_after=token, max_await_time_ms=100
    ) as resumed:
        second = next_change(resumed)
        assert second["operationType"] == "insert"
        assert second["fullDocument"]["k"] == "two"
        assert resumed.resume_token != token


def test_h2_backend_survives_graceful_restart(tmp_path: Path) -> None:
    h2_file = tmp_path / "mongo.h2"
    server = MongoJavaServer()
    server.start(h2_path=h2_file)
    try:
        port = server.port
        with pymongo.MongoClient(server.uri, **CLIENT_OPTS) as c:
            c.persist.docs.insert_one({"_id": "kept", "v": 42})
        first_pid = server.pid
        server.stop()
        assert not server.running

        server.start(h2_path=h2_file, port=port)
        assert server.port == port
        assert server.pid != first_pid
        with pymongo.MongoClient(server.uri, **CLIENT_OPTS) as c:
            assert c.persist.docs.find_one({"_id": "kept"}) == {"_id": "kept", "v": 42}
    finally:
        server.stop()


def test_sigterm_is_graceful(tmp_path: Path) -> None:
    h2_file = tmp_path / "mongo.h2"
    server = MongoJavaServer()
    server.start(h2_path=h2_file)
    try:
        with pymongo.MongoClient(server.uri, **CLIENT_OPTS) as c:
            c.persist.docs.insert_one({"_id": "flushed"})
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait_exit() is not None  # shutdown hook ran, process gone
        assert not server.running
        server.start(h2_path=h2_file)
        with pymongo.MongoClient(server.uri, **CLIENT_OPTS) as c:
            assert c.persist.docs.find_one({"_id": "flushed"}) == {"_id": "flushed"}
    finally:
        server.stop()


def test_start_fails_loudly_without_java(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # empty directory: no java, no mvn
    with pytest.raises(RuntimeError, match="not found on PATH"):
        MongoJavaServer().start()


def test_tcp_proxy_cut_and_restore() -> None:
    with MongoJavaServer() as server, TcpProxy("127.0.0.1", server.port or 0) as proxy:
        uri = f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true"
        opts = {
            **CLIENT_OPTS,
            "serverSelectionTimeoutMS": 2000,
            "heartbeatFrequencyMS": 500,
            "retryReads": False,
            "retryWrites": False,
        }
        with pymongo.MongoClient(uri, **opts) as c:
            coll = c.proxied.docs
            coll.insert_one({"_id": 1})
            assert coll.find_one({"_id": 1}) == {"_id": 1}

            proxy.cut()
            started = time.monotonic()
            with pytest.raises(ConnectionFailure):
                coll.find_one({"_id": 1})
            assert time.monotonic() - started < 10.0

            proxy.restore()
            assert coll.find_one({"_id": 1}) == {"_id": 1}
            coll.insert_one({"_id": 2})
            assert coll.count_documents({}) == 2
