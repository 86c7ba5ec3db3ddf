"""Tock's `web_channel_event` documents: what the MongoDB store reads and writes. No I/O.

This module owns the document schema rules; `mongo.py` only sends the filters and updates
built here. What Tock writes and decodes is described, with documents Tock really stored,
in `tests/data/tock_documents.jsonl` (from the fixtures of Tock 26.3.2 and 23.9.0).

Ids. `_id` is a string of 24 lowercase hex characters (Tock 24.3 and later, and this
sidecar) or an ObjectId (Tock 23.9, assigned by the server, and earlier sidecars), both in
one collection. A message's id is that hex text either way (`message_id`). MongoDB compares
values of one BSON type only and sorts every string before every ObjectId, so every query
on a range of ids is made once per id type (`ID_KINDS`, `id_filter`) and the results
are merged by the hex text (`merge_by_id`): a user sees one order, the ids' own. Any other
`_id` (another string, uppercase hex, a number) is not a message the sidecar delivers.

Status. Tock's decoder takes int32 0 (ENQUEUED) and 1 (PROCESSED), `"0"` and `"1"`, and a
missing field (ENQUEUED, as Tock 23.9 writes no `status`); Tock's own mark after it
delivered a document on a stream it holds is the string `"PROCESSED"`, and its replay
query asks for `"ENQUEUED"`. All of them are read (`status_state`); earlier sidecars also
wrote int32 2 (DELIVERED), read as such. The sidecar only ever writes int32 0 (its inserts)
and int32 1 (`SENT_MARK`), on a document whose `status` is int32 0: the same BSON size, so
a capped collection takes the update and Tock still decodes the document.

The log and the delivery state. Each user's log (docs/delivery.md) and what Tock's
`status` cannot hold live in a collection of the sidecar's own, `DELIVERY`: one record per
logged message, `{_id: <message id>, appId, recipientId, epoch, seq, state, at}`, made by
the first feed that sees the message's insert (`log_record`, `place_after`; with `enq`,
the message's `enqueuedAt`, see `logs`), under a
unique index on `(appId, recipientId, seq)`. The browser's acknowledgement (DELIVERED)
cannot live in `status`, and SENT cannot be written into a document whose `status` is not
int32 0 without changing its size or writing a value Tock cannot decode: both live in the
record, and a message's state is the higher of the two (`state_of`). Documents the sidecar
did not insert are never changed in any other way.

The feed's checkpoint is the one document per set of connectors in `FEED`
(`{_id: feed_key(...), at: <cluster time>}`), moved forward only (`$max`).
"""

from __future__ import annotations

import dataclasses
import datetime
import heapq
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final

from bson import ObjectId
from bson.decimal128 import Decimal128

from sidecar.protocol.message import Message, State

Document = dict[str, Any]

COLLECTION: Final = "web_channel_event"
DELIVERY: Final = "sidecar_delivery"
FEED: Final = "sidecar_feed"

_HEX = re.compile(r"[0-9a-f]{24}")
# What a string `_id` must look like to be a message (a regular expression MongoDB runs).
_HEX_PATTERN = "^[0-9a-f]{24}$"

# The two BSON types a message id is stored as, by their MongoDB `$type` alias.
STRING, OBJECT_ID = "string", "objectId"
ID_KINDS: Final = (STRING, OBJECT_ID)

_MISSING = object()

# Every stored form of each state, as MongoDB filters on `status`. A number matches
# whatever its BSON numeric type ({$in: [0]} finds int32, int64 and double 0 alike).
_STATUS_FORMS: Final[Mapping[State, tuple[Document, ...]]] = {
    State.ENQUEUED: ({"status": {"$in": [0, "0", "ENQUEUED"]}}, {"status": {"$exists": False}}),
    State.SENT: ({"status": {"$in": [1, "1", "PROCESSED"]}},),
    State.DELIVERED: ({"status": 2},),  # by earlier versions of the sidecar only
}
_STATUS_STRINGS: Final = {
    "0": State.ENQUEUED,
    "ENQUEUED": State.ENQUEUED,
    "1": State.SENT,
    "PROCESSED": State.SENT,
}

