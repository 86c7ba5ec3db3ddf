"""The Store conformance suite: every store implementation must pass these same tests.

The `store` fixture (tests/conftest.py) is parametrised over `STORE_OPENERS`; a new store
adds an opener there.
"""

from __future__ import annotations

import itertools

import pytest
import trio

from sidecar.protocol.delivery import Replay, acked_by_last_event_id
from sidecar.protocol.message import IdGenerator, Message, State
from sidecar.store.base import FeedItem, Store

_clock = itertools.count(1_700_000_000)
new_id = IdGenerator(clock=lambda: next(_clock))


def msg(recipient: str = "alice", connector: str = "web", **response: object) -> Message:
    return Message(new_id(), connector, recipient, response or {"responses": [{"text": "hi"}]})


async def test_save_then_get_round_trips_response(store: Store) -> None:
    response = {"responses": [{"text": "héllo\nworld", "buttons": [{"title": "a\r\nb"}]}]}
    m = Message(new_id(), "web", "alice", response)
    await store.save([m])
    got = await store.get(m.id)
    assert got is not None
    assert (got.id, got.connector_id, got.recipient_id, got.response, got.state) == (
        m.id, "web", "alice", response, State.ENQUEUED,
    )  # fmt: skip
    assert abs((got.enqueued_at - m.enqueued_at).total_seconds()) < 0.01


async def test_get_unknown_is_none(store: Store) -> None:
    assert await store.get(new_id()) is None


async def test_save_is_idempotent_by_id(store: Store) -> None:
    m = msg()
    await store.save([m])
    await store.mark_sent([m.id])
    await store.save([m])  # a retried save: no error, no reset of the state
    got = await store.get(m.id)
    assert got is not None
    assert got.state == State.SENT


async def test_save_returns_the_ids_it_had_already(store: Store) -> None:
    a, b = msg(), msg()
    assert await store.save([a]) == []
    assert await store.save([b, a]) == [a.id]
    assert await store.save([a, b]) == [a.id, b.id]


async def test_pending_selects_by_recipient_and_connector_in_id_order(store: Store) -> None:
    mine = [msg() for _ in range(5)]
    others = [msg("bob"), msg(connector="other")]
    await store.save(list(reversed(mine)) + others)
    got = await store.pending("web", "alice", Replay(sent=False), after=None, limit=100)
    assert [m.id for m in got] == [m.id for m in mine]


async def test_pending_pages_with_after_and_limit(store: Store) -> None:
    mine = [msg() for _ in range(7)]
    await store.save(mine)
    first = await store.pending("web", "alice", Replay(sent=False), after=None, limit=3)
    second = await store.pending("web", "alice", Replay(sent=False), after=first[-1].id, limit=3)
    third = await store.pending("web", "alice", Replay(sent=False), after=second[-1].id, limit=3)
    assert [m.id for m in first + second + third] == [m.id for m in mine]
    assert len(third) == 1


@pytest.mark.parametrize(
    "replay",
    [Replay(sent=False), Replay(sent=True), Replay(sent=True, sent_after="middle")],
    ids=["enqueued-only", "all-undelivered", "sent-after-id"],
)
async def test_pending_follows_the_replay_rule(store: Store, replay: Replay) -> None:
    messages = [msg() for _ in range(9)]
    await store.save(messages)
    # states cycle ENQUEUED, SENT, DELIVERED over the id order
    await store.mark_sent([m.id for m in messages[1::3] + messages[2::3]])
    await store.ack("web", "alice", [m.id for m in messages[2::3]])
    if replay.sent_after == "middle":
        replay = Replay(sent=True, sent_after=messages[4].id)
    states = {m.id: State([0, 1, 2][i % 3]) for i, m in enumerate(messages)}
    got = await store.pending("web", "alice", replay, after=None, limit=100)
    assert [m.id for m in got] == [m.id for m in messages if replay.selects(states[m.id], m.id)]
    assert all(m.state == states[m.id] for m in got)


async def test_mark_sent_moves_only_enqueued(store: Store) -> None:
    a, b = msg(), msg()
    await store.save([a, b])
    await store.ack("web", "alice", [b.id])
    assert await store.mark_sent([a.id, b.id]) == 1
    assert await store.mark_sent([a.id]) == 0
    assert [(await store.get(m.id)).state for m in (a, b)] == [State.SENT, State.DELIVERED]  # type: ignore[union-attr]


async def test_ack_by_ids_touches_only_the_callers_messages(store: Store) -> None:
    alice, bob, other_connector = msg(), msg("bob"), msg(connector="other")
    await store.save([alice, bob, other_connector])
    ids = [alice.id, bob.id, other_connector.id]
    assert await store.ack("web", "alice", ids) == 1
    assert await store.ack("web", "alice", ids) == 0
    states = [(await store.get(i)).state for i in ids]  # type: ignore[union-attr]
    assert states == [State.DELIVERED, State.ENQUEUED, State.ENQUEUED]


async def test_ack_through_follows_the_last_event_id_rule(store: Store) -> None:
    messages = [msg() for _ in range(6)] + [msg("bob")]
    await store.save(messages)
    await store.mark_sent([m.id for m in messages[:2] + messages[3:]])  # messages[2] stays ENQUEUED
    last = messages[3].id
    before = {m.id: (await store.get(m.id)).state for m in messages}  # type: ignore[union-attr]
    moved = await store.ack_through("web", "alice", last)
    expected = [m.id for m in messages[:6] if acked_by_last_event_id(before[m.id], m.id, last)]
    assert moved == len(expected) == 3
    for m in messages:
        state = (await store.get(m.id)).state  # type: ignore[union-attr]
        assert state == (State.DELIVERED if m.id in expected else before[m.id])


async def test_state_never_moves_backwards(store: Store) -> None:
    m = msg()
    await store.save([m])
    await store.ack("web", "alice", [m.id])
    await store.mark_sent([m.id])
    await store.ack_through("web", "alice", m.id)
    got = await store.get(m.id)
    assert got is not None
    assert got.state == State.DELIVERED


async def test_feed_sees_other_writers_saves_made_after_it_started(
    store: Store, other_writer: Store
) -> None:
    old = msg()
    await other_writer.save([old])
    send, receive = trio.open_memory_channel[FeedItem](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run_feed, send)
        fresh = [msg(), msg("bob")]
        await other_writer.save(fresh[:1])
        await other_writer.save(fresh[1:])
        seen: list[str] = []
        while len(seen) < 2:
            item = await receive.receive()
            assert isinstance(item, Message)
            if item.id not in seen:
                seen.append(item.id)
        assert seen == [m.id for m in fresh]
        assert old.id not in seen
        nursery.cancel_scope.cancel()


async def test_ping_answers(store: Store) -> None:
    details = await store.ping()
    assert details["kind"] in ("sqlite", "mongodb")
