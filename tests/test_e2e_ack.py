"""Acknowledgement end to end: by Last-Event-ID on connect, and by POST to the ack endpoint."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio

from sidecar.protocol.message import Message, State, new_id
from tests.sidecar_harness import Sidecar, SseClient, running_sidecar, settings_for

ZERO_ID = "0" * 24  # a valid id before every other: replays everything not DELIVERED


async def wait_for_state(sidecar: Sidecar, ids: list[str], state: State) -> None:
    """Marking SENT is batched off the stream's path: wait (bounded) until the store says so."""
    with trio.fail_after(5):
        for message_id in ids:
            while True:
                message = await sidecar.running.store.get(message_id)
                assert message is not None
                if message.state == state:
                    break
                await trio.sleep(0.02)


async def states(sidecar: Sidecar, ids: list[str]) -> list[State]:
    found = [await sidecar.running.store.get(i) for i in ids]
    assert all(m is not None for m in found)
    return [m.state for m in found]  # type: ignore[union-attr]


async def make_sent(sidecar: Sidecar, user: str, count: int, connector: str = "web") -> list[str]:
    """`count` messages for `user`, streamed once (so SENT), the stream closed again."""
    ids = [await sidecar.send(user, connector, n=n) for n in range(count)]
    async with stream_at(
        sidecar, f"{sidecar.public}/io/app/{connector}/sse?userId={user}"
    ) as client:
        assert [e.id for e in await client.messages(count)] == ids
    await wait_for_state(sidecar, ids, State.SENT)
    return ids


