"""Delivery rules as explicit tables: every state pair, every state against every id order."""

from __future__ import annotations

import pytest

from sidecar.protocol.delivery import Position, Replay, Step, acked_by_last_event_id, step
from sidecar.protocol.message import State

E, S, D = State.ENQUEUED, State.SENT, State.DELIVERED

MARK = "65a1b2c3d4e5f60718293a4b"
BEFORE = "65a1b2c3d4e5f60718293a4a"
AFTER = "65a1b2c3d4e5f60718293a4c"
IDS = {"before": BEFORE, "equal": MARK, "after": AFTER}


def test_states_are_ordered_small_integers() -> None:
    assert [int(s) for s in (E, S, D)] == [0, 1, 2]
    assert set(State) == {E, S, D}


@pytest.mark.parametrize(
    ("state", "position", "acked"),
    [
        (E, "before", False),
        (E, "equal", False),
        (E, "after", False),
        (S, "before", True),
        (S, "equal", True),
        (S, "after", False),
        (D, "before", False),
        (D, "equal", False),
        (D, "after", False),
    ],
)
def test_acked_by_last_event_id(state: State, position: str, acked: bool) -> None:
    assert acked_by_last_event_id(state, IDS[position], MARK) is acked


def test_acked_by_last_event_id_compares_whole_ids_not_prefixes() -> None:
    # Same time part, counter decides; and an earlier second with a large counter is before.
    assert acked_by_last_event_id(S, "65a1b2c30000000000ffffff", "65a1b2c40000000000000000")
    assert not acked_by_last_event_id(S, "65a1b2c40000000000000000", "65a1b2c30000000000ffffff")


@pytest.mark.parametrize(
    ("last_event_id", "replay_sent", "expected"),
    [
        (None, False, Replay(sent=False)),
        (None, True, Replay(sent=True)),
        (MARK, False, Replay(sent=True, sent_after=MARK)),
        (MARK, True, Replay(sent=True, sent_after=MARK)),
    ],
)
def test_on_connect(last_event_id: str | None, replay_sent: bool, expected: Replay) -> None:
    replay = Replay.on_connect(last_event_id, replay_sent=replay_sent)
    assert replay == expected
    assert replay.sent is expected.sent
    assert replay.sent_after == expected.sent_after


def test_replay_defaults() -> None:
    assert Replay(sent=False).sent_after is None


RULES = {
    "enqueued only": Replay(sent=False),
    "all sent": Replay(sent=True),
    "sent after mark": Replay(sent=True, sent_after=MARK),
    # `sent_after` without `sent` changes nothing: SENT is not replayed at all.
    "not sent, mark ignored": Replay(sent=False, sent_after=MARK),
}

SELECTS = [
    # rule, state, position, selected
    ("enqueued only", E, "before", True),
    ("enqueued only", E, "equal", True),
    ("enqueued only", E, "after", True),
    ("enqueued only", S, "before", False),
    ("enqueued only", S, "equal", False),
    ("enqueued only", S, "after", False),
    ("enqueued only", D, "before", False),
    ("enqueued only", D, "equal", False),
    ("enqueued only", D, "after", False),
    ("all sent", E, "before", True),
    ("all sent", E, "equal", True),
    ("all sent", E, "after", True),
    ("all sent", S, "before", True),
    ("all sent", S, "equal", True),
    ("all sent", S, "after", True),
    ("all sent", D, "before", False),
    ("all sent", D, "equal", False),
    ("all sent", D, "after", False),
    ("sent after mark", E, "before", True),
    ("sent after mark", E, "equal", True),
    ("sent after mark", E, "after", True),
    ("sent after mark", S, "before", False),
    ("sent after mark", S, "equal", False),
    ("sent after mark", S, "after", True),
    ("sent after mark", D, "before", False),
    ("sent after mark", D, "equal", False),
    ("sent after mark", D, "after", False),
    ("not sent, mark ignored", E, "before", True),
    ("not sent, mark ignored", E, "equal", True),
    ("not sent, mark ignored", E, "after", True),
    ("not sent, mark ignored", S, "before", False),
    ("not sent, mark ignored", S, "equal", False),
    ("not sent, mark ignored", S, "after", False),
    ("not sent, mark ignored", D, "before", False),
    ("not sent, mark ignored", D, "equal", False),
    ("not sent, mark ignored", D, "after", False),
]


def test_selects_table_is_complete() -> None:
    assert {(r, s, p) for r, s, p, _ in SELECTS} == {
        (r, s, p) for r in RULES for s in State for p in IDS
    }
    assert len(SELECTS) == len(RULES) * len(State) * len(IDS)


@pytest.mark.parametrize(("rule", "state", "position", "selected"), SELECTS)
def test_selects(rule: str, state: State, position: str, selected: bool) -> None:
    assert RULES[rule].selects(state, IDS[position]) is selected


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("position", list(IDS))
def test_ack_and_replay_after_agree(state: State, position: str) -> None:
    """With a Last-Event-ID, a SENT message is either acknowledged by it or replayed, never
    both and never neither; ENQUEUED is always replayed, DELIVERED never."""
    message_id = IDS[position]
    replay = Replay.on_connect(MARK, replay_sent=False)
    acked = acked_by_last_event_id(state, message_id, MARK)
    replayed = replay.selects(state, message_id)
    if state == S:
        assert acked != replayed
    else:
        assert not acked
        assert replayed is (state == E)


# --- the log position rule ------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "seq", "expected"),
    [
        (7, 1, Step.DROP),
        (7, 4, Step.DROP),
        (7, 5, Step.DROP),
        (7, 6, Step.WRITE),
        (7, 7, Step.GAP),
        (7, 1000, Step.GAP),
        (8, 1, Step.NEW_LOG),
        (8, 6, Step.NEW_LOG),
        (0, 6, Step.NEW_LOG),
    ],
)
def test_step(epoch: int, seq: int, expected: Step) -> None:
    assert step(Position(7, 5), epoch, seq) is expected


def test_the_start_of_a_log_takes_its_first_message() -> None:
    assert step(Position(3, 0), 3, 1) is Step.WRITE
    assert step(Position(3, 0), 3, 2) is Step.GAP
