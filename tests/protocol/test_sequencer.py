from __future__ import annotations

import itertools

import pytest

from sidecar.protocol.sequencer import Sequencer


def test_in_order_finishes_release_at_once() -> None:
    seq: Sequencer[str] = Sequencer()
    a, b = seq.take(), seq.take()
    assert seq.finish(a, "a") == ["a"]
    assert seq.finish(b, "b") == ["b"]
    assert seq.in_flight == 0


def test_a_later_finish_waits_for_the_earlier_one() -> None:
    seq: Sequencer[str] = Sequencer()
    a, b, c = seq.take(), seq.take(), seq.take()
    assert seq.finish(c, "c") == []
    assert seq.finish(b, "b") == []
    assert seq.in_flight == 3
    assert seq.finish(a, "a") == ["a", "b", "c"]
    assert seq.in_flight == 0


def test_a_failure_releases_what_waited_behind_it() -> None:
    seq: Sequencer[str] = Sequencer()
    a, b = seq.take(), seq.take()
    assert seq.finish(b, "b") == []
    assert seq.finish(a, None) == ["b"]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_any_finishing_order_releases_in_ticket_order(order: tuple[int, ...]) -> None:
    seq: Sequencer[int] = Sequencer()
    tickets = [seq.take() for _ in range(4)]
    released: list[int] = []
    for i in order:
        released += seq.finish(tickets[i], None if i == 2 else i)
    assert released == [0, 1, 3]


def test_finishing_twice_or_an_unknown_ticket_is_refused() -> None:
    seq: Sequencer[int] = Sequencer()
    a = seq.take()
    seq.finish(a, 1)
    with pytest.raises(ValueError, match="not in flight"):
        seq.finish(a, 1)
    with pytest.raises(ValueError, match="not in flight"):
        seq.finish(5, 1)
