"""Message ids: strictly increasing ObjectIds, parsing and the time part."""

from __future__ import annotations

import datetime
import itertools
import re
from collections.abc import Callable, Iterator

import pytest

from sidecar.protocol.message import (
    IdGenerator,
    Message,
    State,
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
