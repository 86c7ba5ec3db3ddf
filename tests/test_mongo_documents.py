"""`sidecar/store/documents.py`: the rules for Tock's documents, without a server; then the
same id order and cursors held by a real MongoDB store, over mixed id types (hypothesis)."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pymongo
import pytest
import trio
from bson import ObjectId
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.app import store_options
from sidecar.config import Settings
from sidecar.protocol.delivery import Position, Replay
from sidecar.protocol.message import Message, State
from sidecar.store import documents
from sidecar.store.mongo import MongoStore, _Adoption
from tests.tock_documents import decodable_by, fixtures

HEX = "6b11178943b0e1b7d5b69d09"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (HEX, HEX),
        (ObjectId(HEX), HEX),
        (HEX.upper(), None),  # Tock decodes it, but nobody writes it: not a message
        ("not-an-id", None),
        (HEX + "0", None),
        (12, None),
        (None, None),
    ],
)
def test_message_id_of_each_id_form(raw: object, expected: str | None) -> None:
    assert documents.message_id(raw) == expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0, State.ENQUEUED),
        (Int64(0), State.ENQUEUED),
        ("0", State.ENQUEUED),
        ("ENQUEUED", State.ENQUEUED),
        (1, State.SENT),
        (Int64(1), State.SENT),
        ("1", State.SENT),
        ("PROCESSED", State.SENT),
        (1.0, State.SENT),
        (Decimal128(Decimal(1)), State.SENT),
        (2, State.DELIVERED),  # earlier sidecars
        ("2", None),
        (None, None),
        (True, None),
        (3, None),
        (0.5, None),
    ],
)
def test_status_state_of_each_stored_form(status: object, expected: State | None) -> None:
    assert documents.status_state(status) == expected


def test_a_missing_status_is_enqueued() -> None:
    assert documents.status_state() == State.ENQUEUED
    assert documents.state_of({"_id": HEX}, {}) == State.ENQUEUED


@pytest.mark.parametrize(
    ("status", "recorded", "expected"),
    [
        (0, None, State.ENQUEUED),
        (0, 1, State.SENT),
        (0, 2, State.DELIVERED),
        ("PROCESSED", None, State.SENT),
        ("PROCESSED", 2, State.DELIVERED),
        (1, 1, State.SENT),
        (2, 1, State.DELIVERED),  # never backwards, whichever holds the higher state
    ],
)
def test_state_is_the_higher_of_status_and_delivery_record(
    status: object, recorded: int | None, expected: State
) -> None:
    delivery = {} if recorded is None else {HEX: recorded}
    assert documents.state_of({"_id": ObjectId(HEX), "status": status}, delivery) == expected


def test_the_forms_the_queries_match_are_the_forms_status_state_reads() -> None:
    # Each query form names exactly the values status_state maps to that state.
    for state in State:
        for form in documents.status_forms(state):
            condition = form["status"]
            values = condition.get("$in", []) if isinstance(condition, dict) else [condition]
            for value in values:
                assert documents.status_state(value) == state
            if isinstance(condition, dict) and "$exists" in condition:
                assert documents.status_state() == state


def test_a_new_document_has_tock_26s_fields_order_and_types() -> None:
    tock = next(f for f in fixtures() if f.tock == "26.3.2").document
    at = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
    doc = documents.to_document(Message(HEX, "web", "u", {"responses": []}, enqueued_at=at))
    assert list(doc) == list(tock)
    assert [type(v) for v in doc.values()] == [type(v) for v in tock.values()]
    assert doc["status"] == 0


def test_every_fixture_reads_as_a_message() -> None:
    for fixture in fixtures():
        message = documents.to_message(fixture.document, {})
        assert message.id == fixture.id
        assert message.response == fixture.response
        expected = State.SENT if fixture.document.get("status") == "PROCESSED" else State.ENQUEUED
        assert message.state == expected
        if "enqueuedAt" not in fixture.document:  # Tock 23.9: the id's creation time
            assert message.enqueued_at == fixture.document["_id"].generation_time


def test_the_sent_mark_keeps_a_documents_size_and_tocks_decoding() -> None:
    from tests.tock_documents import encoded_size

    for fixture in fixtures():
        doc = fixture.document
        if type(doc.get("status")) is int and doc["status"] == 0:
            marked = {**doc, **documents.SENT_MARK["$max"]}
            assert encoded_size(marked) == encoded_size(doc)
            assert decodable_by(marked) == decodable_by(doc)


# -- id order and cursors across id types ----------------------------------------------

ids = st.lists(
    st.binary(min_size=12, max_size=12).map(bytes.hex), min_size=0, max_size=30, unique=True
)
kinds = st.lists(st.sampled_from(documents.ID_KINDS), min_size=30, max_size=30)


def _stored(hexes: list[str], types: list[str]) -> list[dict[str, Any]]:
    return [
        {"_id": ObjectId(h) if kind == documents.OBJECT_ID else h}
        for h, kind in zip(hexes, types, strict=False)
    ]


def _find(stored: list[dict[str, Any]], kind: str, after: str | None, limit: int) -> list[Any]:
    """What MongoDB answers `_page`'s query for one id type: that type only, after the
    cursor, sorted, at most `limit`."""
    python_type = ObjectId if kind == documents.OBJECT_ID else str
    found = [d for d in stored if isinstance(d["_id"], python_type)]
    found = [d for d in found if after is None or str(d["_id"]) > after]
    return sorted(found, key=lambda d: d["_id"])[:limit]


@given(hexes=ids, types=kinds, limit=st.integers(1, 7))
def test_pages_merged_by_id_cover_every_id_once_in_order(
    hexes: list[str], types: list[str], limit: int
) -> None:
    stored = _stored(hexes, types)
    got: list[str] = []
    after = None
    for _ in range(len(stored) + 2):
        pages = [_find(stored, kind, after, limit) for kind in documents.ID_KINDS]
        page, more = documents.merge_by_id(pages, limit)
        got += [str(d["_id"]) for d in page]
        if not more:
            break
        after = str(page[-1]["_id"])
    assert got == sorted(hexes)


@pytest.fixture(scope="module")
def shared_db(mongodb_server: str) -> Iterator[str]:
    name = f"ids_{uuid.uuid4().hex[:12]}"
    yield name
    with pymongo.MongoClient(mongodb_server, serverSelectionTimeoutMS=5000) as client:
        client.drop_database(name)


_users = itertools.count()


@pytest.mark.time_limit(120)
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    hexes=ids,
    types=kinds,
    page=st.integers(1, 6),
    sent=st.lists(st.booleans(), min_size=30, max_size=30),
    cut=st.integers(0, 29),
)
async def test_adoption_logs_both_id_types_in_id_order_and_positions_ack_by_seq(
    mongodb_server: str,
    shared_db: str,
    hexes: list[str],
    types: list[str],
    page: int,
    sent: list[bool],
    cut: int,
) -> None:
    """Documents no feed logged (stored before any sidecar ran, or while the oplog was
    lost) are adopted oldest id first, across both id types, a page at a time; a position
    then acknowledges by seq, whatever the states and id types."""
    user = f"u{next(_users)}"
    stored = _stored(hexes, types)
    for doc, is_sent in zip(stored, sent, strict=False):
        doc |= {"appId": "web", "recipientId": user, "webConnectorResponse": {"responses": []}}
        doc["status"] = 1 if is_sent else 0
    store = await MongoStore.open(
        store_options(
            Settings.load({"SIDECAR_STORE": mongodb_server, "SIDECAR_MONGO_DB": shared_db})
        )
    )
    try:
        if stored:
            await trio.to_thread.run_sync(
                lambda: store._collection.insert_many([dict(d) for d in stored])
            )
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("sidecar.store.mongo.ADOPTION_PAGE", page)
            adopted = await trio.to_thread.run_sync(store._adopt, _Adoption(since=None))
        assert adopted == len(stored)
        order = sorted(hexes)
        head = await store.head("web", user)
        if not order:
            assert head is None
            return
        assert head is not None
        log = await store.logged("web", user, Position(head.epoch, 0), through=head.seq, limit=100)
        assert [(m.id, m.seq) for m in log] == [(i, n) for n, i in enumerate(order, 1)]
        was_sent = {str(d["_id"]) for d in stored if d["status"] == 1}
        assert {m.id for m in log if m.state == State.SENT} == was_sent

        through = min(cut, len(order) - 1) + 1
        moved = await store.acknowledge_through("web", user, Position(head.epoch, through))
        assert moved == through
        rest = await store.logged(
            "web", user, Position(head.epoch, 0), through=head.seq, limit=100,
            replay=Replay(sent=True),
        )  # fmt: skip
        assert [m.id for m in rest] == order[through:]
    finally:
        # Hypothesis draws the same ids again in later examples.
        await trio.to_thread.run_sync(lambda: store._collection.delete_many({}))
        await trio.to_thread.run_sync(lambda: store._delivery.delete_many({}))
        await store.aclose()


def test_a_log_record_logs_the_message_stored_when_it_was_made() -> None:
    at = datetime.datetime(2026, 12, 3, 12, 0, 0, 123456, tzinfo=datetime.UTC)
    message = Message("6745a0c1e4b0a1b2c3d4e5f6", "web", "u", {}, enqueued_at=at)
    record = documents.log_record(message, 7, 3, at)
    assert documents.logs(record, message)
    # As BSON stores it: milliseconds, and no time zone from a client without tz_aware.
    stored = {**record, "enq": at.replace(microsecond=123000, tzinfo=None)}
    assert documents.logs(stored, message)
    # The same id (an Idempotency-Key used again) stored later: another message.
    later = dataclasses.replace(message, enqueued_at=at + datetime.timedelta(seconds=1))
    assert not documents.logs(record, later)
    assert documents.logs({k: v for k, v in record.items() if k != "enq"}, later)
