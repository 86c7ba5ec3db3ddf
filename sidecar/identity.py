"""Who a browser request is for. Every route that acts for a user resolves identity here,
with `resolve`, so the stream and the ack endpoint always agree on it.

Each connector has one mode (`SIDECAR_IDENTITY`):

- `query`: the `userId` (or `userid`) query parameter, as Tock's PASSTHROUGH mode. Anyone
  who knows a user id can act as that user.
- `cookie`: the `tock_user_id` cookie, as Tock's COOKIES mode; a stream request without
  one gets a fresh random id in a new cookie.
- `signed`: a token minted by the bot backend (`sidecar.protocol.token`), from the `token`
  query parameter or an `Authorization: Bearer` header.
- `header`: a header set by an authenticating proxy, believed only when the TCP peer is one
  of the trusted proxies.

Nothing here knows about the HTTP server: the listener describes a request as a
`RequestView`.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from sidecar.errors import IdentityError
from sidecar.protocol import token

if TYPE_CHECKING:
    from sidecar.config import Connector, Settings

MAX_USER_ID_LENGTH = 512
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
COOKIE_NAME = "tock_user_id"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Mode(enum.StrEnum):
    QUERY = "query"
    COOKIE = "cookie"
    SIGNED = "signed"
    HEADER = "header"


@dataclasses.dataclass(frozen=True, slots=True)
class Modes:
    """`SIDECAR_IDENTITY`: a default mode and per-connector overrides."""

    default: Mode = Mode.QUERY
    overrides: tuple[tuple[str, Mode], ...] = ()

    def of(self, connector_id: str) -> Mode:
        return dict(self.overrides).get(connector_id, self.default)


def parse_modes(value: str) -> Modes:
    """`MODE`, `ID=MODE` or both, comma-separated: `signed,admin=query` gives every connector
    `signed` except `admin`. Without a bare mode the default is `query`."""
    default: Mode | None = None
    overrides: dict[str, Mode] = {}
    allowed = ", ".join(m.value for m in Mode)
    for item in value.split(","):
        connector_id, eq, name = item.strip().rpartition("=")
        connector_id, name = connector_id.strip(), name.strip()
        try:
            mode = Mode(name)
        except ValueError:
            raise ValueError(f"unknown identity mode {name!r} (expected {allowed})") from None
        if not eq:
            if default is not None:
                raise ValueError("more than one default mode; override with ID=MODE")
            default = mode
        elif not re.fullmatch(r"[A-Za-z0-9_.\-]+", connector_id) or connector_id in overrides:
            raise ValueError(f"expected MODE or ID=MODE, each ID once, got {item.strip()!r}")
        else:
            overrides[connector_id] = mode
    return Modes(default or Mode.QUERY, tuple(overrides.items()))


def parse_networks(value: str) -> tuple[IpNetwork, ...]:
    """Comma-separated IP addresses or CIDR networks; empty: none."""
    networks: list[IpNetwork] = []
    for item in value.split(","):
        if item.strip():
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{item.strip()!r} is not an IP address or network") from None
    return tuple(networks)


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """How one connector's requests say who they are for."""

    connector_id: str
    mode: Mode
    signing_keys: tuple[token.SigningKey, ...] = ()
    header: str | None = None
    trusted_proxies: tuple[IpNetwork, ...] = ()
    cookie_max_age: int | None = None
    cookie_path: str = "/"

    @property
    def needs_credentials(self) -> bool:
        """A cross-origin page must send credentials (the cookie) for this connector."""
        return self.mode is Mode.COOKIE


def policy_for(settings: Settings, connector: Connector) -> Policy:
    return Policy(
        connector_id=connector.id,
        mode=settings.identity.of(connector.id),
        signing_keys=settings.signing_keys,
        header=settings.identity_header,
        trusted_proxies=settings.trusted_proxies,
        cookie_max_age=settings.cookie_max_age,
        cookie_path=settings.cookie_path or connector.base_path,
    )


