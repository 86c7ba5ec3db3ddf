"""Identity modes end to end: in every mode a user can neither read nor ack another's
messages; cookie minting and CORS credentials; signed tokens and key rotation; trusted
proxy headers; `sidecar token`."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import cast

import httpx
import pytest

from sidecar import cli
from sidecar.identity import COOKIE_NAME
from sidecar.protocol import token
from sidecar.protocol.message import State
from tests.sidecar_harness import Sidecar, SseClient, running_sidecar, settings_for
from tests.test_e2e_ack import ZERO_ID, states, wait_for_state

SECRET_1 = "first shared secret: 32 bytes ok."
SECRET_2 = "second shared secret; also >= 32.."
KEY_1 = token.SigningKey("k1", SECRET_1.encode())
KEY_2 = token.SigningKey("k2", SECRET_2.encode())
ORIGIN = "https://shop.example"


def assert_error(reply: httpx.Response, status: int, code: str | None = None) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error


def mint(user: str, *, key: token.SigningKey = KEY_1, connector: str = "web", ttl: int = 60) -> str:
    return token.mint(key, user, connector, int(time.time()) + ttl)


@dataclasses.dataclass
class Who:
    """How one browser says who it is: extra query parameters and headers on every request,
    and the user id the bot sends to."""

    user_id: str
    query: str = ""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def url(self, sidecar: Sidecar, path: str = "/sse", base: str = "/io/app/web") -> str:
        return f"{sidecar.public}{base}{path}" + (f"?{self.query}" if self.query else "")


@asynccontextmanager
async def open_stream(
    sidecar: Sidecar, url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[tuple[httpx.Response, SseClient]]:
    async with sidecar.client.stream("GET", url, headers=headers or {}) as response:
        assert response.status_code == 200, await response.aread()
        raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
        async with aclosing(raw) as chunks:
            client = SseClient(chunks)
            assert (await client.next_event()).event == "ping"
            yield response, client


async def refused_stream(
    sidecar: Sidecar, url: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    async with sidecar.client.stream("GET", url, headers=headers or {}) as response:
        assert response.status_code != 200, "the stream opened"
        await response.aread()
        return response


async def until_fresh(sidecar: Sidecar, client: SseClient, user_id: str) -> list[str]:
    """Message ids the stream writes before a fresh one sent to `user_id` now."""
    fresh = await sidecar.send(user_id, fresh=True)
    ids: list[str] = []
    while (event := await client.next_message()).id != fresh:
        assert event.id is not None
        ids.append(event.id)
    return ids


async def post_ack(
    sidecar: Sidecar, who: Who, body: object, base: str = "/io/app/web"
) -> httpx.Response:
    return await sidecar.client.post(
        who.url(sidecar, "/sse/ack", base),
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **who.headers},
    )


async def minted_cookie(sidecar: Sidecar, base: str = "/io/app/web") -> tuple[str, str]:
    """Open a stream with no cookie: the user id minted and the whole Set-Cookie value."""
    async with open_stream(sidecar, f"{sidecar.public}{base}/sse") as (response, _):
        set_cookie = response.headers.get_list("set-cookie")
    sidecar.client.cookies.clear()  # every request below says explicitly who it is
    assert len(set_cookie) == 1, set_cookie
    name, _, rest = set_cookie[0].partition("=")
    assert name == COOKIE_NAME
    return rest.partition(";")[0], set_cookie[0]


# --- every mode: B can neither read nor ack A's messages --------------------------------------

MODE_ENV: dict[str, dict[str, str]] = {
    "query": {},
    "cookie": {"SIDECAR_IDENTITY": "cookie"},
    "signed": {
        "SIDECAR_IDENTITY": "signed",
        "SIDECAR_SIGNING_KEYS": f"k1:{SECRET_1},k2:{SECRET_2}",
    },
    "header": {
        "SIDECAR_IDENTITY": "header",
        "SIDECAR_IDENTITY_HEADER": "X-Forwarded-User",
        "SIDECAR_TRUSTED_PROXIES": "127.0.0.1,::1",
    },
}


async def two_users(sidecar: Sidecar, mode: str) -> tuple[Who, Who]:
    """A and B. Wherever the mode allows it, B also names A in `userId`, which must not
    matter."""
    if mode == "query":
        return Who("alice", "userId=alice"), Who("bob", "userId=bob")
    if mode == "cookie":
        (a, _), (b, _) = await minted_cookie(sidecar), await minted_cookie(sidecar)
        assert a != b
        return (
            Who(a, headers={"Cookie": f"{COOKIE_NAME}={a}"}),
            Who(b, f"userId={a}", {"Cookie": f"{COOKIE_NAME}={b}"}),
        )
    if mode == "signed":
        return (
            Who("alice", headers={"Authorization": f"Bearer {mint('alice')}"}),
            Who("bob", f"token={mint('bob', key=KEY_2)}&userId=alice"),
        )
    return (
        Who("alice", headers={"X-Forwarded-User": "alice"}),
        Who("bob", "userId=alice", {"X-Forwarded-User": "bob"}),
    )


@pytest.mark.parametrize("mode", sorted(MODE_ENV))
async def test_user_b_can_neither_read_nor_ack_user_a(tmp_path: Path, mode: str) -> None:
    async with running_sidecar(settings_for(tmp_path, **MODE_ENV[mode])) as sidecar:
        a, b = await two_users(sidecar, mode)
        # Two messages A has seen (SENT), one A has not (ENQUEUED).
        seen = [await sidecar.send(a.user_id, n=n) for n in range(2)]
        async with open_stream(sidecar, a.url(sidecar), a.headers) as (_, client):
            assert [e.id for e in await client.messages(2)] == seen
        await wait_for_state(sidecar, seen, State.SENT)
        queued = await sidecar.send(a.user_id, queued=True)
        ids = [*seen, queued]

        # B's stream, asking for everything and acking everything up to the largest id.
        for last_id in (ZERO_ID, "f" * 24):
            headers = b.headers | {"Last-Event-ID": last_id}
            async with open_stream(sidecar, b.url(sidecar), headers) as (_, client):
                assert await until_fresh(sidecar, client, b.user_id) == []
        # B's acks, by ids and through the largest id.
        assert (await post_ack(sidecar, b, {"ids": ids})).status_code == 204
        assert (await post_ack(sidecar, b, {"lastEventId": "f" * 24})).status_code == 204
        assert await states(sidecar, ids) == [State.SENT, State.SENT, State.ENQUEUED]

        # Nobody at all (naming A where the mode ignores userId): refused, 400 in query mode,
        # which asks for a user id, else 401; except that a cookie-mode stream gets a new
        # identity of its own, with none of A's messages.
        nobody = Who("", "userId=" + a.user_id if mode != "query" else "")
        status = 400 if mode == "query" else 401
        if mode == "cookie":
            url = nobody.url(sidecar)
            async with open_stream(sidecar, url, {"Last-Event-ID": ZERO_ID}) as (response, client):
                new_id = response.headers["set-cookie"].partition("=")[2].partition(";")[0]
                assert new_id not in (a.user_id, b.user_id)
                assert await until_fresh(sidecar, client, new_id) == []
            sidecar.client.cookies.clear()
        else:
            assert_error(await refused_stream(sidecar, nobody.url(sidecar)), status)
        assert_error(await post_ack(sidecar, nobody, {"ids": ids}), status)
        assert await states(sidecar, ids) == [State.SENT, State.SENT, State.ENQUEUED]

        # A still gets all three, and can ack them.
        headers = a.headers | {"Last-Event-ID": ZERO_ID}
        async with open_stream(sidecar, a.url(sidecar), headers) as (_, client):
            assert await until_fresh(sidecar, client, a.user_id) == ids
        assert (await post_ack(sidecar, a, {"ids": ids})).status_code == 204
        assert await states(sidecar, ids) == [State.DELIVERED] * 3


# --- cookie ----------------------------------------------------------------------------------


def cookie_attributes(set_cookie: str) -> dict[str, str]:
    parts = [p.strip() for p in set_cookie.split(";")]
    return {k.lower(): v for k, _, v in (p.partition("=") for p in parts[1:])}


async def test_cookie_minted_with_tocks_attributes_and_reused(tmp_path: Path) -> None:
    async with running_sidecar(settings_for(tmp_path, SIDECAR_IDENTITY="cookie")) as sidecar:
        user_id, set_cookie = await minted_cookie(sidecar)
        assert len(user_id) == 36
        assert cookie_attributes(set_cookie) == {
            "path": "/io/app/web",
            "httponly": "",
            "secure": "",
            "samesite": "None",
        }
        # Reconnecting with it: the same user (a message for it arrives), no new cookie.
        message = await sidecar.send(user_id)
        cookie = {"Cookie": f"{COOKIE_NAME}={user_id}", "Last-Event-ID": ZERO_ID}
        url = f"{sidecar.public}/io/app/web/sse"
        async with open_stream(sidecar, url, cookie) as (response, client):
            assert "set-cookie" not in response.headers
            assert (await client.next_message()).id == message
        # The ack takes the cookie, never mints one, and refuses a request without it.
        reply = await sidecar.client.post(
            f"{url}/ack", json={"ids": [message]}, headers={"Cookie": cookie["Cookie"]}
        )
        assert reply.status_code == 204, reply.text
        assert await states(sidecar, [message]) == [State.DELIVERED]
        other = await sidecar.send(user_id)
        for headers in ({}, {"Cookie": "other=1"}, {"Cookie": f"{COOKIE_NAME}="}):
            reply = await sidecar.client.post(
                f"{url}/ack?userId={user_id}", json={"ids": [other]}, headers=headers
            )
            assert_error(reply, 401, "missing_cookie")
            assert "set-cookie" not in reply.headers
        assert await states(sidecar, [other]) == [State.ENQUEUED]


async def test_cookie_max_age_and_path_from_tock_settings(tmp_path: Path) -> None:
    env = {
        "SIDECAR_IDENTITY": "cookie",
        "tock_web_cookie_auth_max_age": "86400",
        "tock_web_cookie_auth_path": "/io",
    }
    async with running_sidecar(settings_for(tmp_path, **env)) as sidecar:
        user_id, set_cookie = await minted_cookie(sidecar)
        assert cookie_attributes(set_cookie) == {
            "max-age": "86400",
            "path": "/io",
            "httponly": "",
            "secure": "",
            "samesite": "None",
        }
        # With a Max-Age the cookie is refreshed on every stream, as Tock does; same value.
        url = f"{sidecar.public}/io/app/web/sse"
        async with open_stream(sidecar, url, {"Cookie": f"{COOKIE_NAME}={user_id}"}) as (r, _):
            assert r.headers.get_list("set-cookie") == [set_cookie]


async def test_cookie_mode_allows_credentials_for_its_connector_only(tmp_path: Path) -> None:
    env = {
        "SIDECAR_CONNECTORS": "web=/io/app/web,open=/io/app/open",
        "SIDECAR_IDENTITY": "query,web=cookie",
    }
    async with running_sidecar(settings_for(tmp_path, **env)) as sidecar:
        user_id, _ = await minted_cookie(sidecar)
        cookie = {"Cookie": f"{COOKIE_NAME}={user_id}", "Origin": ORIGIN}
        url = f"{sidecar.public}/io/app/web/sse"
        async with open_stream(sidecar, url, cookie) as (response, _):
            assert response.headers["access-control-allow-origin"] == ORIGIN
            assert response.headers["access-control-allow-credentials"] == "true"
        reply = await sidecar.client.post(f"{url}/ack", json={"ids": []}, headers=cookie)
        assert reply.status_code == 204, reply.text
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        assert reply.headers["access-control-allow-credentials"] == "true"
        # A refused ack is readable by the page too.
        reply = await sidecar.client.post(f"{url}/ack", json={}, headers={"Origin": ORIGIN})
        assert_error(reply, 401, "missing_cookie")
        assert reply.headers["access-control-allow-credentials"] == "true"
        preflight = await sidecar.client.options(
            f"{url}/ack",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert preflight.headers["access-control-allow-credentials"] == "true"
        # The query-mode connector keeps credentials off; neither mode ever answers "*".
        open_url = f"{sidecar.public}/io/app/open/sse?userId=alice"
        async with open_stream(sidecar, open_url, {"Origin": ORIGIN}) as (response, _):
            assert response.headers["access-control-allow-origin"] == ORIGIN
            assert "access-control-allow-credentials" not in response.headers
            assert "set-cookie" not in response.headers


async def test_cookie_routes_refuse_origins_the_cors_pattern_does_not_let_in(
    tmp_path: Path,
) -> None:
    """A browser sends the cookie with a request from any site; CORS only keeps that site
    from reading the answer. So another site could make a visitor's browser acknowledge
    every message (a text/plain POST needs no preflight) or open their stream and have
    messages marked SENT that nobody reads. Cookie routes refuse such requests."""
    settings = settings_for(
        tmp_path, SIDECAR_IDENTITY="cookie", SIDECAR_CORS_PATTERN=r"https://good\.example"
    )
    async with running_sidecar(settings) as sidecar:
        user_id, _ = await minted_cookie(sidecar)
        cookie = {"Cookie": f"{COOKIE_NAME}={user_id}"}
        url = f"{sidecar.public}/io/app/web/sse"
        message = await sidecar.send(user_id)
        async with open_stream(sidecar, url, cookie) as (_, client):
            assert (await client.next_message()).id == message
        await wait_for_state(sidecar, [message], State.SENT)
        forged = json.dumps({"lastEventId": message})
        for origin in ("https://evil.example", "null"):
            reply = await sidecar.client.post(
                f"{url}/ack",
                content=forged,
                headers={**cookie, "Origin": origin, "Content-Type": "text/plain"},
            )
            assert reply.status_code == 403, reply.text
            assert reply.json()["error"]["code"] == "origin_not_allowed"
            queued = await sidecar.send(user_id)
            refused = await refused_stream(sidecar, url, {**cookie, "Origin": origin})
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"]["code"] == "origin_not_allowed"
            assert "set-cookie" not in refused.headers
            assert await states(sidecar, [message, queued]) == [State.SENT, State.ENQUEUED]
        # The pattern's origins and the sidecar's own pages are let in.
        host = sidecar.public.removeprefix("http://")
        for origin in ("https://good.example", f"http://{host}"):
            async with open_stream(sidecar, url, {**cookie, "Origin": origin}):
                pass
            reply = await sidecar.client.post(
                f"{url}/ack",
                content=forged,
                headers={**cookie, "Origin": origin, "Content-Type": "application/json"},
            )
            assert reply.status_code == 204, reply.text
        assert await states(sidecar, [message]) == [State.DELIVERED]


# Fetch metadata (Sec-Fetch-*) as browsers send it for each way a page can have them ask
# for a URL. EventSource and fetch() say cors/empty, with Sec-Fetch-Site and, from another
# origin, an Origin.
IMG = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
IFRAME = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}
LINK = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
SAME_ORIGIN_FETCH = {
    "Sec-Fetch-Site": "same-origin",
    "Sec-Fetch-Mode": "cors",
    "Sec-Fetch-Dest": "empty",
}
CROSS_SITE_FETCH = SAME_ORIGIN_FETCH | {"Sec-Fetch-Site": "cross-site", "Origin": ORIGIN}
FORGED_ACK = json.dumps({"lastEventId": "f" * 24})


async def test_cookie_routes_refuse_what_an_img_or_an_iframe_sends(tmp_path: Path) -> None:
    """The audit's attack: a page on any site loads
    `<img src=".../sse?lastEventId=ffffffffffffffffffffffff">` (or an iframe, or a link);
    the browser sends the SameSite=None cookie and no Origin, and every SENT message of
    the user would be acknowledged. Fetch metadata tells such requests apart from
    EventSource and fetch(), whatever the CORS pattern (the default here)."""
    async with running_sidecar(settings_for(tmp_path, SIDECAR_IDENTITY="cookie")) as sidecar:
        user_id, _ = await minted_cookie(sidecar)
        cookie = {"Cookie": f"{COOKIE_NAME}={user_id}"}
        url = f"{sidecar.public}/io/app/web/sse"
        message = await sidecar.send(user_id)
        async with open_stream(sidecar, url, cookie | SAME_ORIGIN_FETCH) as (_, client):
            assert (await client.next_message()).id == message
        await wait_for_state(sidecar, [message], State.SENT)
        same_origin_img = IMG | {"Sec-Fetch-Site": "same-origin"}
        address_bar = LINK | {"Sec-Fetch-Site": "none"}
        for fetch in (IMG, IFRAME, LINK, same_origin_img, address_bar):
            refused = await refused_stream(sidecar, f"{url}?lastEventId={'f' * 24}", cookie | fetch)
            assert_error(refused, 403, "fetch_not_allowed")
            assert "set-cookie" not in refused.headers
        # A form another site posts (navigate), or a no-cors fetch(): an Origin the
        # pattern lets in, but not what the browser client sends.
        form = LINK | {"Origin": "https://evil.example", "Sec-Fetch-Dest": "iframe"}
        no_cors = CROSS_SITE_FETCH | {"Sec-Fetch-Mode": "no-cors"}
        for fetch in (form, no_cors, same_origin_img):
            reply = await sidecar.client.post(
                f"{url}/ack",
                content=FORGED_ACK,
                headers=cookie | fetch | {"Content-Type": "text/plain"},
            )
            assert_error(reply, 403, "fetch_not_allowed")
        assert await states(sidecar, [message]) == [State.SENT]
        # What EventSource and fetch() send is served, from the sidecar's own pages and
        # from another origin alike; so is a request with no fetch metadata at all (an
        # older browser, or no browser), judged by its Origin alone as before.
        for fetch in (SAME_ORIGIN_FETCH, CROSS_SITE_FETCH, {}):
            async with open_stream(sidecar, url, cookie | fetch):
                pass
            reply = await sidecar.client.post(
                f"{url}/ack", json={"ids": []}, headers=cookie | fetch
            )
            assert reply.status_code == 204, reply.text
        reply = await sidecar.client.post(
            f"{url}/ack",
            content=json.dumps({"lastEventId": message}),
            headers=cookie | CROSS_SITE_FETCH | {"Content-Type": "text/plain"},
        )
        assert reply.status_code == 204, reply.text
        assert await states(sidecar, [message]) == [State.DELIVERED]


async def test_a_request_from_another_site_must_say_its_origin(tmp_path: Path) -> None:
    # No browser sends a cors request from another site without an Origin; one that says
    # it comes from another site and not from where is not believed to be let in.
    settings = settings_for(
        tmp_path, SIDECAR_IDENTITY="cookie", SIDECAR_CORS_PATTERN=r"https://shop\.example"
    )
    async with running_sidecar(settings) as sidecar:
        user_id, _ = await minted_cookie(sidecar)
        headers = {"Cookie": f"{COOKIE_NAME}={user_id}"} | SAME_ORIGIN_FETCH
        url = f"{sidecar.public}/io/app/web/sse"
        for site in ("cross-site", "same-site", "none"):
            fetch = headers | {"Sec-Fetch-Site": site}
            assert_error(await refused_stream(sidecar, url, fetch), 403, "origin_not_allowed")
            reply = await sidecar.client.post(f"{url}/ack", json={"ids": []}, headers=fetch)
            assert_error(reply, 403, "origin_not_allowed")
            async with open_stream(sidecar, url, fetch | {"Origin": ORIGIN}):
                pass


@pytest.mark.parametrize(
    ("env", "warned"),
    [
        ({"SIDECAR_IDENTITY": "cookie"}, True),
        ({"SIDECAR_CORS_CREDENTIALS": "true", "SIDECAR_CORS_PATTERN": "https://.*"}, True),
        ({"SIDECAR_IDENTITY": "cookie", "SIDECAR_CORS_PATTERN": r"https://good\.example"}, False),
        ({}, False),  # query identity: no credentials
    ],
)
async def test_start_up_warns_when_any_site_may_read_credentialed_streams(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, env: dict[str, str], warned: bool
) -> None:
    async with running_sidecar(settings_for(tmp_path, **env)):
        pass
    warnings = [r for r in caplog.records if "SIDECAR_CORS_PATTERN" in r.getMessage()]
    assert len(warnings) == warned


# --- signed ----------------------------------------------------------------------------------


def signed_env(keys: str = f"k1:{SECRET_1},k2:{SECRET_2}", **extra: str) -> dict[str, str]:
    return {"SIDECAR_IDENTITY": "signed", "SIDECAR_SIGNING_KEYS": keys, **extra}


def tampered(value: str) -> str:
    """The same token claiming to be for "mallory"."""
    version, key_id, _, mac = value.split(".")
    payload = json.dumps({"sub": "mallory", "cid": "web", "exp": int(time.time()) + 60})
    encoded = base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode()
    return ".".join([version, key_id, encoded, mac])


def signed_claims(sub: str) -> str:
    """A token for `sub` on `web`, signed with k1, its payload made by `json.dumps` as the
    README's Python snippet makes it (a lone surrogate becomes the escape `\\ud800`)."""
    claims = {"sub": sub, "cid": "web", "exp": int(time.time()) + 60}
    signed = f"v1.k1.{b64(json.dumps(claims).encode())}"
    mac = hmac.new(SECRET_1.encode(), signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{b64(mac)}"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


BAD_TOKENS: list[tuple[str, Callable[[], str], str]] = [
    ("expired", lambda: mint("alice", ttl=-1), "token_expired"),
    ("tampered", lambda: tampered(mint("alice")), "token_invalid"),
    ("wrong-connector", lambda: mint("alice", connector="admin"), "token_invalid"),
    ("unknown-key", lambda: mint("alice", key=token.SigningKey("k3", KEY_1.secret)),
     "token_invalid"),
    ("malformed", lambda: "v1.k1.nope", "token_invalid"),
    # Signed, but the sub is no user id (the rule every user id follows).
    ("lone-surrogate-sub", lambda: signed_claims("\ud800"), "token_invalid"),
    ("control-character-sub", lambda: signed_claims("alice\nbob"), "token_invalid"),
    ("too-long-sub", lambda: signed_claims("u" * 513), "token_invalid"),
    ("empty-sub", lambda: signed_claims(""), "token_invalid"),
]  # fmt: skip


async def test_signed_tokens_by_query_and_by_header(tmp_path: Path) -> None:
    env = signed_env(SIDECAR_CONNECTORS="web=/io/app/web,admin=/admin")
    async with running_sidecar(settings_for(tmp_path, **env)) as sidecar:
        url = f"{sidecar.public}/io/app/web/sse"
        message = await sidecar.send("alice")
        for where in ("query", "header"):
            value = mint("alice")
            who = (
                Who("alice", f"token={value}")
                if where == "query"
                else Who("alice", headers={"Authorization": f"Bearer {value}"})
            )
            headers = who.headers | {"Last-Event-ID": ZERO_ID}
            async with open_stream(sidecar, who.url(sidecar), headers) as (_, client):
                assert (await client.next_message()).id == message
            assert (await post_ack(sidecar, who, {"ids": []})).status_code == 204
        assert_error(await refused_stream(sidecar, f"{url}?userId=alice"), 401, "missing_token")
        # A token for the admin connector works there, and there only.
        admin = Who("alice", f"token={mint('alice', connector='admin')}")
        assert (await post_ack(sidecar, admin, {"ids": []}, base="/admin")).status_code == 204


@pytest.mark.parametrize("where", ["query", "header"])
@pytest.mark.parametrize(
    ("make", "code"), [row[1:] for row in BAD_TOKENS], ids=[row[0] for row in BAD_TOKENS]
)
async def test_bad_tokens_are_401(
    tmp_path: Path, where: str, make: Callable[[], str], code: str
) -> None:
    env = signed_env(SIDECAR_CONNECTORS="web=/io/app/web,admin=/admin")
    async with running_sidecar(settings_for(tmp_path, **env)) as sidecar:
        (message,) = await make_sent(sidecar)
        value = make()
        who = (
            Who("alice", f"token={value}&userId=alice")
            if where == "query"
            else Who("alice", "userId=alice", {"Authorization": f"Bearer {value}"})
        )
        assert_error(await refused_stream(sidecar, who.url(sidecar), who.headers), 401, code)
        assert_error(await post_ack(sidecar, who, {"ids": [message]}), 401, code)
        assert_error(await post_ack(sidecar, who, {"lastEventId": message}), 401, code)
        assert await states(sidecar, [message]) == [State.SENT]


async def make_sent(sidecar: Sidecar) -> list[str]:
    """One message for alice, streamed once with a valid token (so SENT)."""
    message = await sidecar.send("alice")
    who = Who("alice", f"token={mint('alice')}")
    async with open_stream(sidecar, who.url(sidecar)) as (_, client):
        assert (await client.next_message()).id == message
    await wait_for_state(sidecar, [message], State.SENT)
    return [message]


async def test_key_rotation(tmp_path: Path) -> None:
    old, new = mint("alice", key=KEY_1), mint("alice", key=KEY_2)
    # Both keys configured, the new one first (it signs): tokens of either verify.
    settings = settings_for(tmp_path, **signed_env(f"k2:{SECRET_2},k1:{SECRET_1}"))
    async with running_sidecar(settings) as sidecar:
        for value in (old, new):
            who = Who("alice", f"token={value}")
            async with open_stream(sidecar, who.url(sidecar)):
                pass
            assert (await post_ack(sidecar, who, {"ids": []})).status_code == 204
    # The old key removed: its tokens no longer do.
    settings = settings_for(tmp_path, **signed_env(f"k2:{SECRET_2}"))
    async with running_sidecar(settings) as sidecar:
        who = Who("alice", f"token={old}")
        assert_error(await refused_stream(sidecar, who.url(sidecar)), 401, "token_invalid")
        assert_error(await post_ack(sidecar, who, {"ids": []}), 401, "token_invalid")
        async with open_stream(sidecar, Who("alice", f"token={new}").url(sidecar)):
            pass


async def test_per_connector_override(tmp_path: Path) -> None:
    env = signed_env(
        SIDECAR_CONNECTORS="web=/io/app/web,admin=/admin", SIDECAR_IDENTITY="signed,admin=query"
    )
    async with running_sidecar(settings_for(tmp_path, **env)) as sidecar:
        assert_error(
            await refused_stream(sidecar, f"{sidecar.public}/io/app/web/sse?userId=alice"),
            401,
            "missing_token",
        )
        async with open_stream(sidecar, f"{sidecar.public}/admin/sse?userId=alice"):
            pass


async def test_sidecar_token_command_output_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SIDECAR_SIGNING_KEYS", f"k2:{SECRET_2},k1:{SECRET_1}")
    assert cli.main(["token", "--user", "alice", "--connector", "web"]) == 0
    from_env = capsys.readouterr().out.strip()
    assert from_env.startswith("v1.k2.")
    flag = ["--signing-keys", f"k1:{SECRET_1}", "--ttl-seconds", "30"]
    assert cli.main(["token", "--user", "alice", "--connector", "web", *flag]) == 0
    from_flag = capsys.readouterr().out.strip()
    assert from_flag.startswith("v1.k1.")
    now = time.time()
    assert token.verify(from_flag, [KEY_1], "web", now + 25) == "alice"
    with pytest.raises(token.TokenError):
        token.verify(from_flag, [KEY_1], "web", now + 35)
    async with running_sidecar(settings_for(tmp_path, **signed_env())) as sidecar:
        message = await sidecar.send("alice")
        for value in (from_env, from_flag):
            who = Who("alice", f"token={value}", {"Last-Event-ID": ZERO_ID})
            async with open_stream(sidecar, who.url(sidecar), who.headers) as (_, client):
                assert (await client.next_message()).id == message


@pytest.mark.parametrize(
    "args",
    [
        ["--signing-keys", ""],
        ["--signing-keys", "k1:short"],
        ["--signing-keys", f"k1:{SECRET_1}", "--ttl-seconds", "0"],
        ["--signing-keys", f"k1:{SECRET_1}", "--user", ""],
        ["--signing-keys", f"k1:{SECRET_1}", "--user", "ali\nce"],
        ["--signing-keys", f"k1:{SECRET_1}", "--user", "a" * 513],
    ],
)
def test_sidecar_token_command_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    monkeypatch.delenv("SIDECAR_SIGNING_KEYS", raising=False)
    assert cli.main(["token", "--user", "alice", "--connector", "web", *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "short" not in err


def test_sidecar_token_command_without_keys(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SIDECAR_SIGNING_KEYS", raising=False)
    assert cli.main(["token", "--user", "alice", "--connector", "web"]) == 2
    assert "SIDECAR_SIGNING_KEYS" in capsys.readouterr().err


# --- header ----------------------------------------------------------------------------------


def header_env(proxies: str) -> dict[str, str]:
    return {
        "SIDECAR_IDENTITY": "header",
        "SIDECAR_IDENTITY_HEADER": "X-Forwarded-User",
        "SIDECAR_TRUSTED_PROXIES": proxies,
    }


async def test_header_mode_from_a_trusted_proxy(tmp_path: Path) -> None:
    async with running_sidecar(settings_for(tmp_path, **header_env("127.0.0.0/8"))) as sidecar:
        message = await sidecar.send("alice")
        who = Who("alice", "userId=bob", {"x-forwarded-user": "alice", "Last-Event-ID": ZERO_ID})
        async with open_stream(sidecar, who.url(sidecar), who.headers) as (_, client):
            assert (await client.next_message()).id == message
        assert (await post_ack(sidecar, who, {"ids": [message]})).status_code == 204
        assert await states(sidecar, [message]) == [State.DELIVERED]
        no_header = Who("alice", "userId=alice")
        assert_error(await refused_stream(sidecar, no_header.url(sidecar)), 401)
        assert_error(await post_ack(sidecar, no_header, {"ids": []}), 401)


async def test_header_mode_from_an_untrusted_peer(tmp_path: Path) -> None:
    async with running_sidecar(settings_for(tmp_path, **header_env("10.0.0.0/8"))) as sidecar:
        message = await sidecar.send("alice")
        who = Who("alice", "userId=alice", {"X-Forwarded-User": "alice"})
        reply = await refused_stream(sidecar, who.url(sidecar), who.headers)
        assert_error(reply, 401, "untrusted_peer")
        assert_error(await post_ack(sidecar, who, {"ids": [message]}), 401, "untrusted_peer")
        assert await states(sidecar, [message]) == [State.ENQUEUED]
