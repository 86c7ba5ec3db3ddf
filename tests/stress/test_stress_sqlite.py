"""Stress on one instance with the embedded store: many streams across users, messages
through the send API (single and batch) and through the store feed (a second store handle
on the same SQLite file, as another process would write it), with random disconnects and
reconnects with Last-Event-ID while it runs (tests/stress/scenario.py).

All connections live in one nursery, torn down by cancelling it; then nothing may be left:
no stream in the hub, no task, no thread (beyond trio's idle worker cache), no file
descriptor. The scenario runs twice, and the second run must leave the process's RSS near
where the first left it (`exercise_twice`).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from sidecar.config import MAX_STREAM_BUFFER
from sidecar.store.sqlite import SqliteStore
from tests.sidecar_harness import running_sidecar, settings_for
from tests.stress.harness import SCALE, scaled
from tests.stress.scenario import Sizes, exercise_twice

SIZES = Sizes(
    streams=scaled(400), users=scaled(100), api_messages=scaled(3000), foreign_messages=scaled(1000)
)
SEED = int(os.environ.get("STRESS_SEED", "20240605"))


@pytest.mark.time_limit(max(60.0, 180.0 * SCALE))  # two runs
async def test_streams_across_users_get_every_message_once(tmp_path: Path) -> None:
    db = tmp_path / "sidecar.db"
    settings = settings_for(
        tmp_path,
        # No stream may be cut off as a slow consumer here: a cut tab reconnecting would
        # acknowledge for its user's roaming tab (see tests/stress/scenario.py).
        SIDECAR_STREAM_BUFFER=str(MAX_STREAM_BUFFER),
        SIDECAR_KEEPALIVE_SECONDS="5",
        SIDECAR_LOG_LEVEL="WARNING",
    )
    # The other writer stays open across the leak check: SQLite keeps a closed connection's
    # file descriptor until the process's last connection to that file closes (its POSIX
    # locks are per process), which would look like a leak.
    other_writer = await SqliteStore.open(str(db))
    try:
        async with running_sidecar(settings) as sidecar:
            summary = await exercise_twice(sidecar, SIZES, random.Random(SEED), other_writer.save)
    finally:
        await other_writer.aclose()
    print(f"\nstress sqlite: {summary}")
