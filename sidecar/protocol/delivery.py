"""Delivery rules: what an ack touches, what a connect replays.

The states only move forward, ENQUEUED -> SENT -> DELIVERED (SENT may be skipped): every
store update filters on a lower current state. Stores turn these rules into queries;
`Replay.selects` and `acked_by_last_event_id` are the reference that the store conformance
tests hold every store to.
"""

from __future__ import annotations

import dataclasses
import enum

from sidecar.protocol.message import State


def acked_by_last_event_id(state: State, message_id: str, last_event_id: str) -> bool:
    """A Last-Event-ID acknowledges the messages already written to some stream (SENT) whose
    id is not after it. An ENQUEUED message was never written anywhere, so the client cannot
    have it, whatever its id (ids from several instances are only roughly time-ordered)."""
    return state == State.SENT and message_id <= last_event_id


@dataclasses.dataclass(frozen=True, slots=True)
class Replay:
    """What a new stream gets before live messages.

    - ENQUEUED messages always (nobody has seen them);
    - SENT messages when `sent` is true, and then only those after `sent_after` when it is
      set (a client that says which id it last saw has everything up to it);
    - DELIVERED messages never.
    """

    sent: bool
    sent_after: str | None = None

    @classmethod
    def on_connect(cls, last_event_id: str | None, *, replay_sent: bool) -> Replay:
        """Tock's rule for a client that sends no id (a legacy client never acks, so SENT
        messages would come back on every reconnect): ENQUEUED only, unless `replay_sent`.
        With an id: everything not yet delivered that the client cannot have."""
        if last_event_id is None:
            return cls(sent=replay_sent)
        return cls(sent=True, sent_after=last_event_id)

    def selects(self, state: State, message_id: str) -> bool:
        if state == State.ENQUEUED:
            return True
        if state == State.SENT and self.sent:
            return self.sent_after is None or message_id > self.sent_after
        return False


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in a user's log: messages numbered 1, 2, ... without gap within an epoch,
    the same on every instance (docs/delivery.md). Seq 0 is before the first message."""

    epoch: int
    seq: int


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