@asynccontextmanager
async def stream_at(
    sidecar: Sidecar, url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[SseClient]:
    async with sidecar.client.stream("GET", url, headers=headers or {}) as response:
        assert response.status_code == 200, await response.aread()
        raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
        async with aclosing(raw) as chunks:
            client = SseClient(chunks)
            assert (await client.next_event()).event == "ping"
            yield client


async def received_until_fresh(
    sidecar: Sidecar, client: SseClient, user: str = "alice"
) -> list[str]:
    """Every message the stream writes up to a fresh one sent now (the last of the user's
    log, so it comes after the whole replay); the fresh one is left off."""
    fresh = await sidecar.send(user, fresh=True)
    ids: list[str] = []
    while (event := await client.next_message()).id != fresh:
        assert event.id is not None
        ids.append(event.id)
    return ids


async def ack(
    sidecar: Sidecar,
    body: Any,
    *,
    user: str | None = "alice",
    connector_path: str = "/io/app/web",
    content_type: str = "application/json",
) -> httpx.Response:
    query = f"?userId={user}" if user is not None else ""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await sidecar.client.post(
        f"{sidecar.public}{connector_path}/sse/ack{query}",
        content=content,
        headers={"Content-Type": content_type},
    )


def assert_error(reply: httpx.Response, status: int, code: str | None = None) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == {"code", "message", "requestId"}
    assert error["requestId"] == reply.headers["x-request-id"]
    if code is not None:
        assert error["code"] == code, error


# --- Last-Event-ID on connect ----------------------------------------------------------------


async def _history(sidecar: Sidecar) -> dict[str, Any]:
    """alice: four SENT messages, then an ENQUEUED one with an id older than everything (as
    another instance with a slower clock would write it), then an ENQUEUED newer one; bob:
    one SENT. The log follows the saves, not the ids."""
    early = new_id()
    sent = await make_sent(sidecar, "alice", 4)
    (bob,) = await make_sent(sidecar, "bob", 1)
    await sidecar.running.store.save([Message(early, "web", "alice", {"early": True})])
    late = await sidecar.send("alice", late=True)
    assert early < sent[0] < sent[3] < bob < late
    assert await states(sidecar, [early, late]) == [State.ENQUEUED] * 2
    return {"early": early, "sent": sent, "bob": bob, "late": late}


@pytest.mark.parametrize("where", ["header", "query", "header-over-query"])
async def test_the_id_sent_back_acknowledges_the_log_up_to_it_and_replays_the_rest(
    sidecar: Sidecar, where: str
) -> None:
    h = await _history(sidecar)
    s1, s2, s3, s4 = h["sent"]
    if where == "header":
        opened = sidecar.stream("alice", last_event_id=s2)
    elif where == "query":
        opened = sidecar.stream("alice", query=f"&lastEventId={s2}")
    else:  # the query says s4, which would ack s3 and s4 too: the header wins
        opened = sidecar.stream("alice", last_event_id=s2, query=f"&lastEventId={s4}")
    async with opened as client:
        # The rest of the log, in log order, whatever the states and the ids.
        assert await received_until_fresh(sidecar, client) == [s3, s4, h["early"], h["late"]]
        assert await states(sidecar, [s1, s2]) == [State.DELIVERED] * 2
        assert await states(sidecar, [s3, s4, h["bob"]]) == [State.SENT] * 3
        # The one with an older id, later in the log, was not acknowledged by it.
        assert (await states(sidecar, [h["early"]]))[0] != State.DELIVERED
    # Acknowledged messages never come back, even to a client replaying every SENT one.
    async with sidecar.stream("alice", last_event_id=ZERO_ID) as client:
        replayed = await received_until_fresh(sidecar, client)
        assert replayed[:4] == [s3, s4, h["early"], h["late"]]
        assert s1 not in replayed
        assert s2 not in replayed


async def test_last_event_id_is_case_insensitive(sidecar: Sidecar) -> None:
    s1, s2 = await make_sent(sidecar, "alice", 2)
    async with sidecar.stream("alice", last_event_id=s1.upper()) as client:
        assert await received_until_fresh(sidecar, client) == [s2]
    assert await states(sidecar, [s1, s2]) == [State.DELIVERED, State.SENT]


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({"Last-Event-ID": "nope"}, ""),
        ({"Last-Event-ID": "0" * 23}, ""),
        ({"Last-Event-ID": "g" * 24}, ""),
        ({}, "&lastEventId=nope"),
        ({"Last-Event-ID": "nope"}, f"&lastEventId={ZERO_ID}"),
    ],
    ids=["word", "short", "not-hex", "query", "bad-header-good-query"],
)
async def test_invalid_last_event_id_is_400_json(
    sidecar: Sidecar, headers: dict[str, str], query: str
) -> None:
    (sent,) = await make_sent(sidecar, "alice", 1)
    url = sidecar.stream_url("alice") + query
    async with sidecar.client.stream("GET", url, headers=headers) as response:
        await response.aread()
        assert_error(response, 400, "invalid_last_event_id")
    assert await states(sidecar, [sent]) == [State.SENT]


# --- POST ack --------------------------------------------------------------------------------


async def test_ack_by_ids_delivers_them_for_good(sidecar: Sidecar) -> None:
    s1, s2, s3 = await make_sent(sidecar, "alice", 3)
    queued = await sidecar.send("alice", queued=True)
    reply = await ack(sidecar, {"ids": [s1, s3, queued]})
    assert reply.status_code == 204, reply.text
    assert reply.content == b""
    assert await states(sidecar, [s1, s2, s3, queued]) == [
        State.DELIVERED,
        State.SENT,
        State.DELIVERED,
        State.DELIVERED,
    ]
    # Acked twice is fine.
    assert (await ack(sidecar, {"ids": [s1]})).status_code == 204
    # Never replayed again, even to a client that asks for every SENT message.
    async with sidecar.stream("alice", last_event_id=ZERO_ID) as client:
        assert await received_until_fresh(sidecar, client) == [s2]


async def test_ack_by_last_event_id_covers_the_log_up_to_it(sidecar: Sidecar) -> None:
    early = new_id()
    s1, s2, s3 = await make_sent(sidecar, "alice", 3)
    await sidecar.running.store.save([Message(early, "web", "alice", {"early": True})])
    reply = await ack(sidecar, {"lastEventId": s2})
    assert reply.status_code == 204, reply.text
    assert await states(sidecar, [early, s1, s2, s3]) == [
        State.ENQUEUED,
        State.DELIVERED,
        State.DELIVERED,
        State.SENT,
    ]


