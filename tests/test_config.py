"""Settings: defaults, where each value comes from, and one-line errors naming the setting."""

from __future__ import annotations

import gc
import os
import socket
import warnings
from pathlib import Path

import pytest

from sidecar import cli
from sidecar.config import OPTIONS, Bind, ConfigError, Connector, Settings

OPTION = {option.name: option for option in OPTIONS}


def load(env: dict[str, str] | None = None, **flags: str | None) -> Settings:
    return Settings.load(env or {}, flags)


def test_defaults() -> None:
    settings = load()
    assert settings.public_bind == Bind("0.0.0.0", 8080)
    assert settings.send_bind == Bind("127.0.0.1", 8081)
    assert settings.store == "sqlite:///./sidecar.db"
    assert settings.connectors == (Connector("web", "/io/app/web"),)
    assert settings.keepalive_seconds == 10.0
    assert settings.send_token is None
    assert settings.cors_pattern.pattern == ".*"
    assert settings.cors_credentials is False
    assert settings.max_payload_bytes == 65536
    assert settings.max_batch_items == 1000
    assert settings.max_batch_bytes == 1048576
    assert settings.queue_max_count == 50000
    assert settings.queue_ttl_days is None
    assert settings.queue_max_size_kb is None
    assert settings.mongo_database is None
    assert settings.mongo_capped is False
    assert settings.replay_sent is False
    assert settings.stream_buffer == 256
    assert settings.replay_page == 500
    assert settings.shutdown_seconds == 10.0
    assert settings.log_level == "INFO"


def test_every_option_is_a_settings_field_with_a_parseable_default() -> None:
    assert [o.name for o in OPTIONS] == list(Settings.__dataclass_fields__)
    for option in OPTIONS:
        assert option.env == "SIDECAR_" + option.name.upper() or option.name == "mongo_database"
        option.parse(option.default)


def test_flag_names() -> None:
    assert OPTION["keepalive_seconds"].flag == "--keepalive-seconds"
    assert OPTION["public_bind"].flag == "--public-bind"


# (setting, Tock alias, three distinct raw values, what each parses to)
ALIASED = [
    ("keepalive_seconds", "tock_web_sse_keepalive_delay", ("3", "4", "5"), (3.0, 4.0, 5.0), 10.0),
    ("cors_pattern", "tock_web_cors_pattern", ("a", "b", "c"), ("a", "b", "c"), ".*"),
    ("queue_max_count", "tock_web_sse_message_queue_max_count", ("1", "2", "3"), (1, 2, 3), 50000),
    ("queue_ttl_days", "tock_web_sse_message_queue_ttl_days", ("1", "2", "3"), (1.0, 2.0, 3.0),
     None),
    ("queue_max_size_kb", "tock_web_sse_message_queue_max_size_kb", ("1", "2", "3"), (1, 2, 3),
     None),
    ("store", "tock_mongo_url", ("mongodb://f", "mongodb://e", "mongodb://a"),
     ("mongodb://f", "mongodb://e", "mongodb://a"), "sqlite:///./sidecar.db"),
    ("mongo_database", "tock_bot_mongo_db", ("f", "e", "a"), ("f", "e", "a"), None),
    ("cookie_max_age", "tock_web_cookie_auth_max_age", ("60", "-1", "3600"), (60, None, 3600),
     None),
    ("cookie_path", "tock_web_cookie_auth_path", ("/a", "/b", "/"), ("/a", "/b", "/"), None),
]  # fmt: skip


def value_of(settings: Settings, name: str) -> object:
    value = getattr(settings, name)
    return value.pattern if name == "cors_pattern" else value


@pytest.mark.parametrize(("name", "alias", "raws", "parsed", "default"), ALIASED)
@pytest.mark.parametrize(
    ("given", "winner"),
    [
        ((True, True, True), 0),
        ((True, False, True), 0),
        ((True, False, False), 0),
        ((False, True, True), 1),
        ((False, True, False), 1),
        ((False, False, True), 2),
        ((False, False, False), None),
    ],
)
def test_precedence(
    name: str,
    alias: str,
    raws: tuple[str, str, str],
    parsed: tuple[object, object, object],
    default: object,
    given: tuple[bool, bool, bool],
    winner: int | None,
) -> None:
    option = OPTION[name]
    assert alias in option.aliases
    flags = {name: raws[0] if given[0] else None}
    env = {}
    if given[1]:
        env[option.env] = raws[1]
    if given[2]:
        env[alias] = raws[2]
    expected = default if winner is None else parsed[winner]
    assert value_of(Settings.load(env, flags), name) == expected


