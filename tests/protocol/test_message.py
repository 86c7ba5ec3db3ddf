"""Message ids: strictly increasing ObjectIds, parsing and the time part; what a response
must be for every store to keep it."""

from __future__ import annotations

import datetime
import itertools
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sidecar.protocol.message import (
    MAX_RESPONSE_DEPTH,
    IdGenerator,
    Message,
    NotStorable,
    State,
    check_storable,
    is_message_id,
    new_id,
    normalize_id,
)

HEX24 = re.compile(r"[0-9a-f]{24}")


def clock_from(times: list[float]) -> Callable[[], float]:
    it: Iterator[float] = iter(times)
    return lambda: next(it)


def parts(message_id: str) -> tuple[int, str, int]:
    return int(message_id[:8], 16), message_id[8:18], int(message_id[18:], 16)


def test_strictly_increasing_within_one_second() -> None:
    gen = IdGenerator(clock=lambda: 1_700_000_000.75)
    ids = [gen() for _ in range(5000)]
    assert all(HEX24.fullmatch(i) for i in ids)
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert [parts(i)[0] for i in ids] == [1_700_000_000] * 5000
    assert [parts(i)[2] for i in ids] == list(range(5000))
    assert len({parts(i)[1] for i in ids}) == 1


def test_new_second_resets_counter() -> None:
    gen = IdGenerator(clock=clock_from([100, 100, 100, 101, 105.9]))
    assert [parts(gen())[::2] for _ in range(5)] == [
        (100, 0),
        (100, 1),
        (100, 2),
        (101, 0),
        (105, 0),
    ]


def test_clock_stepping_back_keeps_ids_increasing() -> None:
    times = [2000, 2000, 1990, 1990, 1500, 2000, 2001, 1000]
    gen = IdGenerator(clock=clock_from(times))
    ids = [gen() for _ in times]
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert [parts(i)[::2] for i in ids] == [
        (2000, 0),
        (2000, 1),
        (2000, 2),
        (2000, 3),
        (2000, 4),
        (2000, 5),
        (2001, 0),
        (2001, 1),
    ]


def test_counter_overflow_carries_into_time() -> None:
    now = [3000.0]
    gen = IdGenerator(clock=lambda: now[0])
    first = gen()
    assert parts(first)[::2] == (3000, 0)
    gen._counter = 0xFFFFFE  # as if 16M ids had been made this second
    ids = [first, gen(), gen(), gen()]
    assert [parts(i)[::2] for i in ids[1:]] == [(3000, 0xFFFFFF), (3001, 0), (3001, 1)]
    # The clock catching up to the carried second continues the counter...
    now[0] = 3001.2
    ids.append(gen())
    assert parts(ids[-1])[::2] == (3001, 2)
    # ...and passing it starts a fresh second.
    now[0] = 3002.0
    ids.append(gen())
    assert parts(ids[-1])[::2] == (3002, 0)
    assert all(HEX24.fullmatch(i) for i in ids)
    assert all(a < b for a, b in itertools.pairwise(ids))


def test_generators_differ_in_process_part() -> None:
    a, b = IdGenerator(clock=lambda: 5.0), IdGenerator(clock=lambda: 5.0)
    assert parts(a())[1] != parts(b())[1]


