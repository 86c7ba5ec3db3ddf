"""Signed identity tokens: minted by the bot backend, verified by the sidecar. No I/O.

Format (version 1), four dot-separated fields, all URL-safe:

    v1.<key id>.<payload>.<mac>

- `key id`: which shared secret signed it (`[A-Za-z0-9_-]{1,64}`), so keys can rotate.
- `payload`: base64url without padding of the UTF-8 JSON object
  `{"sub": user id, "cid": connector id, "exp": expiry in Unix seconds (integer)}`.
- `mac`: base64url without padding of HMAC-SHA256(secret, the exact ASCII bytes of the
  token up to, not including, its last dot), that is of `v1.<key id>.<payload>`.

A token is valid for connector C at time T when its key id names a configured key, its mac
matches (compared in constant time), its payload is such an object with `cid == C`, and
`T < exp`. Everything is checked before the payload is trusted; the MAC covers the encoded
bytes, so there is no canonical-JSON question.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import re
from collections.abc import Iterable

from sidecar.errors import IdentityError

VERSION = "v1"
MIN_SECRET_BYTES = 32
MAX_TOKEN_LENGTH = 4096
KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class TokenError(IdentityError):
    """A token that does not grant access: 401, `code` `token_expired` or `token_invalid`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(401, code, message)


@dataclasses.dataclass(frozen=True, slots=True)
class SigningKey:
    id: str
    secret: bytes = dataclasses.field(repr=False)


def parse_keys(value: str) -> tuple[SigningKey, ...]:
    """`KEYID:SECRET` pairs separated by commas (the first signs, all verify); empty: none.
    A secret is the UTF-8 bytes after the first colon and must be at least 32 bytes long.
    Error messages never quote a secret."""
    keys: list[SigningKey] = []
    if not value.strip():
        return ()
    for position, item in enumerate(value.split(","), 1):
        key_id, colon, secret = item.strip().partition(":")
        if not colon or KEY_ID.fullmatch(key_id) is None:
            raise ValueError(
                f"key {position}: expected KEYID:SECRET with KEYID of [A-Za-z0-9_-], 1 to 64"
            )
        encoded = secret.encode()
        if len(encoded) < MIN_SECRET_BYTES:
            raise ValueError(
                f"key {key_id!r}: the secret is {len(encoded)} bytes, "
                f"at least {MIN_SECRET_BYTES} are required"
            )
        if any(k.id == key_id for k in keys):
            raise ValueError(f"key id {key_id!r} is given twice")
        keys.append(SigningKey(key_id, encoded))
    return tuple(keys)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if _B64URL.fullmatch(text) is None:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, signed_part: str) -> str:
    return _b64encode(hmac.new(secret, signed_part.encode("ascii"), hashlib.sha256).digest())


def mint(key: SigningKey, user_id: str, connector_id: str, expires_at: int) -> str:
    """A token for `user_id` on `connector_id`, valid until `expires_at` (Unix seconds)."""
    payload = json.dumps(
        {"sub": user_id, "cid": connector_id, "exp": int(expires_at)},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    signed_part = f"{VERSION}.{key.id}.{_b64encode(payload.encode())}"
    return f"{signed_part}.{_mac(key.secret, signed_part)}"


def verify(token: str, keys: Iterable[SigningKey], connector_id: str, now: float) -> str:
    """The `sub` `token` grants on `connector_id` at `now` (Unix seconds), else TokenError.
    Whether that string is a valid user id is the caller's rule (`identity.user_id_problem`)."""
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise TokenError("token_invalid", "the token is malformed")
    signed_part, _, mac = token.rpartition(".")
    fields = signed_part.split(".")
    if len(fields) != 3 or fields[0] != VERSION:
        raise TokenError("token_invalid", "the token is malformed or of an unknown version")
    key_id, payload = fields[1], fields[2]
    secret = next((k.secret for k in keys if k.id == key_id), None)
    if secret is None:
        raise TokenError("token_invalid", "the token is signed with an unknown key")
    if not hmac.compare_digest(_mac(secret, signed_part).encode(), mac.encode()):
        raise TokenError("token_invalid", "the token signature does not match")
    try:
        claims = json.loads(_b64decode(payload).decode("utf-8"))
    except (ValueError, binascii.Error, RecursionError):
        raise TokenError("token_invalid", "the token payload is not JSON") from None
    if not isinstance(claims, dict):
        raise TokenError("token_invalid", "the token payload is not an object")
    subject, connector, expiry = claims.get("sub"), claims.get("cid"), claims.get("exp")
    if (
        not isinstance(subject, str)
        or not isinstance(connector, str)
        or not isinstance(expiry, int)
        or isinstance(expiry, bool)
    ):
        raise TokenError("token_invalid", "the token payload lacks sub, cid or exp")
    if connector != connector_id:
        raise TokenError("token_invalid", "the token is for another connector")
    if not now < expiry:
        raise TokenError("token_expired", "the token has expired")
    return subject