@pytest.mark.parametrize("name", [o.name for o in OPTIONS if not o.aliases])
def test_flag_beats_env_for_unaliased_settings(name: str) -> None:
    # Any valid value differing from the default: take another option's view of validity.
    samples = {
        "public_bind": ("1.2.3.4:1", "5.6.7.8:2"),
        "send_bind": ("1.2.3.4:1", "5.6.7.8:2"),
        "connectors": ("a=/a", "b=/b"),
        "send_token": ("t1", "t2"),
        "cors_credentials": ("true", "false"),
        "max_payload_bytes": ("7", "8"),
        "max_batch_items": ("7", "8"),
        "max_batch_bytes": ("7", "8"),
        "mongo_capped": ("yes", "no"),
        "replay_sent": ("on", "off"),
        "response_schema": ("tock", "any"),
        "stream_buffer": ("7", "8"),
        "replay_page": ("7", "8"),
        "shutdown_seconds": ("7", "8"),
        "write_timeout_seconds": ("7", "0.5"),
        "log_level": ("debug", "error"),
        "max_streams_per_user": ("7", "8"),
        "max_streams": ("7", "8"),
        "max_ack_bytes": ("7", "8"),
        "max_header_bytes": ("7", "8"),
        "send_idle_seconds": ("0.5", "8"),
        "send_read_seconds": ("0.5", "8"),
        "log_format": ("text", "JSON"),
        "identity": ("cookie", "query,web=cookie"),
        "signing_keys": ("a:" + "x" * 32, "b:" + "y" * 40 + ",c:" + "z" * 32),
        "identity_header": ("X-Forwarded-User", "X-Auth-User"),
        "trusted_proxies": ("127.0.0.1", "10.0.0.0/8, ::1"),
        "demo": ("true", "false"),
        "metrics_bind": ("1.2.3.4:1", "5.6.7.8:2"),
    }
    flag_value, env_value = samples[name]
    option = OPTION[name]
    parse = option.parse
    assert getattr(load({option.env: env_value}), name) == parse(env_value)
    assert getattr(load({option.env: env_value}, **{name: flag_value}), name) == parse(flag_value)
    assert getattr(load({}, **{name: flag_value}), name) == parse(flag_value)


def test_empty_env_value_counts_as_given() -> None:
    # Set but empty is a value, not "unset": it overrides the Tock alias.
    settings = load({"SIDECAR_QUEUE_TTL_DAYS": "", "tock_web_sse_message_queue_ttl_days": "3"})
    assert settings.queue_ttl_days is None


@pytest.mark.parametrize(
    ("raw", "days"),
    [("", None), ("  ", None), ("7", 7.0), ("0.5", 0.5), ("0", 0.0), ("-1", 0.0), ("-0.5", 0.0)],
)
def test_queue_ttl_days(raw: str, days: float | None) -> None:
    assert load({"SIDECAR_QUEUE_TTL_DAYS": raw}).queue_ttl_days == days
    assert load({"tock_web_sse_message_queue_ttl_days": raw}).queue_ttl_days == days


@pytest.mark.parametrize(
    ("raw", "bind", "text"),
    [
        ("127.0.0.1:0", Bind("127.0.0.1", 0), "127.0.0.1:0"),
        (" localhost:65535 ", Bind("localhost", 65535), "localhost:65535"),
        ("[::1]:0", Bind("::1", 0), "[::1]:0"),
        ("[::]:8080", Bind("::", 8080), "[::]:8080"),
        ("[2001:db8::1]:443", Bind("2001:db8::1", 443), "[2001:db8::1]:443"),
        ("[::ffff:127.0.0.1]:80", Bind("::ffff:127.0.0.1", 80), "[::ffff:127.0.0.1]:80"),
        ("example.com:08080", Bind("example.com", 8080), "example.com:8080"),
    ],
)
def test_valid_binds(raw: str, bind: Bind, text: str) -> None:
    settings = load({"SIDECAR_PUBLIC_BIND": raw}, send_bind=raw)
    assert settings.public_bind == bind
    assert settings.send_bind == bind
    assert str(bind) == text


@pytest.mark.parametrize(
    ("raw", "connectors"),
    [
        ("web=/io/app/web", (Connector("web", "/io/app/web"),)),
        ("web=/io/app/web/", (Connector("web", "/io/app/web"),)),
        (" a = /x , b=/y/z ", (Connector("a", "/x"), Connector("b", "/y/z"))),
        ("a.b_c-d=/A-b_c.d~e", (Connector("a.b_c-d", "/A-b_c.d~e"),)),
        ("a=/x,b=/x/y", (Connector("a", "/x"), Connector("b", "/x/y"))),
        ("a=/...,b=/.x", (Connector("a", "/..."), Connector("b", "/.x"))),
    ],
)
def test_valid_connectors(raw: str, connectors: tuple[Connector, ...]) -> None:
    assert load({"SIDECAR_CONNECTORS": raw}).connectors == connectors


