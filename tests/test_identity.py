"""Identity without HTTP: modes and their settings, the request view, `resolve` per mode."""

from __future__ import annotations

import ipaddress
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar import cli
from sidecar.config import ConfigError, Connector, Settings
from sidecar.identity import (
    COOKIE_NAME,
    Headers,
    IdentityError,
    Mode,
    Modes,
    Policy,
    RequestView,
    parse_cookies,
    parse_modes,
    parse_networks,
    policy_for,
    resolve,
    user_id_problem,
)
from sidecar.protocol import token
from tests.protocol.test_token import forge

SECRET = "0123456789abcdef0123456789abcdef"
KEY = token.SigningKey("k1", SECRET.encode())
NOW = 1_700_000_000


def view(
    query: dict[str, str] | None = None,
    headers: list[tuple[str, str]] | None = None,
    client: str | None = "127.0.0.1",
) -> RequestView:
    return RequestView.build(query or {}, headers or [], client)


def refused(policy: Policy, request: RequestView, **kwargs: bool) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        resolve(policy, request, now=NOW, **kwargs)
    return info.value


# --- SIDECAR_IDENTITY and friends ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "modes"),
    [
        ("query", Modes(Mode.QUERY)),
        (" cookie ", Modes(Mode.COOKIE)),
        ("signed,admin=query", Modes(Mode.SIGNED, (("admin", Mode.QUERY),))),
        ("admin = header , signed", Modes(Mode.SIGNED, (("admin", Mode.HEADER),))),
        ("a=cookie,b=signed", Modes(Mode.QUERY, (("a", Mode.COOKIE), ("b", Mode.SIGNED)))),
    ],
)
def test_parse_modes(raw: str, modes: Modes) -> None:
    assert parse_modes(raw) == modes


def test_mode_of_a_connector() -> None:
    modes = parse_modes("signed,admin=query")
    assert modes.of("admin") is Mode.QUERY
    assert modes.of("web") is Mode.SIGNED


def test_parse_networks() -> None:
    assert parse_networks("") == ()
    assert parse_networks(" 127.0.0.1 , 10.0.0.0/8,::1, 192.168.1.7/24") == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.168.1.0/24"),
    )


def load(**env: str) -> Settings:
    return Settings.load({"SIDECAR_CONNECTORS": "web=/io/app/web,admin=/admin"} | env)


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"SIDECAR_IDENTITY": "query,nope=cookie"}, "SIDECAR_IDENTITY"),
        ({"SIDECAR_IDENTITY": "bogus"}, "SIDECAR_IDENTITY"),
        ({"SIDECAR_IDENTITY": "signed"}, "SIDECAR_SIGNING_KEYS"),
        ({"SIDECAR_IDENTITY": "admin=signed"}, "SIDECAR_SIGNING_KEYS"),
        ({"SIDECAR_IDENTITY": "signed", "SIDECAR_SIGNING_KEYS": "k1:short"},
         "SIDECAR_SIGNING_KEYS"),
        ({"SIDECAR_IDENTITY": "signed", "SIDECAR_SIGNING_KEYS": f"k1:{SECRET},k2:{SECRET[:31]}"},
         "SIDECAR_SIGNING_KEYS"),
        ({"SIDECAR_IDENTITY": "header", "SIDECAR_TRUSTED_PROXIES": "127.0.0.1"},
         "SIDECAR_IDENTITY_HEADER"),
        ({"SIDECAR_IDENTITY": "header", "SIDECAR_IDENTITY_HEADER": "X-User"},
         "SIDECAR_TRUSTED_PROXIES"),
        ({"SIDECAR_IDENTITY": "query,admin=header", "SIDECAR_IDENTITY_HEADER": "X-User"},
         "SIDECAR_TRUSTED_PROXIES"),
        ({"SIDECAR_IDENTITY": "header", "SIDECAR_IDENTITY_HEADER": "X-User",
          "SIDECAR_TRUSTED_PROXIES": "localhost"}, "SIDECAR_TRUSTED_PROXIES"),
        ({"SIDECAR_COOKIE_MAX_AGE": "0"}, "SIDECAR_COOKIE_MAX_AGE"),
        ({"tock_web_cookie_auth_path": "/a;b"}, "tock_web_cookie_auth_path"),
    ],
)  # fmt: skip
def test_config_errors_are_one_line_naming_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**env)
    text = str(info.value)
    assert text.startswith(f"{setting}: ")
    assert text.isprintable()
    assert SECRET[:31] not in text
    assert "short" not in text


