"""The Store conformance suite: every store implementation must pass these same tests.

The `store` fixture (tests/conftest.py) is parametrised over `STORE_OPENERS`; a new store
adds an opener there.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from sidecar.protocol.delivery import Position, Replay
from sidecar.protocol.feed import FeedItem
from sidecar.protocol.message import IdGenerator, Message, State
from sidecar.store.base import Store
from tests.protocol.test_message import STORABLE

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


@pytest.mark.parametrize("response", [r[1] for r in STORABLE], ids=[r[0] for r in STORABLE])
async def test_every_response_the_send_api_takes_round_trips(
    store: Store, response: dict[str, object]
) -> None:
    # At the limits of `check_storable`: what one store keeps, every store keeps.
    m = Message(new_id(), "web", "alice", response)
    await store.save([m])
    got = await store.get(m.id)
    assert got is not None
    assert got.response == response


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


class Feed:
    """A store's running feed, and what it has reported, by id."""

    def __init__(self, receive: trio.MemoryReceiveChannel[FeedItem]) -> None:
        self._receive = receive
        self.seen: dict[str, Message] = {}

    async def wait_for(self, messages: list[Message]) -> list[Message]:
        """The messages as the feed reported them (logged: with their places), once it has
        reported every one."""
        while not all(m.id in self.seen for m in messages):
            item = await self._receive.receive()
            if isinstance(item, Message):
                self.seen.setdefault(item.id, item)
        return [self.seen[m.id] for m in messages]


@asynccontextmanager
async def feed_of(store: Store) -> AsyncIterator[Feed]:
    send, receive = trio.open_memory_channel[FeedItem](1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run_feed, send)
        yield Feed(receive)
        nursery.cancel_scope.cancel()


async def saved(store: Store, feed: Feed, *batches: list[Message]) -> list[Message]:
    """Save each batch in turn, then wait until they are logged."""
    for batch in batches:
        await store.save(batch)
    return await feed.wait_for([m for batch in batches for m in batch])


async def whole_log(store: Store, recipient: str = "alice") -> list[Message]:
    head = await store.head("web", recipient)
    assert head is not None
    return await store.logged(
        "web", recipient, Position(head.epoch, 0), through=head.seq, limit=1000
    )


async def test_messages_are_logged_in_save_order_per_user(store: Store) -> None:
    async with feed_of(store) as feed:
        batch = [msg() for _ in range(3)]
        # Ids that do not follow the save order: the log does.
        later, earlier = msg(), msg()
        got = await saved(store, feed, batch, [earlier], [msg("bob")], [later])
    assert [m.seq for m in got] == [1, 2, 3, 4, 1, 5]
    epoch = got[0].epoch
    assert {m.epoch for m in got if m.recipient_id == "alice"} == {epoch}
    assert await store.head("web", "alice") == Position(epoch, 5)
    assert await store.head("web", "nobody") is None
    assert [(m.id, m.seq) for m in await whole_log(store)] == [
        (m.id, m.seq) for m in got if m.recipient_id == "alice"
    ]
    assert await store.position_of("web", "alice", earlier.id) == Position(epoch, 4)
    assert await store.position_of("web", "bob", earlier.id) is None  # not bob's
    assert await store.position_of("web", "alice", new_id()) is None


async def test_logged_takes_a_range_of_one_epoch(store: Store) -> None:
    async with feed_of(store) as feed:
        got = await saved(store, feed, [msg() for _ in range(6)])
    epoch = got[0].epoch
    page = await store.logged("web", "alice", Position(epoch, 1), through=5, limit=2)
    assert [m.seq for m in page] == [2, 3]
    assert [
        m.seq for m in await store.logged("web", "alice", Position(epoch, 3), through=5, limit=9)
    ] == [4, 5]
    assert await store.logged("web", "alice", Position(epoch + 1, 0), through=6, limit=9) == []
    assert await store.logged("web", "bob", Position(epoch, 0), through=6, limit=9) == []


@pytest.mark.parametrize(
    "replay", [Replay(sent=False), Replay(sent=True)], ids=["enqueued", "sent"]
)
async def test_logged_selects_by_state_and_fills_its_pages(store: Store, replay: Replay) -> None:
    async with feed_of(store) as feed:
        messages = await saved(store, feed, [msg() for _ in range(9)])
    # States cycle ENQUEUED, SENT, DELIVERED over the log.
    await store.mark_sent([m.id for m in messages[1::3] + messages[2::3]])
    await store.ack("web", "alice", [m.id for m in messages[2::3]])
    states = {m.id: State(i % 3) for i, m in enumerate(messages)}
    expected = [m.id for m in messages if replay.selects(states[m.id])]
    start = Position(messages[0].epoch, 0)
    got = await store.logged("web", "alice", start, through=9, limit=100, replay=replay)
    assert [m.id for m in got] == expected
    assert all(m.state == states[m.id] for m in got)
    # A page of 2 skips what the selection leaves out and is still full.
    page = await store.logged("web", "alice", start, through=9, limit=2, replay=replay)
    assert [m.id for m in page] == expected[:2]