# The SENT mark made in a document whose `status` was read as int32 0: int32 1 (a Python
# int that fits in 32 bits is encoded as int32), so the document keeps its size. `$max`
# leaves a `status` that moved on meanwhile as it is: int32 1, or Tock's "PROCESSED" (in
# BSON's order every string is above every number).
SENT_MARK: Final[Document] = {"$max": {"status": int(State.SENT)}}


def message_id(raw: object) -> str | None:
    """The message id of a stored `_id`; None when the document is not a message."""
    if isinstance(raw, ObjectId):
        return str(raw)
    if isinstance(raw, str) and _HEX.fullmatch(raw):
        return raw
    return None


def id_values(ids: Iterable[str]) -> list[Any]:
    """Every stored `_id` these message ids may have (for `{_id: {$in: ...}}`)."""
    values: list[Any] = []
    for i in ids:
        if _HEX.fullmatch(i):
            values += (i, ObjectId(i))
    return values


def _typed(kind: str, message_id: str) -> Any:
    return ObjectId(message_id) if kind == OBJECT_ID else message_id


def id_filter(kind: str, *, gt: str | None = None, lte: str | None = None) -> Document:
    """A filter matching the message ids stored as BSON type `kind`, after `gt` and up to
    `lte` when given (MongoDB compares only values of the condition's type)."""
    condition: Document = {"$type": kind}
    if gt is not None:
        condition["$gt"] = _typed(kind, gt)
    if lte is not None:
        condition["$lte"] = _typed(kind, lte)
    if kind != STRING:
        return {"_id": condition}
    # The pattern in a condition of its own: mongo-java-server 1.47 ignores a range given
    # next to `$regex` in one condition.
    return {"$and": [{"_id": condition}, {"_id": {"$regex": _HEX_PATTERN}}]}


def status_forms(*states: State) -> list[Document]:
    """Filters, for `$or`, matching the documents whose `status` is a form of `states`."""
    return [form for state in states for form in _STATUS_FORMS[state]]


def status_state(value: object = _MISSING) -> State | None:
    """The state a stored `status` stands for (no value: the field is missing); None for a
    value no writer uses (the document is then not a message)."""
    if value is _MISSING:
        return State.ENQUEUED
    if isinstance(value, str):
        return _STATUS_STRINGS.get(value)
    if isinstance(value, bool):  # not a number to MongoDB
        return None
    if isinstance(value, Decimal128):
        value = value.to_decimal()
    if isinstance(value, int | float | Decimal) and value in (0, 1, 2):
        return State(int(value))
    return None


def state_of(doc: Mapping[str, Any], delivery: Mapping[str, int]) -> State | None:
    """A stored document's delivery state: the higher of its `status` and its record in
    `delivery` (message id -> state); None when the document is not a message."""
    found = status_state(doc.get("status", _MISSING))
    if found is None:
        return None
    recorded = delivery.get(message_id(doc.get("_id")) or "")
    return max(found, State(recorded)) if recorded in (1, 2) else found


