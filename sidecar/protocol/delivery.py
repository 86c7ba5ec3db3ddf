"""Delivery rules (docs/delivery.md): a stream's position in its user's log, what a connect
without a position replays, and what a frame id sent back means. No I/O.

Each user's messages form a log numbered 1, 2, ... without gap within an epoch, the same on
every instance; the stores number it (`Store` states the contract). A stream writes each
seq of its user's log once, in order (`step`); a tab's position is the seq of the last
message it received, or the one a place frame told it (`place_id`), and an
acknowledgement by position covers every seq up to it.

The states only move forward, ENQUEUED -> SENT -> DELIVERED (SENT may be skipped): every
store update filters on a lower current state. They decide only what a connect without a
position gets (`Replay`).
"""

from __future__ import annotations

import dataclasses
import enum

from sidecar.protocol.message import State

# The id the browser client sends back when its tab has received nothing yet: "I have
# seen nothing" (everything not yet acknowledged), which no id in a store ever is.
SEEN_NOTHING = "0" * 24
# The first 8 hex digits of a place frame's id (`place_id`): an ObjectId's are its creation
# time, and none was made one second after 1970 began.
PLACE_PREFIX = "00000001"


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in a user's log. Seq 0 is before the first message of the epoch."""

    epoch: int
    seq: int


# Where a stream of a user with no log yet starts: any epoch is another.
NOWHERE = Position(0, 0)


def place_id(position: Position) -> str | None:
    """The id of the place frame that tells a browser-client tab its position when no
    message it was written names it (a connect that replayed by state, or found no log):
    24 hex digits like a message id, `PLACE_PREFIX` then the epoch and the seq in 8 each.
    Sent back, it names that position (`place_of`). None for a seq past 8 hex digits
    (2**32 messages in one log), where the tab goes on as one that has seen nothing."""
    if position.epoch >= 1 << 32 or position.seq >= 1 << 32:
        return None
    return f"{PLACE_PREFIX}{position.epoch:08x}{position.seq:08x}"


def place_of(frame_id: str) -> Position | None:
    """The position a place frame's id names; None for any other id (`frame_id` is a
    normalised id: 24 lowercase hex digits)."""
    if not frame_id.startswith(PLACE_PREFIX):
        return None
    return Position(int(frame_id[8:16], 16), int(frame_id[16:], 16))


class Step(enum.Enum):
    """What a stream at some position does with a message of its user's log."""

    DROP = "drop"  # at or before the position: written already, or older than the tab
    WRITE = "write"  # the next one
    GAP = "gap"  # later than the next: read the ones in between from the store first
    NEW_LOG = "new log"  # another epoch: the log started anew; read it from its start


def step(position: Position, epoch: int, seq: int) -> Step:
    """The stream rule: a stream writes each seq of its user's log once, in order."""
    if epoch != position.epoch:
        return Step.NEW_LOG
    if seq <= position.seq:
        return Step.DROP
    return Step.WRITE if seq == position.seq + 1 else Step.GAP


@dataclasses.dataclass(frozen=True, slots=True)
class Replay:
    """What a connect without a position gets, by state: ENQUEUED always (nobody has seen
    them), SENT when `sent` is true, DELIVERED never."""

    sent: bool

    @classmethod
    def on_connect(cls, seen_nothing: bool, *, replay_sent: bool) -> Replay:
        """A browser-client tab that says it has seen nothing gets everything not yet
        acknowledged. A client that sends no id (or one the store does not know) gets Tock's
        rule: only what no stream was written (a legacy client never acks, so SENT messages
        would come back on every reconnect), or everything not acknowledged with
        `replay_sent`."""
        return cls(sent=seen_nothing or replay_sent)

    def selects(self, state: State) -> bool:
        return state == State.ENQUEUED or (state == State.SENT and self.sent)

    @property
    def states(self) -> tuple[State, ...]:
        """The states it selects, for store queries."""
        return tuple(s for s in State if self.selects(s))