class Headers(Mapping[str, str]):
    """Request headers by case-insensitive name; a repeated header reads as its values
    joined with `, ` (`all` gives them one by one)."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._values: dict[str, list[str]] = {}
        for name, value in pairs:
            self._values.setdefault(name.lower(), []).append(value)

    def __getitem__(self, name: str) -> str:
        return ", ".join(self._values[name.lower()])

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def all(self, name: str) -> list[str]:
        return list(self._values.get(name.lower(), ()))


@dataclasses.dataclass(frozen=True, slots=True)
class RequestView:
    """What identity needs of a request: its query, headers, cookies and TCP peer."""

    query: Mapping[str, str]
    headers: Headers
    client_host: str | None = None
    cookies: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def build(
        cls,
        query: Mapping[str, str],
        headers: Iterable[tuple[str, str]],
        client_host: str | None,
    ) -> RequestView:
        parsed = Headers(headers)
        return cls(query, parsed, client_host, parse_cookies(parsed.all("cookie")))


def parse_cookies(header_values: Iterable[str]) -> dict[str, str]:
    """Cookie headers (RFC 6265 `name=value; ...`) to a mapping; the first of a name wins,
    as user agents send the most specific path first."""
    cookies: dict[str, str] = {}
    for header in header_values:
        for pair in header.split(";"):
            name, eq, value = pair.partition("=")
            name, value = name.strip(), value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if eq and name:
                cookies.setdefault(name, value)
    return cookies


@dataclasses.dataclass(frozen=True, slots=True)
class Resolved:
    """Who the request is for, and the `Set-Cookie` value to answer with, if any."""

    user_id: str
    set_cookie: str | None = None


def resolve(
    policy: Policy, request: RequestView, *, mint_cookie: bool = False, now: float | None = None
) -> Resolved:
    """The user `request` acts for under `policy`, or IdentityError (a TokenError for a
    signed token that grants nothing), which `status` and `code` say how to answer (see
    sidecar.errors). Only the stream passes
    `mint_cookie`: in cookie mode it then creates an identity for a browser without one;
    the ack endpoint never does."""
    if policy.mode is Mode.QUERY:
        return Resolved(from_query(request.query))
    if policy.mode is Mode.COOKIE:
        return _from_cookie(policy, request, mint_cookie)
    if policy.mode is Mode.SIGNED:
        return Resolved(_from_token(policy, request, time.time() if now is None else now))
    return Resolved(_from_header(policy, request))


def from_query(query: Mapping[str, str]) -> str:
    """Tock's PASSTHROUGH mode: the `userId` query parameter, or `userid` as tock-react-kit
    sends it. Anyone who knows a user id can act as that user."""
    user_id = query.get("userId") or query.get("userid")
    if query.get("userid", user_id) != user_id:
        # Which of two users would be a guess; an id checked below is one of them.
        raise IdentityError(400, "invalid_user_id", "userId and userid name different users")
    if not user_id:
        raise IdentityError(400, "missing_user_id", "missing userId query parameter")
    return _checked_user_id(user_id, 400, "invalid_user_id", "userId")


def user_id_problem(user_id: str) -> str | None:
    """What makes `user_id` no user id, as words to follow its name ("is longer than..."),
    or None. The one rule for every user id, whichever way it comes (query, cookie, token,
    header, a send's `recipientId`): 1 to MAX_USER_ID_LENGTH characters, no control
    character (a line break, NUL...: no browser has such an id, and it would break log
    lines), and valid Unicode (JSON escapes can make a lone surrogate, which no browser,
    store or log can take)."""
    if not user_id:
        return "is empty"
    if len(user_id) > MAX_USER_ID_LENGTH:
        return f"is longer than {MAX_USER_ID_LENGTH} characters"
    if _CONTROL.search(user_id) is not None:
        return "has control characters"
    try:
        user_id.encode()
    except UnicodeEncodeError:
        return "is not valid Unicode"
    return None


def _checked_user_id(user_id: str, status: int, code: str, name: str) -> str:
    """`user_id` when `user_id_problem` finds none, else IdentityError(`status`, `code`)
    saying what is wrong with the value `name` names."""
    problem = user_id_problem(user_id)
    if problem is not None:
        raise IdentityError(status, code, f"{name} {problem}")
    return user_id


def _valid_cookie_value(value: str | None) -> bool:
    # A user id in RFC 6265 cookie-octets: printable ASCII without space, '"', ',', ';' or '\'.
    return (
        value is not None
        and user_id_problem(value) is None
        and all(0x21 <= ord(c) <= 0x7E and c not in '",;\\' for c in value)
    )


def set_cookie_header(policy: Policy, user_id: str) -> str:
    """The `Set-Cookie` value Tock's COOKIES mode writes."""
    parts = [f"{COOKIE_NAME}={user_id}"]
    if policy.cookie_max_age is not None:
        parts.append(f"Max-Age={policy.cookie_max_age}")
    parts += [f"Path={policy.cookie_path}", "HttpOnly", "Secure", "SameSite=None"]
    return "; ".join(parts)


def _from_cookie(policy: Policy, request: RequestView, mint: bool) -> Resolved:
    user_id = request.cookies.get(COOKIE_NAME)
    if user_id is not None and _valid_cookie_value(user_id):
        # As Tock: a cookie with a Max-Age is refreshed on every visit, a session one is not.
        refresh = mint and policy.cookie_max_age is not None
        return Resolved(user_id, set_cookie_header(policy, user_id) if refresh else None)
    if not mint:
        raise IdentityError(
            401, "missing_cookie", f"missing or invalid {COOKIE_NAME} cookie; open the stream first"
        )
    user_id = str(uuid.uuid4())
    return Resolved(user_id, set_cookie_header(policy, user_id))


def _from_token(policy: Policy, request: RequestView, now: float) -> str:
    scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
    raw = credentials.strip() if scheme.lower() == "bearer" else request.query.get("token")
    if not raw:
        raise IdentityError(
            401, "missing_token", "missing token query parameter or Authorization: Bearer header"
        )
    user_id = token.verify(raw, policy.signing_keys, policy.connector_id, now)
    return _checked_user_id(user_id, 401, "token_invalid", "the token's sub")


def _trusted(policy: Policy, host: str | None) -> bool:
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:  # a Unix socket, or no address at all
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in policy.trusted_proxies)


def _from_header(policy: Policy, request: RequestView) -> str:
    if policy.header is None or not _trusted(policy, request.client_host):
        raise IdentityError(401, "untrusted_peer", "identity headers are only taken from proxies")
    values = request.headers.all(policy.header)
    if len(values) != 1 or not values[0].strip():
        raise IdentityError(
            401, "missing_identity_header", f"expected exactly one non-empty {policy.header} header"
        )
    try:
        # Header values come decoded as latin-1, one character per byte; a proxy that
        # passes on a non-ASCII user id sends it in UTF-8.
        user_id = values[0].strip().encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise IdentityError(401, "invalid_user_id", "the user id is not UTF-8") from None
    return _checked_user_id(user_id, 401, "invalid_user_id", "the user id")