def test_connector_lookup_and_paths() -> None:
    settings = load({"SIDECAR_CONNECTORS": "web=/io/app/web,other=/x"})
    web = settings.connector("web")
    assert web == Connector("web", "/io/app/web")
    assert web.stream_path == "/io/app/web/sse"
    assert web.ack_path == "/io/app/web/sse/ack"
    other = settings.connector("other")
    assert other is not None
    assert (other.stream_path, other.ack_path) == ("/x/sse", "/x/sse/ack")
    assert settings.connector("nope") is None
    assert settings.connector("WEB") is None
    assert settings.connector("") is None


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1", True), ("TRUE", True), (" yes ", True), ("On", True),
     ("0", False), ("false", False), ("No", False), ("off", False), ("", False)],
)  # fmt: skip
def test_bools(raw: str, value: bool) -> None:
    assert load({"SIDECAR_REPLAY_SENT": raw}).replay_sent is value


def test_misc_values() -> None:
    settings = load(
        {
            "SIDECAR_SEND_TOKEN": "s3cret",
            "SIDECAR_LOG_LEVEL": " debug ",
            "SIDECAR_KEEPALIVE_SECONDS": "0.25",
            "SIDECAR_CORS_PATTERN": "https://(a|b)\\.example",
            "SIDECAR_STORE": "mongodb+srv://cluster/db",
            "SIDECAR_MONGO_DB": "tock_bot",
        }
    )
    assert settings.send_token == "s3cret"
    assert settings.log_level == "DEBUG"
    assert settings.keepalive_seconds == 0.25
    assert settings.cors_pattern.fullmatch("https://b.example")
    assert settings.store == "mongodb+srv://cluster/db"
    assert settings.mongo_database == "tock_bot"


BAD_VALUES = [
    ("public_bind", ["localhost", "localhost:", ":8080", "1.2.3.4:70000", "host:65536",
                     "::1:80", "[::1]", "[::1]:", "[nothost]:80", "host:-1", "host:abc", "",
                     "a:b:80", "[::1]:99999", "host:80:90"]),
    ("send_bind", ["127.0.0.1", "127.0.0.1:100000", "[::1]80"]),
    ("connectors", ["web", "web/io", "=/io", "web=", "web=/", "web=io/app", "web=/a,web=/b",
                    "a=/x,b=/x", "a=/x,b=/x/", "we b=/x", "web=/a b", "web=/a?b", "web=/a//b",
                    "web=/a,", ",web=/a", "", "wéb=/x", "web=/é", "web=/a#b", "web=/a%20b",
                    "web=/..", "web=/a/./b", "web=/a/../b", "a=b=/x"]),
    ("store", ["postgres://x", "sqlite://", "sqlite:///", "sqlite://relative", "", "mongo://x",
               "./sidecar.db", "MONGODB://x", "mongodb://", "mongodb+srv://",
               "mongodb://host:notaport", "mongodb://host:99999", "mongodb://host:0",
               "mongodb://[::1", "mongodb://h/bad db", "mongodb://h/?foo=bar",
               "mongodb://h/?w=1&connectTimeoutMS=soon", "mongodb://h/?tls=maybe",
               "mongodb://a,b/?directConnection=true", "mongodb+srv://cluster.example:27017",
               "mongodb+srv://a.example,b.example", "mongodb+srv://c.example/?directConnection=true",
               "mongodb://u:p@ss@h", "mongodb://u:p%zz@h", "mongodb:///tmp/mongodb.sock"]),
    ("keepalive_seconds", ["0", "-1", "abc", "inf", "-inf", "nan", "", "1e400", "0.0"]),
    ("shutdown_seconds", ["0", "inf", "x"]),
    ("write_timeout_seconds", ["0", "-1", "inf", "nan", "x"]),
    ("cors_pattern", ["(", "[a-", "*", "(?P<x>", "a)"]),
    ("cors_credentials", ["maybe", "2", "yess", "tru", "-1"]),
    ("replay_sent", ["enable"]),
    ("mongo_capped", ["capped"]),
    ("max_payload_bytes", ["0", "-5", "1.5", "abc", "", "1e3"]),
    ("max_batch_items", ["0"]),
    ("max_batch_bytes", ["-1"]),
    ("queue_max_count", ["0", "many"]),
    ("stream_buffer", ["0", "1k", "4097"]),
    ("replay_page", ["0"]),
    ("queue_ttl_days", ["abc", "1d", "inf", "nan", "-inf"]),
    ("queue_max_size_kb", ["0", "x", "-3"]),
    ("mongo_database", ["a/b", "a.b", "a b", 'a"b', "a$b", "a\\b", "x" * 64]),
    ("log_level", ["verbose", "trace", "5"]),
    ("max_streams_per_user", ["0", "x"]),
    ("max_streams", ["0", "-1"]),
    ("max_ack_bytes", ["0", "1k"]),
    ("max_header_bytes", ["0", ""]),
    ("send_idle_seconds", ["0", "inf", "x"]),
    ("send_read_seconds", ["0", "-1"]),
    ("log_format", ["yaml", "", "logfmt"]),
    ("identity", ["", "bogus", "QUERY", "query,cookie", "=query", "web=", "web=nope",
                  "web=query,web=cookie", "query;web=cookie"]),
    ("signing_keys", ["k1", "k1:short", "k1:" + "x" * 31, ":" + "x" * 32, "k 1:" + "x" * 32,
                      "k1:" + "x" * 32 + ",k1:" + "y" * 32, "k1:" + "x" * 32 + ",",
                      "k.1:" + "x" * 32, "k" * 65 + ":" + "x" * 32]),
    ("identity_header", ["X Forwarded", "X:Y", "X-\u00e9", "a\nb"]),
    ("trusted_proxies", ["nope", "10.0.0.0/33", "1.2.3", "127.0.0.1,x", "localhost"]),
    ("cookie_max_age", ["0", "x", "1.5"]),
    ("cookie_path", ["a", "/a;b", "/a b", "/\u00e9", "/a,b"]),
    ("demo", ["maybe", "2"]),
    ("response_schema", ["json", "TOCKS", "none"]),
    ("send_token", [" tok", "tok ", "s\u00e9cret", "a\tb", "a b\n"]),
    ("metrics_bind", ["8082", "localhost", ":8082", "host:65536", "[::1]", "host:abc"]),
]  # fmt: skip