def delivery_states(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """`DELIVERY` records as message id -> state."""
    return {r["_id"]: int(r["state"]) for r in records if isinstance(r.get("state"), int)}


def place_after(head: Mapping[str, Any] | None, new_epoch: int) -> tuple[int, int]:
    """The (epoch, seq) a claim takes after the user's highest record `head`: the next seq
    in its epoch, or seq 1 in `new_epoch` when the user has no record."""
    if head is None:
        return new_epoch, 1
    return int(head["epoch"]), int(head["seq"]) + 1


def log_record(message: Message, epoch: int, seq: int, at: datetime.datetime) -> Document:
    """The `DELIVERY` record that logs `message` at (epoch, seq), made at `at`."""
    return {
        "_id": message.id,
        "appId": message.connector_id,
        "recipientId": message.recipient_id,
        "epoch": epoch,
        "seq": seq,
        "state": int(State.ENQUEUED),
        "at": at,
        "enq": message.enqueued_at,
    }


def logs(record: Mapping[str, Any], message: Message) -> bool:
    """Whether `record` logs this very message, not an earlier one of the same id (an
    Idempotency-Key used again once its first message had gone): the same `enqueuedAt`,
    to BSON's millisecond."""
    enq = record.get("enq")
    if not isinstance(enq, datetime.datetime):
        return True  # a record without it logs whatever has its id
    return abs(_utc(enq) - message.enqueued_at) < datetime.timedelta(milliseconds=1)


def placed(message: Message, record: Mapping[str, Any]) -> Message:
    """`message` at the place its record gives it, in the higher of the two states."""
    state = max(message.state, State(int(record.get("state", 0))))
    return dataclasses.replace(
        message, epoch=int(record["epoch"]), seq=int(record["seq"]), state=state
    )


def feed_key(connector_ids: Iterable[str]) -> str:
    """The `FEED` checkpoint's `_id` for feeds of these connectors."""
    return "feed:" + ",".join(sorted(connector_ids))


def to_document(message: Message) -> Document:
    """The document the sidecar inserts for a new message: Tock 24.3's fields, types and
    order (a string `_id`, `status` int32 0)."""
    return {
        "_id": message.id,
        "appId": message.connector_id,
        "recipientId": message.recipient_id,
        "webConnectorResponse": message.response,
        "status": int(State.ENQUEUED),
        "enqueuedAt": message.enqueued_at,
    }


def to_message(doc: Mapping[str, Any], delivery: Mapping[str, int]) -> Message:
    """A stored document as a Message, in the state `state_of` gives it. ValueError or
    TypeError (also KeyError) when it is not a message a browser can be sent: an `_id` or
    `status` of another form, a `webConnectorResponse` that is not a document or holds a
    value JSON has no form for (binary, a regular expression, NaN...)."""
    mid = message_id(doc.get("_id"))
    if mid is None:
        raise ValueError(f"_id {doc.get('_id')!r} is not a message id")
    state = state_of(doc, delivery)
    if state is None:
        raise ValueError(f"status {doc.get('status')!r} is not one Tock writes")
    response = doc["webConnectorResponse"]
    if not isinstance(response, Mapping):
        raise ValueError("webConnectorResponse is not a document")
    enqueued_at = doc.get("enqueuedAt")
    return Message(
        id=mid,
        connector_id=str(doc["appId"]),
        recipient_id=str(doc["recipientId"]),
        response=jsonable(response),
        state=state,
        # Tock 23.9 writes no enqueuedAt: an id's first four bytes are its creation second.
        enqueued_at=_utc(enqueued_at)
        if isinstance(enqueued_at, datetime.datetime)
        else ObjectId(mid).generation_time,
    )


def merge_by_id(pages: Sequence[Sequence[Document]], limit: int) -> tuple[list[Document], bool]:
    """Merge per-id-type query results, each in id order and cut at `limit`, into the
    first `limit` documents in message id order; and whether more may follow them."""
    merged = list(heapq.merge(*pages, key=lambda d: str(d["_id"])))
    more = len(merged) > limit or any(len(page) == limit for page in pages)
    return merged[:limit], more


def _utc(value: datetime.datetime) -> datetime.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value.astimezone(datetime.UTC)


def jsonable(value: Any) -> Any:
    """BSON values as JSON-able Python: ObjectId -> hex, date -> ISO-8601 (UTC, ms).
    TypeError or ValueError for a value JSON has nothing for (binary data, a regular
    expression, code, NaN...): a browser could not parse the message."""
    if isinstance(value, str | bool | None):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, datetime.datetime):
        return _utc(value).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, Decimal128):
        return str(value)
    if isinstance(value, int):
        return int(value)  # Int64 -> int
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not JSON")
        return value
    raise TypeError(f"{type(value).__name__} is not JSON")
