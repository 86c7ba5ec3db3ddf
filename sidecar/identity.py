"""Who a browser request is for. Every route that acts for a user resolves identity here,
so the stream and the ack endpoint always agree on it."""

from __future__ import annotations

from collections.abc import Mapping

MAX_USER_ID_LENGTH = 512


class IdentityError(Exception):
    """The request does not say who it is for, or says it badly; `status` is the HTTP code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def from_query(query: Mapping[str, str]) -> str:
    """Tock's PASSTHROUGH mode: the `userId` query parameter, or `userid` as tock-react-kit
    sends it. Anyone who knows a user id can act as that user."""
    user_id = query.get("userId") or query.get("userid")
    if not user_id:
        raise IdentityError(400, "missing_user_id", "missing userId query parameter")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise IdentityError(
            400, "invalid_user_id", f"userId is longer than {MAX_USER_ID_LENGTH} characters"
        )
    return user_id