def test_default_generator_uses_wall_clock() -> None:
    before = int(datetime.datetime.now(datetime.UTC).timestamp())
    first, second = new_id(), new_id()
    after = int(datetime.datetime.now(datetime.UTC).timestamp())
    assert is_message_id(first)
    assert first < second
    assert before <= int(first[:8], 16) <= after + 1


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("65a1b2c3d4e5f60718293a4b", True),
        ("000000000000000000000000", True),
        ("ffffffffffffffffffffffff", True),
        ("65A1B2C3D4E5F60718293A4B", False),
        ("65a1b2c3d4e5f60718293a4", False),
        ("65a1b2c3d4e5f60718293a4bc", False),
        ("65a1b2c3d4e5f60718293a4g", False),
        (" 65a1b2c3d4e5f60718293a4b", False),
        ("65a1b2c3d4e5f60718293a4b\n", False),
        ("65a1b2c3-4e5f60718293a4b", False),
        ("\uff10" * 24, False),  # fullwidth zeros
        ("", False),
        (None, False),
        (123, False),
        (b"65a1b2c3d4e5f60718293a4b", False),
    ],
)
def test_is_message_id(value: object, valid: bool) -> None:
    assert is_message_id(value) is valid


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        ("65a1b2c3d4e5f60718293a4b", "65a1b2c3d4e5f60718293a4b"),
        ("65A1B2C3D4E5F60718293A4B", "65a1b2c3d4e5f60718293a4b"),
        ("  65A1b2c3d4e5f60718293a4b\t", "65a1b2c3d4e5f60718293a4b"),
        ("65a1b2c3d4e5f60718293a4", None),
        ("65a1b2c3d4e5f60718293a4b0", None),
        ("65a1b2c3d4e5f60718293a4z", None),
        ("zz", None),
        ("", None),
        ("\uff16\uff15a1b2c3d4e5f60718293a4b", None),  # fullwidth digits
        ("65a1b2c3 d4e5f60718293a4b", None),
    ],
)
def test_normalize_id(value: str, normalized: str | None) -> None:
    assert normalize_id(value) == normalized


def test_ids_carry_the_clocks_seconds() -> None:
    gen = IdGenerator(clock=clock_from([999, 1000, 1000, 1001]))
    ids = [gen() for _ in range(4)]
    assert [int(i[:8], 16) for i in ids] == [999, 1000, 1000, 1001]
    assert ids == sorted(set(ids))


def test_message_defaults() -> None:
    message = Message("65a1b2c3d4e5f60718293a4b", "web", "user", {"text": "hi"})
    assert message.state == State.ENQUEUED
    assert message.key == ("web", "user")
    assert message.enqueued_at.tzinfo is not None


def nested(depth: int, innermost: Any = 1, *, arrays: bool = False) -> dict[str, Any]:
    """A response of `depth` levels: objects (or arrays inside the outer object), the
    response itself the first. Built without recursion."""
    value = innermost
    for _ in range(depth - 1):
        value = [value] if arrays else {"a": value}
    return {"a": value}


STORABLE = [
    ("flat", {"text": "hi", "n": 1.5, "ok": True, "none": None}),
    ("deepest objects", nested(MAX_RESPONSE_DEPTH)),
    ("deepest arrays", nested(MAX_RESPONSE_DEPTH, arrays=True)),
    ("empty innermost", nested(MAX_RESPONSE_DEPTH - 1, {})),
    ("int64 bounds", {"max": 2**63 - 1, "min": -(2**63), "list": [2**63 - 1]}),
    ("dollar and dot keys", {"$set": {"a.b": 1, "$ref": "x"}, "x.y": [{"$id": 2}]}),
]
NOT_STORABLE = [
    ("objects too deep", nested(MAX_RESPONSE_DEPTH + 1), "more than 99 levels deep"),
    ("arrays too deep", nested(MAX_RESPONSE_DEPTH + 1, arrays=True), "more than 99 levels"),
    ("empty innermost too deep", nested(MAX_RESPONSE_DEPTH, {}), "more than 99 levels"),
    ("past the recursion limit", nested(100_000), "more than 99 levels"),
    ("int over int64", {"n": 2**63}, "integer beyond 64 bits"),
    ("int under int64", {"a": [-(2**63) - 1]}, "integer beyond 64 bits"),
    ("NUL key", {"a": {"x\0y": 1}}, "key with a NUL"),
    ("top-level NUL key", {"\0": 1}, "key with a NUL"),
]


@pytest.mark.parametrize("response", [row[1] for row in STORABLE], ids=[r[0] for r in STORABLE])
def test_storable(response: dict[str, Any]) -> None:
    check_storable(response)


@pytest.mark.parametrize(
    ("response", "words"),
    [row[1:] for row in NOT_STORABLE],
    ids=[row[0] for row in NOT_STORABLE],
)
def test_not_storable(response: dict[str, Any], words: str) -> None:
    with pytest.raises(NotStorable, match=words):
        check_storable(response)