def test_valid_identity_settings() -> None:
    settings = load(
        SIDECAR_IDENTITY="signed,admin=header",
        SIDECAR_SIGNING_KEYS=f"new:{SECRET},old:{SECRET[::-1]}",
        SIDECAR_IDENTITY_HEADER="X-Forwarded-User",
        SIDECAR_TRUSTED_PROXIES="10.0.0.0/8",
        tock_web_cookie_auth_max_age="-1",
        tock_web_cookie_auth_path="/",
    )
    assert settings.identity == Modes(Mode.SIGNED, (("admin", Mode.HEADER),))
    assert [k.id for k in settings.signing_keys] == ["new", "old"]
    assert settings.cookie_max_age is None
    assert settings.cookie_path == "/"
    web = policy_for(settings, Connector("web", "/io/app/web"))
    admin = policy_for(settings, Connector("admin", "/admin"))
    assert (web.mode, admin.mode) == (Mode.SIGNED, Mode.HEADER)
    assert admin.header == "X-Forwarded-User"
    assert admin.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    defaults = load()
    assert defaults.identity == Modes(Mode.QUERY)
    assert defaults.signing_keys == ()
    assert defaults.identity_header is None
    assert defaults.trusted_proxies == ()
    assert defaults.cookie_max_age is None
    assert defaults.cookie_path is None
    # The cookie path defaults to the connector's base path, as Tock does.
    assert policy_for(defaults, Connector("web", "/io/app/web")).cookie_path == "/io/app/web"


def test_cli_refuses_a_short_secret_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SIDECAR_IDENTITY", "signed")
    monkeypatch.setenv("SIDECAR_SIGNING_KEYS", "k1:tooshort")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "SIDECAR_SIGNING_KEYS" in err
    assert "tooshort" not in err


# --- the request view ------------------------------------------------------------------------


def test_headers_are_case_insensitive_and_keep_repeats() -> None:
    headers = Headers([("X-User", "a"), ("x-user", "b"), ("Other", "c")])
    assert headers["X-USER"] == "a, b"
    assert headers.all("x-User") == ["a", "b"]
    assert headers.all("missing") == []
    assert headers.get("OTHER") == "c"
    assert headers.get("missing") is None
    assert "oTher" in headers
    assert 7 not in headers
    assert sorted(headers) == ["other", "x-user"]
    assert len(headers) == 2


@pytest.mark.parametrize(
    ("values", "cookies"),
    [
        ([], {}),
        (["a=1"], {"a": "1"}),
        (["a=1; b=2", "c=3"], {"a": "1", "b": "2", "c": "3"}),
        ([' a = 1 ;b="q v";;flag; =x'], {"a": "1", "b": "q v"}),
        (["a=first; a=second"], {"a": "first"}),
        (["a="], {"a": ""}),
    ],
)
def test_parse_cookies(values: list[str], cookies: dict[str, str]) -> None:
    assert parse_cookies(values) == cookies


def test_view_reads_cookies_from_every_cookie_header() -> None:
    request = view(headers=[("Cookie", "x=1"), ("cookie", f"{COOKIE_NAME}=u1")])
    assert request.cookies == {"x": "1", COOKIE_NAME: "u1"}


# --- query -----------------------------------------------------------------------------------

QUERY = Policy("web", Mode.QUERY)


def test_query_mode() -> None:
    assert resolve(QUERY, view({"userId": "alice"})).user_id == "alice"
    assert resolve(QUERY, view({"userid": "bob"})).user_id == "bob"
    assert resolve(QUERY, view({"userId": "alice"})).set_cookie is None
    assert refused(QUERY, view()).status == 400
    assert refused(QUERY, view({"userId": "u" * 513})).code == "invalid_user_id"
    for control in ("a\nb", "a\x00", "\x7f", "a\x85b"):
        assert refused(QUERY, view({"userId": control})).code == "invalid_user_id"
    assert resolve(QUERY, view({"userId": "josé ü 名前"})).user_id == "josé ü 名前"
    # Both spellings: one user, or a 400 (not a guess, nor an unchecked second id).
    assert resolve(QUERY, view({"userId": "al", "userid": "al"})).user_id == "al"
    for other in ("bob", "u" * 513, ""):
        refusal = refused(QUERY, view({"userId": "al", "userid": other}))
        assert refusal.code == "invalid_user_id"
    # Other modes' credentials mean nothing here.
    cookie = [("Cookie", f"{COOKIE_NAME}=alice")]
    assert refused(QUERY, view(headers=cookie)).code == "missing_user_id"


# --- cookie ----------------------------------------------------------------------------------

