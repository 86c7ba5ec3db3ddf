"""The message record and its ids.

Ids are MongoDB ObjectIds written as 24 lowercase hex characters: 4 bytes of seconds since
the epoch, 5 bytes fixed per process, 3 bytes of counter. Because the hex form has a fixed
length, comparing two ids as strings compares them as ObjectIds.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Any

_ID_RE = re.compile(r"[0-9a-f]{24}")

# MongoDB stores documents nested at most 100 levels deep, the document itself being the
# first ("each object or array adds a level"); a message's response is a field of its
# document, so it may nest one level less.
MAX_DOCUMENT_DEPTH = 100
MAX_RESPONSE_DEPTH = MAX_DOCUMENT_DEPTH - 1
# The integers BSON holds (int64); JSON text holds any, but MongoDB could not store them.
_INT64 = range(-(2**63), 2**63)


class State(IntEnum):
    """Delivery state of a message. Stored as a small integer; it only ever grows."""

    ENQUEUED = 0
    SENT = 1  # written to at least one open stream; Tock calls this PROCESSED
    DELIVERED = 2  # acknowledged by the client


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    id: str
    connector_id: str
    recipient_id: str
    response: dict[str, Any]
    state: State = State.ENQUEUED
    enqueued_at: datetime.datetime = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC)
    )
    # Its place in its user's log (`protocol/delivery.py`); 0 until the store logged it.
    epoch: int = 0
    seq: int = 0

    @property
    def key(self) -> tuple[str, str]:
        """Who the message is for: (connector id, recipient id)."""
        return (self.connector_id, self.recipient_id)


class NotStorable(ValueError):
    """A response some store cannot keep as it is; the message names the rule."""


def check_storable(response: dict[str, Any]) -> None:
    """Raise NotStorable unless every store keeps `response` as it is and gives it back:
    nested at most MAX_RESPONSE_DEPTH levels (objects and arrays, `response` the first),
    its integers within 64 bits, no key with a NUL character (a BSON key ends at NUL).
    The same rule for every store, so a send is accepted or refused whichever holds it.

    Iterative, so a response nested beyond Python's recursion limit is refused as any
    other; keys starting with `$` or holding `.` are kept (MongoDB 5.0 and later stores
    them in an inserted document, and the driver sends them as they are)."""
    pending: list[tuple[dict[str, Any] | list[Any], int]] = [(response, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_RESPONSE_DEPTH:
            raise NotStorable(
                f"nests objects and arrays more than {MAX_RESPONSE_DEPTH} levels deep"
            )
        if isinstance(value, dict):
            if any("\0" in key for key in value):
                raise NotStorable("has a key with a NUL character")
            children: Iterable[Any] = value.values()
        else:
            children = value
        for child in children:
            if isinstance(child, dict | list):
                pending.append((child, depth + 1))
            elif isinstance(child, int) and child not in _INT64:
                raise NotStorable("holds an integer beyond 64 bits")


def is_message_id(value: object) -> bool:
    """True when `value` is a 24-character lowercase hex ObjectId string."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def normalize_id(value: str) -> str | None:
    """Accept an ObjectId in either case; None when it is not one."""
    lowered = value.strip().lower()
    return lowered if is_message_id(lowered) else None


# An Idempotency-Key: 1 to 200 visible ASCII characters.
_IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,200}")


def is_idempotency_key(value: object) -> bool:
    return isinstance(value, str) and _IDEMPOTENCY_KEY_RE.fullmatch(value) is not None


def idempotent_id(connector_id: str, key: str) -> str:
    """The id of the message sent to `connector_id` with Idempotency-Key `key`: the first
    12 bytes of a SHA-256 of both, so every instance gives a retry the same id."""
    digest = hashlib.sha256(f"{connector_id}\0{key}".encode()).digest()
    return digest[:12].hex()


class IdGenerator:
    """Makes ObjectIds that strictly increase for the life of the process.

    Unlike a plain ObjectId counter, which starts at a random value and wraps, this one
    never goes backwards: within one second the counter grows; if it would overflow or the
    clock steps back, the time part is carried forward instead.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._process = os.urandom(5).hex()
        self._lock = threading.Lock()
        self._seconds = 0
        self._counter = 0

    def __call__(self) -> str:
        with self._lock:
            now = int(self._clock())
            if now > self._seconds:
                self._seconds, self._counter = now, 0
            else:
                self._counter += 1
                if self._counter > 0xFFFFFF:
                    self._seconds, self._counter = self._seconds + 1, 0
            return f"{self._seconds:08x}{self._process}{self._counter:06x}"


new_id = IdGenerator()
