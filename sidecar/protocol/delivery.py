"""Delivery rules (docs/delivery.md): a stream's position in its user's log, what a connect
without a position replays, and what a frame id sent back means. No I/O.

Each user's messages form a log numbered 1, 2, ... without gap within an epoch, the same on
every instance; the stores number it (`Store` states the contract). A stream writes each
seq of its user's log once, in order (`step`); a tab's position is the seq of the last
message it received, and an acknowledgement by position covers every seq up to it.

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


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in a user's log. Seq 0 is before the first message of the epoch."""

    epoch: int
    seq: int


# Where a stream of a user with no log yet starts: any epoch is another.
NOWHERE = Position(0, 0)


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