COOKIE = Policy("web", Mode.COOKIE, cookie_path="/io/app/web")


def cookie_header(value: str) -> list[tuple[str, str]]:
    return [("Cookie", f"other=1; {COOKIE_NAME}={value}")]


def test_cookie_mode_mints_only_for_the_stream() -> None:
    minted = resolve(COOKIE, view({"userId": "alice"}), mint_cookie=True)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        minted.user_id)  # fmt: skip
    assert minted.set_cookie == (
        f"{COOKIE_NAME}={minted.user_id}; Path=/io/app/web; HttpOnly; Secure; SameSite=None"
    )
    again = resolve(COOKIE, view(), mint_cookie=True)
    assert again.user_id != minted.user_id
    error = refused(COOKIE, view({"userId": "alice"}))
    assert (error.status, error.code) == (401, "missing_cookie")


def test_cookie_mode_reuses_the_cookie() -> None:
    request = view({"userId": "mallory"}, cookie_header("u-1"))
    assert resolve(COOKIE, request) == resolve(COOKIE, request, mint_cookie=True)
    assert resolve(COOKIE, request).user_id == "u-1"
    assert resolve(COOKIE, request, mint_cookie=True).set_cookie is None


def test_cookie_with_max_age_is_refreshed_on_the_stream() -> None:
    policy = Policy("web", Mode.COOKIE, cookie_max_age=3600, cookie_path="/")
    stream = resolve(policy, view(headers=cookie_header("u-1")), mint_cookie=True)
    assert stream.user_id == "u-1"
    assert stream.set_cookie == (
        f"{COOKIE_NAME}=u-1; Max-Age=3600; Path=/; HttpOnly; Secure; SameSite=None"
    )
    assert resolve(policy, view(headers=cookie_header("u-1"))).set_cookie is None


@pytest.mark.parametrize("value", ["", "a b", "a\\b", "é", "u" * 513, '"a,b"'])
def test_invalid_cookie_is_replaced_on_the_stream_and_refused_on_ack(value: str) -> None:
    request = view(headers=cookie_header(value))
    assert refused(COOKIE, request).code == "missing_cookie"
    minted = resolve(COOKIE, request, mint_cookie=True)
    assert minted.user_id != value
    assert minted.set_cookie is not None


# --- signed ----------------------------------------------------------------------------------

OLD = token.SigningKey("old", b"an old secret, rotated out soon..")
SIGNED = Policy("web", Mode.SIGNED, signing_keys=(KEY, OLD))


def good(user: str = "alice", key: token.SigningKey = KEY, connector: str = "web") -> str:
    return token.mint(key, user, connector, NOW + 60)


def test_signed_mode_by_query_and_by_header() -> None:
    assert resolve(SIGNED, view({"token": good()}), now=NOW).user_id == "alice"
    auth = [("Authorization", f"Bearer {good('bob')}")]
    assert resolve(SIGNED, view(headers=auth), now=NOW).user_id == "bob"
    auth = [("authorization", f"  bearer   {good('bob')} ")]
    assert resolve(SIGNED, view(headers=auth), now=NOW).user_id == "bob"
    # The header wins over the query; userId means nothing.
    auth = [("Authorization", f"Bearer {good('bob')}")]
    request = view({"token": good("alice"), "userId": "carol"}, auth)
    assert resolve(SIGNED, request, now=NOW).user_id == "bob"
    # Another scheme is ignored, the query parameter is used.
    basic = [("Authorization", "Basic YTpi")]
    assert resolve(SIGNED, view({"token": good()}, basic), now=NOW).user_id == "alice"
    # Every configured key verifies.
    assert resolve(SIGNED, view({"token": good(key=OLD)}), now=NOW).user_id == "alice"


@pytest.mark.parametrize(
    ("request_view", "code"),
    [
        (view(), "missing_token"),
        (view({"userId": "alice"}), "missing_token"),
        (view({"token": ""}), "missing_token"),
        (view(headers=[("Authorization", "Bearer ")]), "missing_token"),
        (view({"token": good(connector="admin")}), "token_invalid"),
        (view({"token": good(key=token.SigningKey("k9", KEY.secret))}), "token_invalid"),
        (view({"token": good()[:-2]}), "token_invalid"),
        (view({"token": token.mint(KEY, "alice", "web", NOW)}), "token_expired"),
        (view({"token": "garbage"}), "token_invalid"),
    ],
    ids=["none", "user-id-only", "empty", "empty-bearer", "other-connector", "unknown-key",
         "tampered", "expired", "garbage"],
)  # fmt: skip
def test_signed_mode_refuses(request_view: RequestView, code: str) -> None:
    for mint in (False, True):
        error = refused(SIGNED, request_view, mint_cookie=mint)
        assert (error.status, error.code) == (401, code)