async def test_ack_with_both_keys(sidecar: Sidecar) -> None:
    s1, s2, s3 = await make_sent(sidecar, "alice", 3)
    reply = await ack(sidecar, {"ids": [s3], "lastEventId": s1})
    assert reply.status_code == 204, reply.text
    assert await states(sidecar, [s1, s2, s3]) == [State.DELIVERED, State.SENT, State.DELIVERED]


async def test_ack_accepts_text_plain_and_userid(sidecar: Sidecar) -> None:
    # What navigator.sendBeacon sends without a preflight.
    s1, s2 = await make_sent(sidecar, "alice", 2)
    reply = await ack(sidecar, {"ids": [s1]}, content_type="text/plain;charset=UTF-8")
    assert reply.status_code == 204, reply.text
    reply = await sidecar.client.post(
        f"{sidecar.public}/io/app/web/sse/ack?userid=alice",
        content=f'{{"lastEventId": "{s2.upper()}"}}'.encode(),
        headers={"Content-Type": "text/plain"},
    )
    assert reply.status_code == 204, reply.text
    assert await states(sidecar, [s1, s2]) == [State.DELIVERED] * 2


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"[]",
        b'"ids"',
        b"{}",
        b'{"id": "x"}',
        b'{"ids": "ID"}',
        b'{"ids": {"a": 1}}',
        b'{"ids": ["nope"]}',
        b'{"ids": ["ID", 7]}',
        b'{"ids": ["ID", "nope"]}',
        b'{"ids": ["ID", null]}',
        b'{"lastEventId": "nope"}',
        b'{"lastEventId": 7}',
        b'{"lastEventId": ["ID"]}',
        b'{"lastEventId": NaN}',
        b'{"lastEventId": null}',
        b'{"ids": ["ID"], "extra": NaN}',
        b'{"lastEventId": "nope", "ids": ["ID"]}',
        b'{"lastEventId": "ID", "ids": ["nope"]}',
    ],
)
async def test_bad_ack_is_400_and_changes_nothing(sidecar: Sidecar, body: bytes) -> None:
    sent = await make_sent(sidecar, "alice", 2)
    queued = await sidecar.send("alice", queued=True)
    reply = await ack(sidecar, body.replace(b"ID", sent[1].encode()))
    assert_error(reply, 400)
    assert await states(sidecar, [*sent, queued]) == [State.SENT, State.SENT, State.ENQUEUED]


async def test_ack_refuses_missing_user_and_other_content_types(sidecar: Sidecar) -> None:
    (sent,) = await make_sent(sidecar, "alice", 1)
    assert_error(await ack(sidecar, {"ids": [sent]}, user=None), 400, "missing_user_id")
    assert_error(await ack(sidecar, {"ids": [sent]}, user=""), 400, "missing_user_id")
    assert_error(await ack(sidecar, {"ids": [sent]}, user="u" * 513), 400, "invalid_user_id")
    reply = await ack(sidecar, {"ids": [sent]}, content_type="application/x-www-form-urlencoded")
    assert_error(reply, 415)
    assert_error(await sidecar.client.get(f"{sidecar.public}/io/app/web/sse/ack?userId=alice"), 405)
    assert await states(sidecar, [sent]) == [State.SENT]


# --- isolation -------------------------------------------------------------------------------


