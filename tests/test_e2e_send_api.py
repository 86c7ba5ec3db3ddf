"""The bot-facing send API end to end: what it accepts, what it refuses, and that a refused
request stores and delivers nothing."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.protocol.delivery import Replay
from sidecar.protocol.message import State, idempotent_id, is_idempotency_key
from tests.sidecar_harness import (
    BrokenSqliteConnection,
    Sidecar,
    SseClient,
    logged_ids,
    running_sidecar,
    settings_for,
)

ID_RE = re.compile(r"[0-9a-f]{24}")
VALID = {"connectorId": "web", "recipientId": "alice", "response": {"responses": [{"text": "hi"}]}}


def item(**changes: Any) -> dict[str, Any]:
    """A valid send request with some fields replaced; a value of `...` drops the field."""
    body = VALID | changes
    return {k: v for k, v in body.items() if v is not ...}


def assert_error(reply: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    body = reply.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "requestId"}, error
    assert error["requestId"] == reply.headers["x-request-id"]
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


async def post(
    sidecar: Sidecar,
    content: bytes,
    content_type: str | None = "application/json",
    path: str = "/v1/send",
    **headers: str,
) -> httpx.Response:
    if content_type is not None:
        headers["Content-Type"] = content_type
    return await sidecar.client.post(f"{sidecar.send_url}{path}", content=content, headers=headers)


async def stored(sidecar: Sidecar, recipient: str = "alice", connector: str = "web") -> list[str]:
    return await logged_ids(sidecar.running.store, recipient, connector, Replay(sent=True))


async def assert_nothing_delivered(sidecar: Sidecar, client: SseClient) -> None:
    """Nothing reached alice's store or her open stream: the next message she gets is a
    fresh one sent now."""
    assert await stored(sidecar) == []
    sentinel = await sidecar.send("alice", sentinel=True)
    assert (await client.next_message()).id == sentinel
    assert await stored(sidecar) == [sentinel]


# --- the happy path ----------------------------------------------------------------------


async def test_send_with_no_stream_is_stored_enqueued(sidecar: Sidecar) -> None:
    reply = await sidecar.client.post(f"{sidecar.send_url}/v1/send", json=VALID)
    assert reply.status_code == 202, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {"id", "deliveredTo"}
    assert ID_RE.fullmatch(body["id"])
    assert body["deliveredTo"] == 0
    message = await sidecar.running.store.get(body["id"])
    assert message is not None
    assert message.state == State.ENQUEUED
    assert (message.connector_id, message.recipient_id) == ("web", "alice")
    assert message.response == VALID["response"]


async def test_delivered_to_counts_open_streams_of_the_recipient(sidecar: Sidecar) -> None:
    async def send() -> dict[str, Any]:
        reply = await sidecar.client.post(f"{sidecar.send_url}/v1/send", json=VALID)
        assert reply.status_code == 202, reply.text
        body: dict[str, Any] = reply.json()
        return body

    async with sidecar.stream("alice") as one, sidecar.stream("bob"):
        first = await send()
        assert first["deliveredTo"] == 1
        assert (await one.next_message()).id == first["id"]
        async with sidecar.stream("alice") as two:
            second = await send()
            assert second["deliveredTo"] == 2
            assert (await one.next_message()).id == second["id"]
            assert (await two.next_message()).id == second["id"]
    for message_id in (first["id"], second["id"]):
        assert (await sidecar.running.store.get(message_id)) is not None


async def test_charset_parameter_and_longest_recipient_accepted(sidecar: Sidecar) -> None:
    longest = "r" * 512
    reply = await post(
        sidecar, json.dumps(item(recipientId=longest)).encode(), "application/json; charset=utf-8"
    )
    assert reply.status_code == 202, reply.text
    assert await stored(sidecar, longest) == [reply.json()["id"]]


# --- bad input: status, JSON error, nothing stored or delivered ----------------------------

_NAN = b'{"connectorId":"web","recipientId":"alice","response":{"x":%s}}'

BAD_REQUESTS: list[tuple[str, bytes, str | None, int, str]] = [
    ("not-json", b"{not json", "application/json", 400, "invalid_json"),
    ("empty-body", b"", "application/json", 400, "invalid_json"),
    ("invalid-utf8", b'{"connectorId":"\xff"}', "application/json", 400, "invalid_json"),
    ("deeply-nested", b"[" * 60000, "application/json", 400, "invalid_json"),
    ("nan", _NAN % b"NaN", "application/json", 400, "invalid_json"),
    ("infinity", _NAN % b"Infinity", "application/json", 400, "invalid_json"),
    ("minus-infinity", _NAN % b"-Infinity", "application/json", 400, "invalid_json"),
    ("array", json.dumps([VALID]).encode(), "application/json", 400, "invalid_request"),
    ("string", b'"hello"', "application/json", 400, "invalid_request"),
    ("null", b"null", "application/json", 400, "invalid_request"),
    ("text-plain", json.dumps(VALID).encode(), "text/plain", 415, "unsupported_media_type"),
    ("no-content-type", json.dumps(VALID).encode(), None, 415, "unsupported_media_type"),
    (
        "form",
        b"connectorId=web",
        "application/x-www-form-urlencoded",
        415,
        "unsupported_media_type",
    ),
]
BAD_ITEMS: list[tuple[str, dict[str, Any], int, str]] = [
    ("missing-connectorId", item(connectorId=...), 400, "missing_field"),
    ("missing-recipientId", item(recipientId=...), 400, "missing_field"),
    ("missing-response", item(response=...), 400, "missing_field"),
    ("empty-object", {}, 400, "missing_field"),
    ("unknown-field", item(priority=1), 400, "unknown_field"),
    ("connectorId-int", item(connectorId=1), 400, "invalid_field"),
    ("connectorId-null", item(connectorId=None), 400, "invalid_field"),
    ("recipientId-empty", item(recipientId=""), 400, "invalid_field"),
    ("recipientId-int", item(recipientId=7), 400, "invalid_field"),
    ("recipientId-list", item(recipientId=["alice"]), 400, "invalid_field"),
    ("recipientId-too-long", item(recipientId="a" * 513), 400, "invalid_field"),
    ("response-string", item(response="hi"), 400, "invalid_field"),
    ("response-list", item(response=[{"text": "hi"}]), 400, "invalid_field"),
    ("response-null", item(response=None), 400, "invalid_field"),
    ("unknown-connector", item(connectorId="nope"), 404, "unknown_connector"),
    ("lone-surrogate-response", item(response={"text": "\ud800"}), 400, "invalid_field"),
]


@pytest.fixture
async def alice(sidecar: Sidecar) -> AsyncIterator[SseClient]:
    async with sidecar.stream("alice") as client:
        yield client


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_request_is_refused_and_changes_nothing(
    sidecar: Sidecar,
    alice: SseClient,
    content: bytes,
    content_type: str | None,
    status: int,
    code: str,
) -> None:
    assert_error(await post(sidecar, content, content_type), status, code)
    await assert_nothing_delivered(sidecar, alice)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [case[1:] for case in BAD_ITEMS],
    ids=[case[0] for case in BAD_ITEMS],
)
async def test_bad_item_is_refused_and_changes_nothing(
    sidecar: Sidecar, alice: SseClient, body: dict[str, Any], status: int, code: str
) -> None:
    error = assert_error(await post(sidecar, json.dumps(body).encode()), status, code)
    if code == "missing_field":
        for name in sorted(VALID.keys() - body.keys()):
            assert name in error["message"]
    if code == "unknown_field":
        assert "priority" in error["message"]
    if isinstance(body.get("recipientId"), str) and body["recipientId"]:
        assert await stored(sidecar, body["recipientId"]) == []
    await assert_nothing_delivered(sidecar, alice)


def _body_of_size(size: int) -> bytes:
    """A valid send request whose JSON encoding is exactly `size` bytes."""
    empty = json.dumps(item(response={"text": ""}), separators=(",", ":")).encode()
    body = json.dumps(
        item(response={"text": "x" * (size - len(empty))}), separators=(",", ":")
    ).encode()
    assert len(body) == size
    return body


async def test_body_over_the_default_limit_is_413(sidecar: Sidecar, alice: SseClient) -> None:
    assert sidecar.running.settings.max_payload_bytes == 64 * 1024
    assert_error(await post(sidecar, _body_of_size(64 * 1024 + 1)), 413)

    async def post_chunked(path: str, size: int) -> httpx.Response:
        # No Content-Length: the limit holds on the bytes actually read too.
        body = _body_of_size(size)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, size, 4096):
                yield body[start : start + 4096]

        reply = await sidecar.client.post(
            f"{sidecar.send_url}{path}",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        assert "content-length" not in reply.request.headers
        return reply

    assert_error(await post_chunked("/v1/send", 64 * 1024 + 1), 413, "payload_too_large")
    # Past the batch limit too, where Quart stops reading the body itself.
    over_both = sidecar.running.settings.max_batch_bytes + 1
    for path in ("/v1/send", "/v1/send/batch"):
        assert_error(await post_chunked(path, over_both), 413, "payload_too_large")
    await assert_nothing_delivered(sidecar, alice)
    # Exactly at the limit is fine.
    assert (await post(sidecar, _body_of_size(64 * 1024))).status_code == 202


async def test_body_over_a_configured_limit_is_413(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_MAX_PAYLOAD_BYTES="200")
    async with running_sidecar(settings) as sidecar, sidecar.stream("alice") as client:
        assert_error(await post(sidecar, _body_of_size(201)), 413, "payload_too_large")
        # Also in a batch, where the limit applies to each response.
        big = item(response={"text": "x" * 300})
        reply = await post(sidecar, json.dumps([VALID, big]).encode(), path="/v1/send/batch")
        assert "item 1" in assert_error(reply, 413, "payload_too_large")["message"]
        await assert_nothing_delivered(sidecar, client)
        assert (await post(sidecar, _body_of_size(200))).status_code == 202


async def test_wrong_method_is_405_json(sidecar: Sidecar) -> None:
    for path in ("/v1/send", "/v1/send/batch"):
        reply = await sidecar.client.get(f"{sidecar.send_url}{path}")
        assert_error(reply, 405)
        assert "POST" in reply.headers["allow"]


async def test_unknown_path_is_404_json(sidecar: Sidecar) -> None:
    assert_error(await sidecar.client.get(f"{sidecar.send_url}/nope"), 404)
    assert_error(await post(sidecar, json.dumps(VALID).encode(), path="/v1/sendx"), 404)
    assert_error(await sidecar.client.get(f"{sidecar.public}/nope"), 404)


# --- batches -------------------------------------------------------------------------------


async def test_batch_results_in_order_and_stream_order(sidecar: Sidecar) -> None:
    batch = [item(response={"n": n}) for n in range(5)] + [item(recipientId="bob")]
    async with sidecar.stream("alice") as client:
        reply = await sidecar.client.post(f"{sidecar.send_url}/v1/send/batch", json=batch)
        assert reply.status_code == 202, reply.text
        results = reply.json()["results"]
        assert [set(r) for r in results] == [{"id", "deliveredTo"}] * 6
        ids = [r["id"] for r in results]
        assert all(ID_RE.fullmatch(i) for i in ids)
        assert ids == sorted(ids)
        assert len(set(ids)) == 6
        assert [r["deliveredTo"] for r in results] == [1] * 5 + [0]
        events = await client.messages(5)
        assert [e.id for e in events] == ids[:5]
        assert [json.loads(e.data)["n"] for e in events] == list(range(5))
    for message_id, sent in zip(ids, batch, strict=True):
        message = await sidecar.running.store.get(message_id)
        assert message is not None
        assert (message.recipient_id, message.response) == (sent["recipientId"], sent["response"])


async def test_empty_batch_is_accepted(sidecar: Sidecar) -> None:
    reply = await sidecar.client.post(f"{sidecar.send_url}/v1/send/batch", json=[])
    assert reply.status_code == 202, reply.text
    assert reply.json() == {"results": []}


@pytest.mark.parametrize(
    ("bad", "status", "code"),
    [
        (item(recipientId=""), 400, "invalid_field"),
        (item(response=...), 400, "missing_field"),
        ("not an object", 400, "invalid_request"),
        (item(connectorId="nope"), 404, "unknown_connector"),
    ],
    ids=["invalid-field", "missing-field", "not-object", "unknown-connector"],
)
async def test_batch_is_all_or_nothing(
    sidecar: Sidecar, alice: SseClient, bad: Any, status: int, code: str
) -> None:
    # Batch positions are counted from 0: the third item is "item 2".
    batch = [item(response={"n": 0}), item(response={"n": 1}), bad, item(response={"n": 3})]
    reply = await post(sidecar, json.dumps(batch).encode(), path="/v1/send/batch")
    assert "item 2" in assert_error(reply, status, code)["message"]
    await assert_nothing_delivered(sidecar, alice)


@pytest.mark.parametrize(
    "payload",
    [b'{"connectorId":"web"}', json.dumps(VALID).encode(), b'"x"', b"null", b"[NaN]", b"[{"],
    ids=["object", "send-request", "string", "null", "nan", "broken"],
)
async def test_batch_that_is_not_an_array_is_400(
    sidecar: Sidecar, alice: SseClient, payload: bytes
) -> None:
    assert_error(await post(sidecar, payload, path="/v1/send/batch"), 400)
    await assert_nothing_delivered(sidecar, alice)


async def test_batch_content_type_must_be_json(sidecar: Sidecar) -> None:
    body = json.dumps([VALID]).encode()
    assert_error(await post(sidecar, body, "text/plain", path="/v1/send/batch"), 415)
    assert_error(await post(sidecar, body, None, path="/v1/send/batch"), 415)
    assert await stored(sidecar) == []


async def test_batch_item_and_byte_limits(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_MAX_BATCH_ITEMS="3", SIDECAR_MAX_BATCH_BYTES="1000")
    async with running_sidecar(settings) as sidecar, sidecar.stream("alice") as client:
        too_many = json.dumps([VALID] * 4).encode()
        assert len(too_many) < 1000
        reply = await post(sidecar, too_many, path="/v1/send/batch")
        assert_error(reply, 413, "too_many_items")
        too_big = json.dumps([item(response={"text": "x" * 1000})]).encode()
        assert_error(await post(sidecar, too_big, path="/v1/send/batch"), 413)
        await assert_nothing_delivered(sidecar, client)
        reply = await post(sidecar, json.dumps([VALID] * 3).encode(), path="/v1/send/batch")
        assert reply.status_code == 202, reply.text
        assert len(reply.json()["results"]) == 3


async def test_batch_over_the_default_byte_limit_is_413(sidecar: Sidecar) -> None:
    limit = sidecar.running.settings.max_batch_bytes
    assert limit == 1024 * 1024
    chunk = item(response={"text": "x" * 60000})
    batch = json.dumps([chunk] * (limit // 60000 + 1)).encode()
    assert len(batch) > limit
    assert_error(await post(sidecar, batch, path="/v1/send/batch"), 413)
    assert await stored(sidecar) == []


# --- bearer token --------------------------------------------------------------------------

TOKEN = "s3cret-t0ken"


async def test_bearer_token_guards_the_send_api(tmp_path: Path) -> None:
    async with running_sidecar(settings_for(tmp_path, SIDECAR_SEND_TOKEN=TOKEN)) as sidecar:
        body = json.dumps(VALID).encode()
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": TOKEN},
            {"Authorization": "Bearer"},
        ):
            assert_error(await post(sidecar, body, **headers), 401, "unauthorized")
            reply = await post(
                sidecar, json.dumps([VALID]).encode(), path="/v1/send/batch", **headers
            )
            assert_error(reply, 401, "unauthorized")
        assert await stored(sidecar) == []

        reply = await post(sidecar, body, Authorization=f"Bearer {TOKEN}")
        assert reply.status_code == 202, reply.text
        reply = await post(sidecar, body, Authorization=f"bearer {TOKEN}")
        assert reply.status_code == 202, reply.text
        reply = await post(
            sidecar,
            json.dumps([VALID]).encode(),
            path="/v1/send/batch",
            Authorization=f"Bearer {TOKEN}",
        )
        assert reply.status_code == 202, reply.text
        assert len(await stored(sidecar)) == 3

        for path in ("/healthz", "/readyz"):
            reply = await sidecar.client.get(f"{sidecar.send_url}{path}")
            assert reply.status_code == 200, reply.text
            assert reply.json()["status"] == "ok"


# --- health --------------------------------------------------------------------------------


async def test_health_on_both_listeners(sidecar: Sidecar) -> None:
    for base in (sidecar.public, sidecar.send_url):
        for path in ("/healthz", "/readyz"):
            reply = await sidecar.client.get(f"{base}{path}")
            assert reply.status_code == 200, reply.text
            assert reply.headers["content-type"].startswith("application/json")
            # What the store says of itself only on the (private) send listener.
            store = (
                {"store": {"kind": "sqlite"}}
                if (path, base) == ("/readyz", sidecar.send_url)
                else {}
            )
            assert reply.json() == {"status": "ok"} | store


async def test_readyz_is_503_while_the_store_is_unavailable(sidecar: Sidecar) -> None:
    store: Any = sidecar.running.store
    real = store._db
    store._db = BrokenSqliteConnection()
    try:
        for base in (sidecar.public, sidecar.send_url):
            reply = await sidecar.client.get(f"{base}/readyz")
            assert reply.status_code == 503, reply.text
            assert reply.json()["status"] == "unavailable"
            # Why (host names, ports, paths) only on the send listener.
            assert ("store" in reply.json()) == (base == sidecar.send_url)
            assert (await sidecar.client.get(f"{base}/healthz")).status_code == 200
        # A send that cannot be stored is refused as retryable, not accepted.
        reply = await post(sidecar, json.dumps(VALID).encode())
        assert_error(reply, 503, "store_unavailable")
        assert reply.headers["retry-after"] == "1"
    finally:
        store._db = real
    for base in (sidecar.public, sidecar.send_url):
        assert (await sidecar.client.get(f"{base}/readyz")).status_code == 200
    assert await stored(sidecar) == []


async def test_recipient_with_control_characters_is_400(sidecar: Sidecar) -> None:
    # No browser can connect as such a user (the stream refuses the id).
    for recipient in ("a\nb", "\x00", "a\x9b"):
        body = json.dumps(item(recipientId=recipient)).encode()
        assert_error(await post(sidecar, body), 400, "invalid_field")
    assert await stored(sidecar) == []


async def test_lone_surrogate_recipient_is_400(sidecar: Sidecar) -> None:
    # json.loads accepts "\udfff"; no store can hold it, so it is refused up front.
    reply = await sidecar.client.post(
        f"{sidecar.send_url}/v1/send",
        content=b'{"connectorId":"web","recipientId":"\\udfff","response":{}}',
        headers={"Content-Type": "application/json"},
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_field"


# --- Idempotency-Key ----------------------------------------------------------------------


async def _chunked(body: bytes) -> AsyncIterator[bytes]:
    yield body  # no Content-Length: Quart serves it, not the fast path


def _body(payload: Any, route: str) -> Any:
    body = json.dumps(payload).encode()
    return body if route == "fast path" else _chunked(body)


@pytest.mark.parametrize("route", ["fast path", "quart"])
async def test_a_retry_with_its_idempotency_key_stores_nothing_new(
    sidecar: Sidecar, route: str
) -> None:
    headers = {"Content-Type": "application/json", "Idempotency-Key": "turn-42"}
    url = f"{sidecar.send_url}/v1/send"
    async with sidecar.stream("alice") as client:
        first = await sidecar.client.post(url, content=_body(VALID, route), headers=headers)
        assert first.status_code == 202, first.text
        again = await sidecar.client.post(url, content=_body(VALID, route), headers=headers)
        assert again.status_code == 202, again.text
        assert again.json()["id"] == first.json()["id"]
        # Shown once: the next message is a fresh one.
        assert (await client.next_message()).id == first.json()["id"]
        fresh = await sidecar.send("alice", fresh=True)
        assert (await client.next_message()).id == fresh
    assert await stored(sidecar) == [first.json()["id"], fresh]
    # The same key for another connector or user's message is another message.
    other = {**VALID, "recipientId": "bob"}
    conflict = await sidecar.client.post(url, content=_body(other, route), headers=headers)
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["error"]["code"] == "idempotency_conflict"
    changed = {**VALID, "response": {"responses": [{"text": "other"}]}}
    conflict = await sidecar.client.post(url, content=_body(changed, route), headers=headers)
    assert conflict.status_code == 409, conflict.text
    assert await stored(sidecar) == [first.json()["id"], fresh]
    assert await stored(sidecar, "bob") == []


@pytest.mark.parametrize("route", ["fast path", "quart"])
async def test_a_batch_takes_item_keys_or_the_headers_key_by_index(
    sidecar: Sidecar, route: str
) -> None:
    url = f"{sidecar.send_url}/v1/send/batch"
    items = [
        {**VALID, "response": {"n": 0}},
        {**VALID, "response": {"n": 1}, "idempotencyKey": "own"},
        {**VALID, "response": {"n": 2}},
    ]
    headers = {"Content-Type": "application/json", "Idempotency-Key": "batch-7"}
    first = await sidecar.client.post(url, content=_body(items, route), headers=headers)
    assert first.status_code == 202, first.text
    ids = [r["id"] for r in first.json()["results"]]
    assert len(set(ids)) == 3
    # Retried, and item 0 alone with the key it stood for: the same ids, nothing new.
    again = await sidecar.client.post(url, content=_body(items, route), headers=headers)
    assert [r["id"] for r in again.json()["results"]] == ids
    alone = await sidecar.client.post(
        f"{sidecar.send_url}/v1/send",
        content=_body(items[0], route),
        headers={**headers, "Idempotency-Key": "batch-7#0"},
    )
    assert alone.json()["id"] == ids[0]
    assert await stored(sidecar) == ids
    # A conflict anywhere refuses the whole batch before anything is stored.
    changed = [{**VALID, "response": {"n": 9}}, items[1] | {"response": {"n": 8}}]
    refused = await sidecar.client.post(url, content=_body(changed, route), headers=headers)
    assert refused.status_code == 409, refused.text
    assert await stored(sidecar) == ids


@pytest.mark.parametrize(
    ("headers", "payload", "code"),
    [
        ({"Idempotency-Key": ""}, VALID, "invalid_idempotency_key"),
        ({"Idempotency-Key": "has space"}, VALID, "invalid_idempotency_key"),
        ({"Idempotency-Key": "k" * 201}, VALID, "invalid_idempotency_key"),
        ({}, {**VALID, "idempotencyKey": 7}, "invalid_field"),
        ({}, {**VALID, "idempotencyKey": "é"}, "invalid_field"),
        ({"Idempotency-Key": "a"}, {**VALID, "idempotencyKey": "b"}, "invalid_field"),
    ],
    ids=["empty", "space", "too-long", "not-a-string", "not-ascii", "two-keys"],
)
async def test_a_bad_idempotency_key_is_400_and_changes_nothing(
    sidecar: Sidecar, headers: dict[str, str], payload: dict[str, Any], code: str
) -> None:
    reply = await sidecar.client.post(f"{sidecar.send_url}/v1/send", json=payload, headers=headers)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == code
    assert await stored(sidecar) == []


def test_the_longest_key_is_taken_and_ids_are_per_connector() -> None:
    assert is_idempotency_key("k" * 200)
    assert ID_RE.fullmatch(idempotent_id("web", "k"))
    assert idempotent_id("web", "k") != idempotent_id("other", "k")
    assert idempotent_id("web", "a#1") == idempotent_id("web", "a#1")
