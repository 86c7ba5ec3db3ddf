"""Delivery rules as explicit tables: every state pair, every state against every id order."""

from __future__ import annotations

import pytest

from sidecar.protocol.delivery import (
    NOWHERE,
    SEEN_NOTHING,
    Position,
    Replay,
    Step,
    place_id,
    place_of,
    step,
)
from sidecar.protocol.message import State, is_message_id, new_id

E, S, D = State.ENQUEUED, State.SENT, State.DELIVERED


def test_states_are_ordered_small_integers() -> None:
    assert [int(s) for s in (E, S, D)] == [0, 1, 2]
    assert set(State) == {E, S, D}


@pytest.mark.parametrize(
    ("seen_nothing", "replay_sent", "expected"),
    [
        (False, False, Replay(sent=False)),  # Tock's rule: only what no stream was written
        (False, True, Replay(sent=True)),
        (True, False, Replay(sent=True)),  # the browser client's first visit
        (True, True, Replay(sent=True)),
    ],
)
def test_on_connect(seen_nothing: bool, replay_sent: bool, expected: Replay) -> None:
    assert Replay.on_connect(seen_nothing, replay_sent=replay_sent) == expected


@pytest.mark.parametrize(
    ("sent", "state", "selected"),
    [
        (False, E, True),
        (False, S, False),
        (False, D, False),
        (True, E, True),
        (True, S, True),
        (True, D, False),
    ],
)
def test_selects(sent: bool, state: State, selected: bool) -> None:
    replay = Replay(sent=sent)
    assert replay.selects(state) is selected
    assert (state in replay.states) is selected


def test_seen_nothing_is_a_message_id_no_store_holds() -> None:
    assert is_message_id(SEEN_NOTHING)
    assert new_id() > SEEN_NOTHING


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


def test_a_stream_with_no_log_takes_any_epoch_as_a_new_log() -> None:
    assert step(NOWHERE, 12345, 1) is Step.NEW_LOG


@pytest.mark.parametrize(
    ("position", "frame_id"),
    [
        (NOWHERE, "000000010000000000000000"),
        (Position(1, 1), "000000010000000100000001"),
        (Position(2**31 + 1, 2**32 - 1), "0000000180000001ffffffff"),
    ],
)
def test_a_place_frame_id_names_its_position(position: Position, frame_id: str) -> None:
    assert place_id(position) == frame_id
    assert is_message_id(frame_id)  # every check of an id sent back takes it as it is
    assert place_of(frame_id) == position


@pytest.mark.parametrize("position", [Position(1, 2**32), Position(2**32, 1)])
def test_a_position_past_eight_hex_digits_has_no_place_frame(position: Position) -> None:
    assert place_id(position) is None


@pytest.mark.parametrize(
    "frame_id", [SEEN_NOTHING, new_id(), "000000020000000100000001", "100000010000000100000001"]
)
def test_only_a_place_frame_id_names_a_place(frame_id: str) -> None:
    assert place_of(frame_id) is None