async def test_a_user_cannot_ack_another_users_messages(sidecar: Sidecar) -> None:
    mine = await make_sent(sidecar, "alice", 2)
    queued = await sidecar.send("alice", queued=True)
    ids = [*mine, queued]
    assert (await ack(sidecar, {"ids": ids}, user="bob")).status_code == 204
    # bob's own newer SENT message gives him a lastEventId above all of alice's ids
    (bobs,) = await make_sent(sidecar, "bob", 1)
    assert (await ack(sidecar, {"lastEventId": bobs}, user="bob")).status_code == 204
    assert (await ack(sidecar, {"lastEventId": "f" * 24}, user="bob")).status_code == 204
    # Connecting as bob with a Last-Event-ID (one of alice's, or none's) does not touch
    # alice's either. Bob's queued message comes by the replay, which follows the
    # acknowledgement: once it is here, the Last-Event-ID has been applied.
    for sent_back in (mine[1], "f" * 24):
        queued_for_bob = await sidecar.send("bob")
        async with sidecar.stream("bob", last_event_id=sent_back) as client:
            assert (await client.next_message()).id == queued_for_bob
    assert await states(sidecar, ids) == [State.SENT, State.SENT, State.ENQUEUED]
    assert await states(sidecar, [bobs]) == [State.DELIVERED]
    async with sidecar.stream("alice", last_event_id=ZERO_ID) as client:
        assert await received_until_fresh(sidecar, client) == ids


async def test_one_connector_cannot_ack_anothers_messages(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_CONNECTORS="web=/io/app/web,other=/io/app/other")
    async with running_sidecar(settings) as sidecar:
        mine = await make_sent(sidecar, "alice", 2)
        queued = await sidecar.send("alice", queued=True)
        ids = [*mine, queued]
        other = {"connector_path": "/io/app/other"}
        assert (await ack(sidecar, {"ids": ids}, **other)).status_code == 204
        assert (await ack(sidecar, {"lastEventId": mine[1]}, **other)).status_code == 204
        (theirs,) = await make_sent(sidecar, "alice", 1, connector="other")
        url = f"{sidecar.public}/io/app/other/sse?userId=alice"
        queued_there = await sidecar.send("alice", "other")
        # An id of another connector's log: no position there. The replay follows the
        # acknowledgement: once it is here, the Last-Event-ID has been applied.
        async with stream_at(sidecar, url, {"Last-Event-ID": mine[1]}) as client:
            assert (await client.next_message()).id == queued_there
        assert await states(sidecar, [*ids, theirs]) == [
            State.SENT,
            State.SENT,
            State.ENQUEUED,
            State.SENT,
        ]
        async with stream_at(sidecar, url, {"Last-Event-ID": theirs}):
            await wait_for_state(sidecar, [theirs], State.DELIVERED)
        assert await states(sidecar, ids) == [State.SENT, State.SENT, State.ENQUEUED]
        assert await states(sidecar, [theirs]) == [State.DELIVERED]
        async with sidecar.stream("alice", last_event_id=ZERO_ID) as client:
            assert await received_until_fresh(sidecar, client) == ids


# --- replay of SENT messages to clients without an id ----------------------------------------


@pytest.mark.parametrize("replay_sent", [True, False])
async def test_replay_sent_setting(tmp_path: Path, replay_sent: bool) -> None:
    env = {"SIDECAR_REPLAY_SENT": "true"} if replay_sent else {}
    async with running_sidecar(settings_for(tmp_path, **env)) as sidecar:
        assert sidecar.running.settings.replay_sent is replay_sent
        s1, s2, s3 = await make_sent(sidecar, "alice", 3)
        assert (await ack(sidecar, {"ids": [s2]})).status_code == 204
        queued = await sidecar.send("alice", queued=True)
        async with sidecar.stream("alice") as client:
            expected = [s1, s3, queued] if replay_sent else [queued]
            assert await received_until_fresh(sidecar, client) == expected


async def test_ack_body_over_16_kib_is_413(sidecar: Sidecar) -> None:
    (sent,) = await make_sent(sidecar, "alice", 1)
    body = json.dumps({"ids": [sent], "pad": "x" * 16 * 1024}).encode()
    assert_error(await ack(sidecar, body), 413)
    assert await states(sidecar, [sent]) == [State.SENT]


