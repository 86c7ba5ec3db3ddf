"""What a send's `response` must be to be stored (`message.check_storable`, and finite
numbers in `common.parse_json`), end to end: the same answer on SQLite and MongoDB, on
both send paths (the raw-ASGI fast path and Quart's) and in a batch. A refused send
stores nothing; what is accepted is replayed as it was sent."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pymongo
import pytest
import trio

from sidecar.protocol.message import MAX_RESPONSE_DEPTH
from tests.sidecar_harness import Sidecar, running_sidecar, settings_for

ITEM = b'{"connectorId":"web","recipientId":"alice","response":%s}'
VALID = ITEM % b'{"text":"hi"}'


def nested(depth: int) -> bytes:
    """A response of `depth` levels of objects, the response itself the first."""
    return b'{"a":' * depth + b"1" + b"}" * depth


REFUSED: list[tuple[str, bytes, str]] = [
    ("one level too deep", nested(MAX_RESPONSE_DEPTH + 1), "invalid_field"),
    # Accepted before; some hundreds of levels more and every replay of the user's
    # messages ended in a RecursionError (how many depends on the stack).
    ("500 levels", nested(500), "invalid_field"),
    ("arrays too deep", b'{"a":' + b"[" * MAX_RESPONSE_DEPTH + b"]" * MAX_RESPONSE_DEPTH + b"}",
     "invalid_field"),
    ("1e999", b'{"n":1e999}', "invalid_json"),
    ("-1e999", b'{"n":[-1e999]}', "invalid_json"),
    ("integer over int64", b'{"n":9223372036854775808}', "invalid_field"),
    ("integer under int64", b'{"n":-9223372036854775809}', "invalid_field"),
    ("key with NUL", b'{"a":{"x\\u0000":1}}', "invalid_field"),
]  # fmt: skip

# At the limits, each with a message the stream must give back as it was sent.
ACCEPTED: list[tuple[str, bytes]] = [
    ("deepest", nested(MAX_RESPONSE_DEPTH)),
    ("int64 bounds", b'{"max":9223372036854775807,"min":-9223372036854775808}'),
    ("largest double", b'{"n":1.7976931348623157e308,"tiny":5e-324}'),
    ("dollar and dot keys", b'{"$set":{"a.b":1},"x.y":[{"$id":2}]}'),
]


@asynccontextmanager
async def sidecar_on(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Sidecar]:
    # Any object as a response (`SIDECAR_RESPONSE_SCHEMA=any`) on both stores: these rules
    # hold whatever Tock decodes.
    env = {"SIDECAR_RESPONSE_SCHEMA": "any"}
    if kind == "sqlite":
        async with running_sidecar(settings_for(tmp_path, **env)) as sidecar:
            yield sidecar
        return
    uri: str = request.getfixturevalue("mongodb_server")
    db = f"t_rules_{uuid.uuid4().hex[:12]}"
    env |= {"SIDECAR_STORE": uri, "SIDECAR_MONGO_DB": db}
    try:
        async with running_sidecar(settings_for(tmp_path, **env)) as sidecar:
            yield sidecar
    finally:

        def drop() -> None:
            with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
                client.drop_database(db)

        await trio.to_thread.run_sync(drop)


async def _chunked(body: bytes) -> AsyncIterator[bytes]:
    yield body  # no Content-Length: Quart serves it, not the fast path


async def post(sidecar: Sidecar, body: bytes, way: str) -> tuple[int, Any]:
    path = "/v1/send/batch" if way == "batch" else "/v1/send"
    if way == "batch":
        body = b"[" + VALID + b"," + body + b"]"  # the valid item is not stored either
    reply = await sidecar.client.post(
        f"{sidecar.send_url}{path}",
        content=_chunked(body) if way == "quart" else body,
        headers={"Content-Type": "application/json"},
    )
    return reply.status_code, reply.json()


WAYS = ("fast path", "quart", "batch")


@pytest.mark.time_limit(60)
@pytest.mark.parametrize("kind", ["sqlite", "mongo"])
async def test_refused_everywhere_and_nothing_stored(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    async with sidecar_on(kind, request, tmp_path) as sidecar:
        answers = {}
        for name, response, _ in REFUSED:
            for way in WAYS:
                status, body = await post(sidecar, ITEM % response, way)
                answers[name, way] = (status, body["error"]["code"])
        assert answers == {(name, way): (400, code) for name, _, code in REFUSED for way in WAYS}
        # Nothing was stored: a stream opened now replays none of it.
        async with sidecar.stream("alice") as alice:
            sentinel = await sidecar.send("alice", sentinel=True)
            assert (await alice.next_message()).id == sentinel


@pytest.mark.time_limit(60)
@pytest.mark.parametrize("kind", ["sqlite", "mongo"])
async def test_accepted_at_the_limits_and_replayed_as_sent(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    async with sidecar_on(kind, request, tmp_path) as sidecar:
        sent = {}
        for name, response in ACCEPTED:
            for way in ("fast path", "quart"):
                status, body = await post(sidecar, ITEM % response, way)
                assert status == 202, (name, way, body)
                sent[body["id"]] = json.loads(response)
        last = await sidecar.send("alice", last=True)
        # The replay of them all, in order, then a message after them: none blocks it.
        async with sidecar.stream("alice") as alice:
            replayed = {}
            while (event := await alice.next_message()).id != last:
                assert event.id is not None
                replayed[event.id] = json.loads(event.data)
        assert replayed == sent
