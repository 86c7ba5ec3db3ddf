"""The same stress on the MongoDB store (MONGODB_URI, else the session's
mongo-java-server): the other writer is a second MongoStore on the same database, whose
inserts reach the instance's streams through its change stream.

Every message, the instance's own sends included, reaches its streams through the change
stream, logged by the feeds in commit order (docs/delivery.md): with concurrent send
requests MongoDB commits them out of id order, and the streams follow the commits.
"""

from __future__ import annotations

import dataclasses
import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pymongo
import pytest

from sidecar.app import store_options
from sidecar.config import MAX_STREAM_BUFFER, Settings
from sidecar.store.mongo import MongoStore
from tests.sidecar_harness import running_sidecar, settings_for
from tests.stress.harness import SCALE, scaled
from tests.stress.scenario import Sizes, exercise_twice

SIZES = Sizes(
    streams=scaled(200),
    users=scaled(50),
    api_messages=scaled(1200),
    foreign_messages=scaled(400),
    api_senders=1,
)
SEED = int(os.environ.get("STRESS_SEED", "20240605"))


@pytest.fixture
def database(mongodb_server: str) -> Iterator[str]:
    name = f"stress_{uuid.uuid4().hex[:12]}"
    yield name
    with pymongo.MongoClient(mongodb_server, serverSelectionTimeoutMS=5000) as client:
        client.drop_database(name)


async def _stress(tmp_path: Path, uri: str, database: str, sizes: Sizes) -> None:
    store_env = {"SIDECAR_STORE": uri, "SIDECAR_MONGO_DB": database}
    settings = settings_for(
        tmp_path,
        **store_env,
        SIDECAR_STREAM_BUFFER=str(MAX_STREAM_BUFFER),
        SIDECAR_KEEPALIVE_SECONDS="5",
        SIDECAR_LOG_LEVEL="WARNING",
    )
    # Opened before the baseline: a MongoClient keeps monitor threads and pooled sockets.
    other_writer = await MongoStore.open(store_options(Settings.load(store_env)))
    failure: AssertionError | None = None
    try:
        async with running_sidecar(settings) as sidecar:
            # A failed check must not cancel the instance from inside (it would then not
            # close its MongoClient): the instance stops first, then the failure is raised.
            try:
                nodes = pymongo.uri_parser.parse_uri(uri)["nodelist"]
                summary = await exercise_twice(
                    sidecar,
                    sizes,
                    random.Random(SEED),
                    other_writer.save,
                    pooled_ports=[p for _, p in nodes],
                )
            except AssertionError as exc:
                failure = exc
    finally:
        await other_writer.aclose()
    if failure is not None:
        raise failure
    print(f"\nstress mongo: {summary}")


@pytest.mark.time_limit(max(60.0, 180.0 * SCALE))  # two runs
async def test_streams_on_mongodb_get_every_message_once(
    tmp_path: Path, mongodb_server: str, database: str
) -> None:
    await _stress(tmp_path, mongodb_server, database, SIZES)


@pytest.mark.time_limit(max(60.0, 180.0 * SCALE))  # two runs
async def test_concurrent_sends_on_mongodb_reach_reconnecting_tabs(
    tmp_path: Path, mongodb_server: str, database: str
) -> None:
    # Delivery waits on the feed here (every message is logged by it), which on
    # mongo-java-server, sharing its one server with the saves, marks and replays of this
    # run, takes some 12 s for the 1600 messages.
    sizes = dataclasses.replace(
        SIZES, streams=scaled(100), users=scaled(25), api_senders=4, deliver_within=30.0
    )
    await _stress(tmp_path, mongodb_server, database, sizes)