BAD = [(name, value) for name, values in BAD_VALUES for value in values]


@pytest.mark.parametrize(
    ("store", "value", "expected"),
    [
        ("sqlite:///x.db", "", False),
        ("mongodb://db", "", True),
        ("mongodb://db", "any", False),
        ("sqlite:///x.db", "TOCK", True),
    ],
)
def test_the_response_check_defaults_to_tock_on_mongodb(
    store: str, value: str, expected: bool
) -> None:
    env = {"SIDECAR_STORE": store, "SIDECAR_RESPONSE_SCHEMA": value}
    assert Settings.load(env).tock_responses is expected


def test_bad_values_cover_every_option() -> None:
    assert {name for name, _ in BAD_VALUES} == set(OPTION)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("store", "mongdb://admin:s3cret@db"),
        ("send_token", "s3cret "),
        *[
            ("store", f"{scheme}{user}{host}{rest}")
            for scheme in ("mongodb://", "mongodb+srv://")
            for user in ("admin:s3cret@", "s3cret@", "admin:s3cret/x@")
            for host in ("db:port", "db:99999")
            for rest in ("", "/?foo=1", "/?tls=s3cret", "/bad db")
        ],
        ("store", "mongodb://admin:s3cret@db/?foo=1"),
        ("store", "mongodb://admin:s3cret@db/?tls=s3cret"),
        ("store", "mongodb://admin:s3cret@db/bad db"),
        ("store", "mongodb+srv://admin:s3cret@a,b"),
        ("store", "mongodb://admin:s3c@ret@db"),
    ],
)
def test_errors_do_not_quote_secrets(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({OPTION[name].env: value})
    assert "s3c" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "mongodb://db",
        "mongodb://u:p%40ss@a:27017,b:27018/tock_bot?replicaSet=rs0&w=majority",
        "mongodb://[::1]:27017/?directConnection=true",
        "mongodb://%2Ftmp%2Fmongodb-27017.sock",
        "mongodb://db/?compressors=snappy,zstd,zlib&tls=true&appName=x",
        # No DNS lookup at parse time: these names resolve nowhere.
        "mongodb+srv://user:secret@cluster0.example.invalid/tock?retryWrites=true&w=majority",
        "mongodb+srv://cluster0.example.invalid/?srvServiceName=mongodb&srvMaxHosts=2",
    ],
)
def test_valid_mongodb_urls(url: str) -> None:
    assert load({"SIDECAR_STORE": url}).store == url


