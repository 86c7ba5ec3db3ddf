"""The sidecar's errors: one tree under `SidecarError`. Each error says how a client is
answered when it ends a request: `status` (the HTTP status), `code` (the JSON answer's
`error.code`), `public_message` (its `error.message`) and `retry_after` (seconds for a
`Retry-After` header, or None). `sidecar.http.common.error_answer` turns one into that
answer; nothing else does.

    SidecarError                  500 internal_server_error, logged: what no other names
    ├── ConfigError (ValueError)  a setting does not parse: start-up stops (config.py)
    ├── StartupError              a valid setting cannot be used here (config.py)
    ├── ApiError                  a request refused as it is: its own status, code, message
    │   └── IdentityError         who the request is for is missing or wrong: 400, 401
    │       └── TokenError        a signed token that grants nothing: 401 (protocol/token.py)
    └── StoreError                the store refused, and a retry will not help (an
        │                         authorisation failure, a query the server rejects):
        │                         500, logged (store/base.py)
        └── StoreUnavailable      the store cannot be reached now: 503 store_unavailable,
                                  Retry-After: 1 (store/base.py)

Only an ApiError's message reaches the client: the others' (host names, databases,
queries) go to the log, and the client gets the fixed `public_message` of its class.
"""

from __future__ import annotations

# werkzeug's InternalServerError.description: what Quart answers for an unhandled
# exception, and so what every 500 says.
INTERNAL_MESSAGE = (
    "The server encountered an internal error and was unable to complete your request."
    " Either the server is overloaded or there is an error in the application."
)


class SidecarError(Exception):
    """The base of every error the sidecar raises on purpose."""

    status: int = 500
    code: str = "internal_server_error"
    retry_after: int | None = None

    @property
    def public_message(self) -> str:
        return INTERNAL_MESSAGE


class ApiError(SidecarError):
    """A request refused as it is: answered `status` with {"error": {"code", "message",
    "requestId"}}, and `Retry-After` when `retry_after` is given (a 503 for a request
    this instance cannot take now)."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def public_message(self) -> str:
        return self.message


class IdentityError(ApiError):
    """The request does not say who it is for, or says it badly (sidecar/identity.py)."""