async def test_another_tabs_acknowledgement_hides_nothing_from_a_tab_with_a_position(
    sidecar: Sidecar,
) -> None:
    """Issue #13, case 5: a tab was away after s1; meanwhile another tab of the same user
    had s2 and s3 and acknowledged them. The tab comes back from s1 and gets both."""
    s1, s2, s3 = await make_sent(sidecar, "alice", 3)
    async with sidecar.stream("alice", last_event_id=s3):  # the other tab acknowledges
        await wait_for_state(sidecar, [s1, s2, s3], State.DELIVERED)
    async with sidecar.stream("alice", last_event_id=s1) as client:
        assert await received_until_fresh(sidecar, client) == [s2, s3]


async def place_frame(client: SseClient) -> str:
    """The id of the place frame the stream writes next, skipping pings."""
    while True:
        event = await client.next_event()
        assert event.event in ("ping", "place"), event
        if event.event == "place":
            assert event.id is not None
            assert event.data == ""
            return event.id


async def test_a_tab_that_had_seen_nothing_gets_what_another_tab_acknowledged_since(
    sidecar: Sidecar,
) -> None:
    """A fault run's loss: a tab opened before the user's first message, and its connection
    dropped with that message in flight; another tab showed and acknowledged it, and the
    tab, with nothing shown, came back as one that has seen nothing, which gets only what
    is not DELIVERED: it never had the message. A place frame now gives such a tab its
    position when it connects, and it comes back from there."""
    async with sidecar.stream("alice", query=f"&lastEventId={ZERO_ID}") as client:
        before_any_log = await place_frame(client)
    s1 = await sidecar.send("alice")
    async with sidecar.stream("alice", last_event_id=s1):  # the other tab acknowledges
        await wait_for_state(sidecar, [s1], State.DELIVERED)
    async with sidecar.stream("alice", query=f"&lastEventId={ZERO_ID}") as client:
        await place_frame(client)  # a new tab: Tock's rule, nothing (and no s1)
    async with sidecar.stream("alice", query=f"&lastEventId={before_any_log}") as client:
        # From a position: every message after it, and the last one names the tab's place.
        assert (await client.next_message()).id == s1
    at_s1 = s1
    # Once the log exists: placed at its head, past what the replay skipped.
    s2 = await sidecar.send("alice")
    await ack(sidecar, {"ids": [s2]})
    async with sidecar.stream("alice", query=f"&lastEventId={ZERO_ID}") as client:
        at_s2 = await place_frame(client)
    s3 = await sidecar.send("alice")
    await ack(sidecar, {"ids": [s3]})
    for sent_back, expected in ((at_s1, [s2, s3]), (at_s2, [s3])):
        # As a reload sends it, and as EventSource does on its own reconnect.
        reconnect = {"last_event_id": sent_back, "query": f"&lastEventId={ZERO_ID}"}
        for place in ({"query": f"&lastEventId={sent_back}"}, reconnect):
            async with sidecar.stream("alice", **place) as client:
                assert [e.id for e in await client.messages(len(expected))] == expected


async def test_a_place_acknowledges_through_it_and_only_browser_clients_are_told_theirs(
    sidecar: Sidecar,
) -> None:
    s1, s2 = await make_sent(sidecar, "alice", 2)
    async with sidecar.stream("alice", query=f"&lastEventId={ZERO_ID}") as client:
        assert [e.id for e in await client.messages(2)] == [s1, s2]
        place = await place_frame(client)
    assert await states(sidecar, [s1, s2]) == [State.SENT] * 2
    assert (await ack(sidecar, {"lastEventId": place})).status_code == 204
    assert await states(sidecar, [s1, s2]) == [State.DELIVERED] * 2
    # A client that does not send `lastEventId` (EventSource alone, tock-react-kit) is not
    # a browser client: it gets messages and pings only.
    s3 = await sidecar.send("alice")
    async with sidecar.stream("alice") as client:
        assert (await client.next_event()).id == s3
        fresh = await sidecar.send("alice", fresh=True)
        assert (await client.next_event()).id == fresh
