"""The documents Tock really stored in `web_channel_event`, and Tock's decode rules.

`tests/data/tock_documents.jsonl` is a copy of `shared/tock-documents/documents.jsonl`: 14
documents in canonical Extended JSON, exactly as Tock 26.3.2 and 23.9.0 wrote them (read
back field for field, int32 and int64 kept apart). `decode_problems` is the fixture
README's account of what each Tock version's decoder refuses, written from that README
and not from the sidecar's code, so that tests can hold the sidecar to it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import bson
from bson import ObjectId, json_util
from bson.int64 import Int64

FIXTURES = Path(__file__).resolve().parent / "data" / "tock_documents.jsonl"

# Tock 26.3.2 reads each response into a plain class; Tock 24.3 to 25.10 read them as
# 23.9.0 does, into the connector's class, which needs `"type": "WebMessage"`.
VERSIONS = ("26.3.2", "24.3", "23.9.0")
BUTTON_CLASSES = frozenset({"postback_button", "url_button", "quick_reply"})


@dataclasses.dataclass(frozen=True)
class Fixture:
    tock: str  # the Tock version that wrote it
    case: str
    document: dict[str, Any]  # as pymongo decodes it: int32 as int, int64 as Int64
    response: dict[str, Any]  # its webConnectorResponse as JSON, what a browser gets

    @property
    def id(self) -> str:
        return str(self.document["_id"])

    @property
    def recipient(self) -> str:
        return str(self.document["recipientId"])

    def renamed(self, recipient: str, _id: Any = None) -> Fixture:
        """The same document for another recipient (and `_id`), field order kept."""
        doc = {
            k: (recipient if k == "recipientId" else _id if k == "_id" and _id else v)
            for k, v in self.document.items()
        }
        return dataclasses.replace(self, document=doc)


def fixtures() -> list[Fixture]:
    options = json_util.JSONOptions(json_mode=json_util.JSONMode.CANONICAL, tz_aware=True)
    found = []
    for line in FIXTURES.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        document = json_util.loads(json.dumps(entry["document"]), json_options=options)
        response = entry["document"]["webConnectorResponse"]
        found.append(Fixture(entry["tock"], entry["case"], document, response))
    return found


def encoded_size(doc: Mapping[str, Any]) -> int:
    return len(bson.encode(doc))


def _buttons(response: Mapping[str, Any]) -> Iterator[Any]:
    yield from response.get("buttons") or ()
    card = response.get("card")
    if isinstance(card, Mapping):
        yield from card.get("buttons") or ()
    carousel = response.get("carousel")
    if isinstance(carousel, Mapping):
        for c in carousel.get("cards") or ():
            if isinstance(c, Mapping):
                yield from c.get("buttons") or ()


def decode_problems(doc: Mapping[str, Any], version: str) -> list[str]:
    """Why `version`'s decoder would fail on `doc` (empty: it decodes)."""
    problems = []
    if version != "23.9.0":
        # ChannelEvent: `_id` any string or an ObjectId; `status` an enum of ints 0 and 1
        # (Jackson also takes "0" and "1"; missing is its default, ENQUEUED).
        if not isinstance(doc.get("_id"), str | ObjectId):
            problems.append(f"_id {doc.get('_id')!r}")
        if "status" in doc:
            status = doc["status"]
            ints = type(status) in (int, Int64) and status in (0, 1)
            if not (ints or status in ("0", "1")):
                problems.append(f"status {status!r}")
    if not isinstance(doc.get("recipientId"), str):
        problems.append("no recipientId")
    response = doc.get("webConnectorResponse")
    if not isinstance(response, Mapping):
        return [*problems, "no webConnectorResponse"]
    responses = response.get("responses")
    if not isinstance(responses, list):
        return [*problems, "no responses"]
    for i, message in enumerate(responses):
        if not isinstance(message, Mapping):
            problems.append(f"responses[{i}] is not a document")
            continue
        if version != "26.3.2" and message.get("type") != "WebMessage":
            problems.append(f"responses[{i}] has no type WebMessage")
        for button in _buttons(message):
            if not (isinstance(button, Mapping) and button.get("clazz") in BUTTON_CLASSES):
                problems.append(f"responses[{i}]: a button without clazz")
    metadata = response.get("metadata", {})
    if not isinstance(metadata, Mapping):
        problems.append("metadata is not a document")
    else:
        problems += [f"metadata {k!r}" for k, v in metadata.items() if isinstance(v, Mapping)]
    return problems


def decodable_by(doc: Mapping[str, Any]) -> set[str]:
    """The versions of `VERSIONS` whose decoders take `doc`."""
    return {v for v in VERSIONS if not decode_problems(doc, v)}


def tock_text(text: str) -> dict[str, Any]:
    """A text response as Tock's web connector writes it (the send API on MongoDB takes
    only responses Tock decodes)."""
    return {"responses": [{"type": "WebMessage", "text": text, "version": "1"}]}
