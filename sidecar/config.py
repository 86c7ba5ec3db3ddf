"""Settings: one frozen object built from CLI flags, the environment and Tock's property names.

Each setting is read from, in order: its CLI flag, its `SIDECAR_*` environment variable,
then the Tock property of the same meaning (Tock reads its properties from the environment
too), then its default. A value that does not parse stops start-up with a one-line
`ConfigError` naming the setting.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from sidecar.errors import SidecarError
from sidecar.identity import IpNetwork, Mode, Modes, parse_modes, parse_networks
from sidecar.protocol.token import SigningKey, parse_keys


class ConfigError(SidecarError, ValueError):
    """Invalid configuration; the message is one line and names the setting."""


class StartupError(SidecarError):
    """A setting that is valid but cannot be used here (an address already in use, a host
    that does not resolve); the message is one line and names the setting."""


@dataclasses.dataclass(frozen=True, slots=True)
class Bind:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class Connector:
    id: str
    base_path: str

    @property
    def stream_path(self) -> str:
        return f"{self.base_path}/sse"

    @property
    def ack_path(self) -> str:
        return f"{self.base_path}/sse/ack"


def _bind(value: str) -> Bind:
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value.strip())
    if match is None:
        raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, got {value!r}")
    host = match.group(1) or match.group(3)
    digits = match.group(2) or match.group(4)
    # Checked on the text first: int() refuses numbers of thousands of digits.
    if len(digits) > 5 or int(digits) > 65535:
        raise ValueError(f"port {digits} is out of range")
    return Bind(host, int(digits))


def _optional_bind(value: str) -> Bind | None:
    return _bind(value) if value.strip() else None


def _connectors(value: str) -> tuple[Connector, ...]:
    connectors = []
    for item in value.split(","):
        connector_id, eq, path = item.strip().partition("=")
        connector_id, path = connector_id.strip(), path.strip().rstrip("/")
        if not eq or not connector_id or not path.startswith("/"):
            raise ValueError(f"expected ID=/BASEPATH pairs separated by commas, got {item!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", connector_id):
            raise ValueError(f"connector id {connector_id!r} has characters outside [A-Za-z0-9_.-]")
        # A "." or ".." segment would never match: browsers resolve them before requesting.
        if not re.fullmatch(r"(/(?!\.\.?(/|$))[A-Za-z0-9_.~\-]+)+", path):
            raise ValueError(f"base path {path!r} is not a plain URL path")
        connectors.append(Connector(connector_id, path))
    ids = [c.id for c in connectors]
    paths = [c.base_path for c in connectors]
    if len(set(ids)) != len(ids) or len(set(paths)) != len(paths):
        raise ValueError("connector ids and base paths must be unique")
    return tuple(connectors)


def _store(value: str) -> str:
    value = value.strip()
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value
    if value.startswith(("mongodb://", "mongodb+srv://")):
        _check_mongodb_url(value)
        return value
    # Not quoted back: a mistyped URL may hold a password.
    raise ValueError("expected sqlite:///PATH or mongodb://...")


def _check_mongodb_url(url: str) -> None:
    """Raise ValueError when pymongo's own parser refuses `url` (hosts, ports, credentials,
    database name, options and their values), as MongoClient would at start-up.

    `_validate_uri` is the part of `pymongo.uri_parser.parse_uri` that comes before the DNS
    lookups of a mongodb+srv:// URL: those can only fail at connect time, where the store
    reports them (StoreUnavailable). pymongo's messages never quote the URL's credentials
    (tests/test_config.py checks it), so they are passed on."""
    from pymongo.errors import PyMongoError
    from pymongo.uri_parser_shared import _validate_uri

    try:
        with warnings.catch_warnings():
            # What pymongo only warns about (an unavailable compressor) it warns about
            # again, once, when the store connects.
            warnings.simplefilter("ignore")
            _validate_uri(url)
    except (PyMongoError, ValueError) as exc:
        raise ValueError(f"not a valid MongoDB URL: {exc}") from None


def _number(value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"expected {what}, got {value!r}") from None


def _integer(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"expected {what}, got {value!r}") from None


def _positive_float(value: str) -> float:
    """Seconds (every setting of this kind is a duration)."""
    what = "a positive number of seconds"
    number = _number(value, what)
    if not number > 0 or number == float("inf"):
        raise ValueError(f"expected {what}, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    number = _integer(value, "a positive integer")
    if number < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


# A stream's buffer is allocated as it fills: this bounds what one slow stream holds (the
# hub cuts it off past it, and it replays from the store when it reconnects).
MAX_STREAM_BUFFER = 4096


def _stream_buffer(value: str) -> int:
    number = _positive_int(value)
    if number > MAX_STREAM_BUFFER:
        raise ValueError(f"expected at most {MAX_STREAM_BUFFER} messages, got {value!r}")
    return number


# MongoDB's TTL indexes take at most 2**31 - 1 seconds.
MAX_TTL_DAYS = 24855


def _days(value: str) -> float | None:
    """Empty: the store's default (SQLite none, MongoDB 7 days). Tock writes -1 (any
    value <= 0) for 'no TTL', kept here as 0."""
    if not value.strip():
        return None
    number = _number(value, f"a number of days, at most {MAX_TTL_DAYS}")
    if not math.isfinite(number) or number > MAX_TTL_DAYS:
        raise ValueError(f"expected at most {MAX_TTL_DAYS} days, got {value!r}")
    return number if number > 0 else 0.0


def _optional_positive_int(value: str) -> int | None:
    return _positive_int(value) if value.strip() else None


def _database(value: str) -> str | None:
    value = value.strip()
    if value and not re.fullmatch(r"[^/\\. \"$]{1,63}", value):
        raise ValueError(f"{value!r} is not a valid MongoDB database name")
    return value or None


def _regex(value: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _token(value: str) -> str | None:
    """A bearer token as a client sends it: printable ASCII (an HTTP header carries bytes)
    with no space around it (the header value is trimmed). Not quoted back in errors."""
    if value and not (value.isascii() and value.isprintable() and value == value.strip()):
        raise ValueError("must be printable ASCII with no space around it")
    return value or None


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {value!r}")
    return level


def _header_name(value: str) -> str | None:
    value = value.strip()
    if value and not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", value):
        raise ValueError(f"{value!r} is not an HTTP header name")
    return value or None


def _cookie_max_age(value: str) -> int | None:
    """Seconds; empty or negative (Tock's -1): a session cookie, without Max-Age."""
    if not value.strip():
        return None
    seconds = _integer(value, "a whole number of seconds, or -1 for a session cookie")
    if seconds == 0:
        raise ValueError("expected a positive number of seconds, or -1 for a session cookie")
    return seconds if seconds > 0 else None


def _cookie_path(value: str) -> str | None:
    """Empty: the connector's base path, as Tock does."""
    value = value.strip()
    if value and not re.fullmatch(r"/[A-Za-z0-9_.~/\-]*", value):
        raise ValueError(f"cookie path {value!r} is not a plain URL path")
    return value or None


def _response_schema(value: str) -> str | None:
    """Empty: `tock` on MongoDB (Tock may decode what is stored), `any` on SQLite."""
    lowered = value.strip().lower()
    if lowered not in ("", "tock", "any"):
        raise ValueError(f"expected tock or any, got {value!r}")
    return lowered or None


def _log_format(value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in ("json", "text"):
        raise ValueError(f"expected json or text, got {value!r}")
    return lowered


def _one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters escaped (a value quoted in an
    error message, such as a regular expression, may hold them)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


@dataclasses.dataclass(frozen=True, slots=True)
class Option:
    """How one setting is read; `name` is the attribute of `Settings`."""

    name: str
    env: str
    default: str
    parse: Callable[[str], Any]
    help: str
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def boolean(self) -> bool:
        """Whether the setting is true or false (its flag alone means true)."""
        return self.parse is _bool


OPTIONS: tuple[Option, ...] = (
    Option("public_bind", "SIDECAR_PUBLIC_BIND", "0.0.0.0:8080", _bind,
           "browser-facing listener, HOST:PORT (port 0 picks a free one)"),
    Option("send_bind", "SIDECAR_SEND_BIND", "127.0.0.1:8081", _bind,
           "bot-facing send API listener, HOST:PORT (port 0 picks a free one)"),
    Option("store", "SIDECAR_STORE", "sqlite:///./sidecar.db", _store,
           "message store URL: sqlite:///PATH or mongodb://...", ("tock_mongo_url",)),
    Option("connectors", "SIDECAR_CONNECTORS", "web=/io/app/web", _connectors,
           "comma-separated ID=BASEPATH pairs; streams at BASEPATH/sse"),
    Option("keepalive_seconds", "SIDECAR_KEEPALIVE_SECONDS", "10", _positive_float,
           "seconds between ping events", ("tock_web_sse_keepalive_delay",)),
    Option("send_token", "SIDECAR_SEND_TOKEN", "", _token,
           "bearer token the send API requires (empty: none)"),
    Option("cors_pattern", "SIDECAR_CORS_PATTERN", ".*", _regex,
           "regular expression the Origin must match in full", ("tock_web_cors_pattern",)),
    Option("cors_credentials", "SIDECAR_CORS_CREDENTIALS", "false", _bool,
           "allow credentialed cross-origin requests"),
    Option("max_payload_bytes", "SIDECAR_MAX_PAYLOAD_BYTES", "65536", _positive_int,
           "largest send request body, and largest response in a batch"),
    Option("max_batch_items", "SIDECAR_MAX_BATCH_ITEMS", "1000", _positive_int,
           "most messages in one batch send"),
    Option("max_batch_bytes", "SIDECAR_MAX_BATCH_BYTES", "1048576", _positive_int,
           "largest batch send request body"),
    Option("queue_max_count", "SIDECAR_QUEUE_MAX_COUNT", "50000", _positive_int,
           "messages kept at most; the oldest go first (MongoDB: the cap of a capped"
           " collection the sidecar creates)",
           ("tock_web_sse_message_queue_max_count",)),
    Option("queue_ttl_days", "SIDECAR_QUEUE_TTL_DAYS", "", _days,
           "days a message is kept (<= 0: no limit; empty: SQLite no limit, MongoDB 7;"
           " MongoDB: a TTL index on a regular collection the sidecar creates)",
           ("tock_web_sse_message_queue_ttl_days",)),
    Option("queue_max_size_kb", "SIDECAR_QUEUE_MAX_SIZE_KB", "", _optional_positive_int,
           "capped MongoDB collection size in KB (empty: 2 x queue max count)",
           ("tock_web_sse_message_queue_max_size_kb",)),
    Option("mongo_database", "SIDECAR_MONGO_DB", "", _database,
           "MongoDB database (empty: the store URL's path, else tock_bot)",
           ("tock_bot_mongo_db",)),
    Option("mongo_capped", "SIDECAR_MONGO_CAPPED", "false", _bool,
           "create a missing web_channel_event collection capped, as Tock does"),
    Option("response_schema", "SIDECAR_RESPONSE_SCHEMA", "", _response_schema,
           "tock: the send API refuses a response Tock could not decode; any: any JSON object"
           " (empty: tock on MongoDB, any on SQLite)"),
    Option("replay_sent", "SIDECAR_REPLAY_SENT", "false", _bool,
           "replay SENT messages to clients that send no Last-Event-ID"),
    Option("stream_buffer", "SIDECAR_STREAM_BUFFER", "256", _stream_buffer,
           "messages queued per stream before the stream is cut off as too slow (at most"
           " 4096)"),
    Option("replay_page", "SIDECAR_REPLAY_PAGE", "500", _positive_int,
           "messages read from the store per replay query"),
    Option("shutdown_seconds", "SIDECAR_SHUTDOWN_SECONDS", "10", _positive_float,
           "how long in-flight requests get to finish on SIGTERM"),
    Option("write_timeout_seconds", "SIDECAR_WRITE_TIMEOUT_SECONDS", "30", _positive_float,
           "a connection whose peer acknowledges nothing for this long is closed"),
    Option("log_level", "SIDECAR_LOG_LEVEL", "INFO", _log_level, "log level"),
    Option("identity", "SIDECAR_IDENTITY", "query", parse_modes,
           "identity mode query|cookie|signed|header, then ID=MODE overrides, comma-separated"),
    Option("signing_keys", "SIDECAR_SIGNING_KEYS", "", parse_keys,
           "signed mode: comma-separated KEYID:SECRET (32+ bytes); the first signs, all verify"),
    Option("identity_header", "SIDECAR_IDENTITY_HEADER", "", _header_name,
           "header mode: the header the authenticating proxy puts the user id in"),
    Option("trusted_proxies", "SIDECAR_TRUSTED_PROXIES", "", parse_networks,
           "header mode: comma-separated IPs or CIDRs the identity header is taken from"),
    Option("cookie_max_age", "SIDECAR_COOKIE_MAX_AGE", "", _cookie_max_age,
           "cookie mode: Max-Age of the tock_user_id cookie (empty or -1: session cookie)",
           ("tock_web_cookie_auth_max_age",)),
    Option("cookie_path", "SIDECAR_COOKIE_PATH", "", _cookie_path,
           "cookie mode: Path of the tock_user_id cookie (empty: the connector base path)",
           ("tock_web_cookie_auth_path",)),
    Option("demo", "SIDECAR_DEMO", "false", _bool,
           "serve the demo chat page at / and its POST /demo/send (never in production)"),
    Option("max_streams_per_user", "SIDECAR_MAX_STREAMS_PER_USER", "10", _positive_int,
           "open streams per user and connector; a new one closes the user's oldest"),
    Option("max_streams", "SIDECAR_MAX_STREAMS", "10000", _positive_int,
           "open streams on this instance; past it a stream request gets 503"),
    Option("max_ack_bytes", "SIDECAR_MAX_ACK_BYTES", "16384", _positive_int,
           "largest ack request body"),
    Option("max_header_bytes", "SIDECAR_MAX_HEADER_BYTES", "16384", _positive_int,
           "largest request line plus headers, on both listeners (431 past it)"),
    Option("send_idle_seconds", "SIDECAR_SEND_IDLE_SECONDS", "30", _positive_float,
           "send listener: an idle keep-alive connection is closed after this long"),
    Option("send_read_seconds", "SIDECAR_SEND_READ_SECONDS", "60", _positive_float,
           "send listener: a request whose body is not whole this long after its head is closed"),
    Option("log_format", "SIDECAR_LOG_FORMAT", "json", _log_format,
           "json (one object per line) or text"),
    Option("metrics_bind", "SIDECAR_METRICS_BIND", "", _optional_bind,
           "listener serving only GET /metrics, HOST:PORT (empty: none; /metrics stays on"
           " the send listener either way)"),
)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    public_bind: Bind
    send_bind: Bind
    store: str
    connectors: tuple[Connector, ...]
    keepalive_seconds: float
    send_token: str | None
    cors_pattern: re.Pattern[str]
    cors_credentials: bool
    max_payload_bytes: int
    max_batch_items: int
    max_batch_bytes: int
    queue_max_count: int
    queue_ttl_days: float | None
    queue_max_size_kb: int | None
    mongo_database: str | None
    mongo_capped: bool
    response_schema: str | None
    replay_sent: bool
    stream_buffer: int
    replay_page: int
    shutdown_seconds: float
    write_timeout_seconds: float
    log_level: str
    identity: Modes
    signing_keys: tuple[SigningKey, ...]
    identity_header: str | None
    trusted_proxies: tuple[IpNetwork, ...]
    cookie_max_age: int | None
    cookie_path: str | None
    demo: bool
    max_streams_per_user: int
    max_streams: int
    max_ack_bytes: int
    max_header_bytes: int
    send_idle_seconds: float
    send_read_seconds: float
    log_format: str
    metrics_bind: Bind | None

    @classmethod
    def load(
        cls, env: Mapping[str, str], flags: Mapping[str, str | None] | None = None
    ) -> Settings:
        """Build settings from `flags` (by attribute name; None means not given) and `env`."""
        flags = flags or {}
        values: dict[str, Any] = {}
        for option in OPTIONS:
            raw, source = option.default, f"{option.env} (default)"
            for alias in reversed(option.aliases):
                if alias in env:
                    raw, source = env[alias], alias
            if option.env in env:
                raw, source = env[option.env], option.env
            if flags.get(option.name) is not None:
                raw, source = str(flags[option.name]), option.flag
            try:
                values[option.name] = option.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{source}: {_one_line(str(exc))}") from None
        return cls(**values)

    @property
    def tock_responses(self) -> bool:
        """Whether the send API takes only responses Tock can decode (`protocol/tock.py`)."""
        if self.response_schema is None:
            return self.store.startswith("mongodb")
        return self.response_schema == "tock"

    def connector(self, connector_id: str) -> Connector | None:
        for connector in self.connectors:
            if connector.id == connector_id:
                return connector
        return None

    def __post_init__(self) -> None:
        """Checks across settings: identity modes name real connectors and have what they
        need."""
        known = {c.id for c in self.connectors}
        for connector_id, _ in self.identity.overrides:
            if connector_id not in known:
                raise ConfigError(
                    f"SIDECAR_IDENTITY: no connector {connector_id!r} "
                    f"(connectors: {', '.join(sorted(known))})"
                )
        modes = {self.identity.of(c.id) for c in self.connectors}
        if Mode.SIGNED in modes and not self.signing_keys:
            raise ConfigError("SIDECAR_SIGNING_KEYS: signed identity mode needs at least one key")
        if Mode.HEADER in modes and self.identity_header is None:
            raise ConfigError("SIDECAR_IDENTITY_HEADER: header identity mode needs a header name")
        if Mode.HEADER in modes and not self.trusted_proxies:
            raise ConfigError(
                "SIDECAR_TRUSTED_PROXIES: header identity mode needs the proxies' addresses"
            )
