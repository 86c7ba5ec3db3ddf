"""Merging a replay batch with live messages: each id written once, replay in id order."""

from __future__ import annotations

import pytest

from sidecar.protocol.message import Message
from sidecar.protocol.replay import SeenWindow, live, replay_order


def mid(n: int) -> str:
    return f"{n:024x}"


def msg(n: int) -> Message:
    return Message(mid(n), "web", "user", {"n": n})


def test_seen_window_add_and_contains() -> None:
    seen = SeenWindow(4)
    assert len(seen) == 0
    assert mid(1) not in seen
    assert seen.add(mid(1)) is True
    assert mid(1) in seen
    assert seen.add(mid(1)) is False
    assert seen.add(mid(2)) is True
    assert seen.add(mid(2)) is False
    assert len(seen) == 2
    assert 42 not in seen


def test_seen_window_evicts_oldest() -> None:
    seen = SeenWindow(3)
    for n in (1, 2, 3):
        assert seen.add(mid(n))
    assert seen.add(mid(4))
    assert len(seen) == 3
    assert mid(1) not in seen
    assert all(mid(n) in seen for n in (2, 3, 4))
    # A repeat does not refresh or reorder: 2 is still the oldest and goes next.
    assert seen.add(mid(2)) is False
    assert seen.add(mid(5))
    assert mid(2) not in seen
    assert [mid(n) in seen for n in (3, 4, 5)] == [True, True, True]
    # An evicted id counts as new again.
    assert seen.add(mid(1)) is True


def test_seen_window_stays_bounded() -> None:
    seen = SeenWindow(10)
    for n in range(1000):
        assert seen.add(mid(n))
        assert len(seen) <= 10
    assert len(seen) == 10
    assert [mid(n) in seen for n in range(990, 1000)] == [True] * 10


def test_seen_window_of_one() -> None:
    seen = SeenWindow(1)
    assert seen.add(mid(1))
    assert not seen.add(mid(1))
    assert seen.add(mid(2))
    assert seen.add(mid(1))


def test_seen_window_default_size() -> None:
    seen = SeenWindow()
    for n in range(4097):
        seen.add(mid(n))
    assert len(seen) == 4096
    assert mid(0) not in seen


@pytest.mark.parametrize("size", [0, -1, -100])
def test_seen_window_refuses_non_positive_size(size: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        SeenWindow(size)


@pytest.mark.parametrize(
    ("batch", "already_seen", "written"),
    [
        ([], [], []),
        ([1, 2, 3], [], [1, 2, 3]),
        ([3, 1, 2], [], [1, 2, 3]),
        ([3, 1, 2], [2], [1, 3]),
        ([1, 2, 3], [1, 2, 3], []),
        ([2, 2, 1], [], [1, 2]),
        ([0x10, 0x9, 0xA], [], [0x9, 0xA, 0x10]),
    ],
)
def test_replay_order(batch: list[int], already_seen: list[int], written: list[int]) -> None:
    seen = SeenWindow()
    for n in already_seen:
        seen.add(mid(n))
    out = list(replay_order((msg(n) for n in batch), seen))
    assert [m.id for m in out] == [mid(n) for n in written]
    assert all(mid(n) in seen for n in batch)


def test_replay_order_sorts_by_id_as_text() -> None:
    # Fixed-width hex: string order is ObjectId order (time part first).
    ids = ["65a1b2c40000000000000000", "65a1b2c30000000000ffffff", "65a1b2c3000000000000000a"]
    batch = [Message(i, "web", "u", {}) for i in ids]
    assert [m.id for m in replay_order(batch, SeenWindow())] == sorted(ids)


def test_live() -> None:
    seen = SeenWindow()
    assert live(msg(1), seen) is True
    assert live(msg(1), seen) is False
    assert mid(1) in seen
    assert live(msg(2), seen) is True


def test_merge_replay_with_live_arrivals() -> None:
    """A stream subscribes, then replays [a, b, c] while live b, d, c, e arrive; it writes
    a, b, c, d, e, each once."""
    a, b, c, d, e = (msg(n) for n in range(1, 6))
    seen = SeenWindow()
    written: list[Message] = []
    written.extend(replay_order([c, a, b], seen))
    written.extend(m for m in [b, d, c, e] if live(m, seen))
    assert written == [a, b, c, d, e]
    assert len({m.id for m in written}) == len(written)


def test_merge_live_before_replay() -> None:
    """Live messages written before the replay page arrives are not replayed again."""
    a, b, c, d = (msg(n) for n in range(1, 5))
    seen = SeenWindow()
    written = [m for m in [c, d] if live(m, seen)]
    written.extend(replay_order([a, b, c], seen))
    assert written == [c, d, a, b]


def test_replay_order_leaves_out_skipped_ids_without_remembering_them() -> None:
    seen = SeenWindow()
    batch = [msg(2), msg(1), msg(3)]
    assert [m.id for m in replay_order(batch, seen, skip={mid(2)})] == [mid(1), mid(3)]
    assert mid(2) not in seen


def test_replay_order_merges_queued_live_messages_and_never_skips_them() -> None:
    """Queued live messages go out in id order with the batch, once each; `skip` applies
    to the batch only (a queued message was dispatched already: nothing else brings it)."""
    a, b, c, d = (msg(n) for n in range(1, 5))
    out = replay_order([b, d], SeenWindow(), skip={d.id, c.id}, queued=[c, a, b])
    assert [m.id for m in out] == [a.id, b.id, c.id]
