"""The error tree (sidecar/errors.py): every error the sidecar raises on purpose is a
`SidecarError`, and `error_answer` answers each as that module's docstring draws it."""

from __future__ import annotations

import json
import logging

import pytest
from werkzeug.exceptions import InternalServerError

from sidecar.config import ConfigError, StartupError
from sidecar.errors import INTERNAL_MESSAGE, ApiError, IdentityError, SidecarError
from sidecar.http.common import error_answer
from sidecar.protocol.token import TokenError
from sidecar.store.base import StoreError, StoreUnavailable

JSON = ("Content-Type", "application/json")


def test_the_tree() -> None:
    assert issubclass(ConfigError, SidecarError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(StartupError, SidecarError)
    assert issubclass(TokenError, IdentityError)
    assert issubclass(IdentityError, ApiError)
    assert issubclass(ApiError, SidecarError)
    assert issubclass(StoreUnavailable, StoreError)
    assert issubclass(StoreError, SidecarError)


def test_a_500_says_what_quart_says_of_an_unhandled_exception() -> None:
    assert InternalServerError.description == INTERNAL_MESSAGE


# (error, status, headers besides the content type, code, message)
ANSWERS = [
    (ApiError(404, "unknown_connector", "no connector 'x'"), 404, [], "unknown_connector",
     "no connector 'x'"),
    (IdentityError(400, "missing_user_id", "missing userId query parameter"), 400, [],
     "missing_user_id", "missing userId query parameter"),
    (TokenError("token_expired", "the token has expired"), 401, [], "token_expired",
     "the token has expired"),
    (ApiError(503, "too_many_streams", "retry later", retry_after=5), 503,
     [("Retry-After", "5")], "too_many_streams", "retry later"),
    # Where the store is (hosts, databases) is for the log, not for the client.
    (StoreUnavailable("MongoDB: db1.internal:27017: connection refused"), 503,
     [("Retry-After", "1")], "store_unavailable",
     "the message store is unavailable; retry later"),
    (StoreError("MongoDB: not authorized on tock_bot"), 500, [], "internal_server_error",
     INTERNAL_MESSAGE),
    (SidecarError("anything else"), 500, [], "internal_server_error", INTERNAL_MESSAGE),
]  # fmt: skip


@pytest.mark.parametrize(("error", "status", "extra", "code", "message"), ANSWERS)
def test_error_answer(
    error: SidecarError, status: int, extra: list[tuple[str, str]], code: str, message: str
) -> None:
    answered, headers, body = error_answer(error)
    assert (answered, headers) == (status, [JSON, *extra])
    # Outside a request there is no request id to name.
    assert json.loads(body) == {"error": {"code": code, "message": message}}


def test_only_an_error_answered_500_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.http")
    for error in (ApiError(400, "invalid_json", "no"), StoreUnavailable("down")):
        error_answer(error)
    assert caplog.records == []
    refused = StoreError("MongoDB: not authorized on tock_bot")
    error_answer(refused)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[1] is refused
    assert "not authorized" in record.getMessage()