async def test_sends_made_one_after_the_other_through_two_writers_keep_their_order(
    store: Store, other_writer: Store
) -> None:
    # Each send's id is older than the one before: two processes' ObjectIds within one
    # second compare by their random bytes. The log follows the sends.
    backwards = IdGenerator(clock=lambda: 2_000_000_000 - next(_clock) % 1_000_000)
    sends = [Message(backwards(), "web", "alice", {"n": n}) for n in range(8)]
    async with feed_of(store) as feed, feed_of(other_writer) as other_feed:
        for n, m in enumerate(sends):
            await (store if n % 2 else other_writer).save([m])
        got = await feed.wait_for(sends)
        assert [(m.id, m.seq) for m in await other_feed.wait_for(sends)] == [
            (m.id, m.seq) for m in got
        ]
    assert [m.seq for m in got] == list(range(1, 9))
    assert [m.id for m in await whole_log(store)] == [m.id for m in sends]


async def test_concurrent_saves_of_two_writers_get_one_log_without_gaps(
    store: Store, other_writer: Store
) -> None:
    sends = [msg(n=n) for n in range(30)]
    async with feed_of(store) as feed, feed_of(other_writer) as other_feed:
        async with trio.open_nursery() as nursery:
            for n, m in enumerate(sends):
                nursery.start_soon((store if n % 2 else other_writer).save, [m])
        got = await feed.wait_for(sends)
        other = await other_feed.wait_for(sends)
    assert sorted(m.seq for m in got) == list(range(1, 31))
    assert [(m.epoch, m.seq) for m in got] == [(m.epoch, m.seq) for m in other]
    assert len({m.epoch for m in got}) == 1


async def test_mark_sent_moves_only_enqueued(store: Store) -> None:
    a, b = msg(), msg()
    async with feed_of(store) as feed:
        await saved(store, feed, [a, b])
    await store.ack("web", "alice", [b.id])
    assert await store.mark_sent([a.id, b.id]) == 1
    assert await store.mark_sent([a.id]) == 0
    assert [(await store.get(m.id)).state for m in (a, b)] == [State.SENT, State.DELIVERED]  # type: ignore[union-attr]


async def test_ack_by_ids_touches_only_the_callers_messages(store: Store) -> None:
    alice, bob, other_connector = msg(), msg("bob"), msg(connector="other")
    async with feed_of(store) as feed:
        await saved(store, feed, [alice, bob])
        await store.save([other_connector])  # a connector the feed does not serve
    ids = [alice.id, bob.id, other_connector.id]
    assert await store.ack("web", "alice", ids) == 1
    assert await store.ack("web", "alice", ids) == 0
    states = [(await store.get(i)).state for i in ids]  # type: ignore[union-attr]
    assert states == [State.DELIVERED, State.ENQUEUED, State.ENQUEUED]


async def test_acknowledge_through_covers_every_state_up_to_the_position(store: Store) -> None:
    async with feed_of(store) as feed:
        messages = await saved(store, feed, [msg() for _ in range(6)], [msg("bob")])
    await store.mark_sent([messages[1].id, messages[4].id])  # the rest stay ENQUEUED
    epoch = messages[0].epoch
    assert await store.acknowledge_through("web", "alice", Position(epoch, 3)) == 3
    assert await store.acknowledge_through("web", "alice", Position(epoch, 3)) == 0
    assert await store.acknowledge_through("web", "alice", Position(epoch + 1, 9)) == 0
    states = [(await store.get(m.id)).state for m in messages]  # type: ignore[union-attr]
    assert states == [State.DELIVERED] * 3 + [State.ENQUEUED, State.SENT, State.ENQUEUED] * 1 + [
        State.ENQUEUED
    ]


async def test_state_never_moves_backwards(store: Store) -> None:
    m = msg()
    async with feed_of(store) as feed:
        (logged,) = await saved(store, feed, [m])
    await store.ack("web", "alice", [m.id])
    await store.mark_sent([m.id])
    await store.acknowledge_through("web", "alice", Position(logged.epoch, logged.seq))
    got = await store.get(m.id)
    assert got is not None
    assert got.state == State.DELIVERED


async def test_feed_reports_every_writers_saves_made_after_it_started(
    store: Store, other_writer: Store
) -> None:
    old = msg()
    await other_writer.save([old])
    async with feed_of(store) as feed:
        fresh = [msg(), msg("bob"), msg()]
        await other_writer.save(fresh[:1])
        await other_writer.save(fresh[1:2])
        await store.save(fresh[2:])
        got = await feed.wait_for(fresh)
        assert old.id not in feed.seen
    assert [(m.recipient_id, m.seq) for m in got] == [("alice", 2), ("bob", 1), ("alice", 3)]


async def test_ping_answers(store: Store) -> None:
    details = await store.ping()
    assert details["kind"] in ("sqlite", "mongodb")