@pytest.mark.parametrize("sub", ["", "u" * 513, "a\nb", "\x00", "a\x9b", "\ud800", "\udfffx"])
def test_signed_mode_refuses_a_sub_that_is_no_user_id(sub: str) -> None:
    # Signed all right, but held to the rule of every user id.
    claims = json.dumps({"sub": sub, "cid": "web", "exp": NOW + 60}).encode()
    error = refused(SIGNED, view({"token": forge(KEY, claims)}))
    assert (error.status, error.code) == (401, "token_invalid")
    assert "sub" in error.message


@pytest.mark.parametrize(
    ("user_id", "problem"),
    [
        ("alice", None),
        ("zoë 🙂", None),
        ("u" * 512, None),
        ("", "is empty"),
        ("u" * 513, "is longer than 512 characters"),
        ("a\tb", "has control characters"),
        ("\x7f", "has control characters"),
        ("\x85", "has control characters"),
        ("\ud800", "is not valid Unicode"),
        ("a\udc80", "is not valid Unicode"),
    ],
)
def test_the_user_id_rule(user_id: str, problem: str | None) -> None:
    assert user_id_problem(user_id) == problem


# --- header ----------------------------------------------------------------------------------

HEADER = Policy(
    "web",
    Mode.HEADER,
    header="X-Forwarded-User",
    trusted_proxies=parse_networks("127.0.0.1,10.0.0.0/8,fd00::/8"),
)


@pytest.mark.parametrize("client", ["127.0.0.1", "10.1.2.3", "::ffff:10.0.0.1", "fd00::1%eth0"])
def test_header_mode_from_a_trusted_proxy(client: str) -> None:
    request = view({"userId": "mallory"}, [("x-forwarded-user", " alice ")], client)
    assert resolve(HEADER, request).user_id == "alice"
    # Header bytes arrive one character each (latin-1); the proxy sent UTF-8.
    utf8 = "josé 名前".encode().decode("latin-1")
    request = view({}, [("x-forwarded-user", utf8)], client)
    assert resolve(HEADER, request).user_id == "josé 名前"


@pytest.mark.parametrize(
    ("client", "headers", "code"),
    [
        ("192.168.0.1", [("X-Forwarded-User", "alice")], "untrusted_peer"),
        ("11.0.0.1", [("X-Forwarded-User", "alice")], "untrusted_peer"),
        ("::1", [("X-Forwarded-User", "alice")], "untrusted_peer"),
        (None, [("X-Forwarded-User", "alice")], "untrusted_peer"),
        ("/run/sidecar.sock", [("X-Forwarded-User", "alice")], "untrusted_peer"),
        ("127.0.0.1", [], "missing_identity_header"),
        ("127.0.0.1", [("X-Forwarded-User", "  ")], "missing_identity_header"),
        ("127.0.0.1", [("X-Forwarded-User", "a"), ("X-Forwarded-User", "b")],
         "missing_identity_header"),
        ("127.0.0.1", [("X-Forwarded-User", "u" * 513)], "invalid_user_id"),
        ("127.0.0.1", [("X-Forwarded-User", "jos\xe9")], "invalid_user_id"),  # latin-1 é
        ("127.0.0.1", [("X-Forwarded-User", "a\x01b")], "invalid_user_id"),
    ],
)  # fmt: skip
def test_header_mode_refuses(client: str | None, headers: list[tuple[str, str]], code: str) -> None:
    error = refused(HEADER, view({"userId": "alice"}, headers, client))
    assert (error.status, error.code) == (401, code)


def test_header_mode_without_proxies_refuses_everything() -> None:
    policy = Policy("web", Mode.HEADER, header="X-Forwarded-User")
    error = refused(policy, view(headers=[("X-Forwarded-User", "alice")]))
    assert (error.status, error.code) == (401, "untrusted_peer")


def test_readme_token_snippet_mints_tokens_the_sidecar_accepts() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    (snippet,) = [b for b in blocks if "def sidecar_token" in b]
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)
    minted = namespace["sidecar_token"](KEY.id, KEY.secret, "zoë", "web", 60)
    assert token.verify(minted, [KEY], "web", time.time()) == "zoë"
    readme_key = token.SigningKey("2025-06", b"a secret of at least 32 bytes....")
    assert token.verify(namespace["token"], [readme_key], "web", time.time()) == "alice"