@pytest.mark.parametrize(("name", "value"), BAD)
def test_errors_are_not_pythons_conversion_errors(name: str, value: str) -> None:
    pythons = []
    for convert in (int, float):
        try:
            convert(value)
        except ValueError as exc:
            pythons.append(str(exc))
    with pytest.raises(ConfigError) as info:
        load({OPTION[name].env: value})
    assert not [message for message in pythons if message in str(info.value)]


def assert_one_line_naming(exc: ConfigError, source: str) -> None:
    text = str(exc)
    assert text.isprintable(), text  # no line break of any kind
    assert text.startswith(f"{source}: "), text
    assert len(text) > len(source) + 2


@pytest.mark.parametrize(("name", "value"), BAD)
def test_bad_value_from_env(name: str, value: str) -> None:
    option = OPTION[name]
    with pytest.raises(ConfigError) as info:
        load({option.env: value})
    assert_one_line_naming(info.value, option.env)


@pytest.mark.parametrize(("name", "value"), BAD)
def test_bad_value_from_flag(name: str, value: str) -> None:
    option = OPTION[name]
    with pytest.raises(ConfigError) as info:
        load({}, **{name: value})
    assert_one_line_naming(info.value, option.flag)


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, value in BAD if OPTION[name].aliases]
)
def test_bad_value_from_tock_alias(name: str, value: str) -> None:
    alias = OPTION[name].aliases[0]
    with pytest.raises(ConfigError) as info:
        load({alias: value})
    assert_one_line_naming(info.value, alias)


def test_bad_alias_ignored_when_env_given() -> None:
    settings = load({"SIDECAR_KEEPALIVE_SECONDS": "2", "tock_web_sse_keepalive_delay": "x"})
    assert settings.keepalive_seconds == 2.0


@pytest.mark.parametrize(
    "value", ["a\nb", "1\n2", "(\n", "web=/a\nb", "x\r\ny", "\n\n", "[a-\n", "[a-\u2028", "(\x85"]
)
@pytest.mark.parametrize(
    "name", ["keepalive_seconds", "cors_pattern", "connectors", "public_bind", "max_batch_items"]
)
def test_errors_stay_on_one_line_with_line_breaks_in_the_value(name: str, value: str) -> None:
    option = OPTION[name]
    try:
        load({option.env: value})
    except ConfigError as exc:
        assert_one_line_naming(exc, option.env)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- the command line ----------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for option in OPTIONS:
        for name in (option.env, *option.aliases):
            monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("SIDECAR_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_cli_bad_flag_exits_2_with_one_line(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--keepalive-seconds", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.endswith("\n")
    assert "--keepalive-seconds" in err


def test_cli_bad_env_exits_2_with_one_line(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("SIDECAR_KEEPALIVE_SECONDS", "0")
    assert cli.main(["serve"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "SIDECAR_KEEPALIVE_SECONDS" in err
    assert "--keepalive-seconds" not in err


def test_cli_flag_error_wins_over_valid_env(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("SIDECAR_PUBLIC_BIND", "127.0.0.1:0")
    assert cli.main(["serve", "--public-bind", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--public-bind" in err


def test_cli_bad_tock_alias(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("tock_web_sse_keepalive_delay", "-1")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "tock_web_sse_keepalive_delay" in err


def test_cli_store_that_cannot_open_exits_1_with_one_line(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    clean_env.setenv("SIDECAR_STORE", f"sqlite:///{tmp_path}/missing/dir/sidecar.db")
    assert cli.main(["serve", "--public-bind", "127.0.0.1:0", "--send-bind", "127.0.0.1:0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("sidecar: SIDECAR_STORE: cannot open SQLite store")


def test_cli_address_in_use_exits_1_naming_the_setting(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    clean_env.setenv("SIDECAR_STORE", f"sqlite:///{tmp_path}/sidecar.db")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "--public-bind", "127.0.0.1:0", "--send-bind", f"127.0.0.1:{port}"]
        assert cli.main(args) == 1
    with warnings.catch_warnings():
        # hypercorn leaves the socket it could not bind to the garbage collector.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    last = capsys.readouterr().err.splitlines()[-1]  # after the public listener's log line
    assert last.startswith(f"sidecar: SIDECAR_SEND_BIND (--send-bind) 127.0.0.1:{port}: ")
    assert "cannot listen" in last


def test_cli_every_option_has_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in OPTIONS:
        assert option.flag in out
