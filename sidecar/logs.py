"""Logging: one JSON object per line on stderr (or plain text for a developer), and the id
of the HTTP request being served, kept in a context variable.

Every record carries `ts`, `level`, `logger` and `msg`, plus `request_id` when it was
logged while a request was being served (trio copies context variables into the tasks and
worker threads a request starts, so store and stream logs carry it too), and `exc` with
the traceback when there is one. Log calls pass message ids, user ids and counts, never a
message's response payload.

trio's accept loop (`trio.serve_listeners`, which hypercorn's listeners run) logs an error
with a traceback on every failed accept when the process is out of file descriptors, ten
times a second; `configure` lets one such line through per `ACCEPT_ERRORS_EVERY` seconds,
without the traceback, saying how many it left out.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import TextIO

request_id: ContextVar[str | None] = ContextVar("sidecar_request_id", default=None)

# What a client-sent X-Request-ID must look like to be kept: short, and nothing that could
# break a header, a log line or a JSON string.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+=/~-]{1,128}")


def current_request_id() -> str | None:
    return request_id.get()


def pick_request_id(given: str | None) -> str:
    """The client's X-Request-ID when it is a sane one, else a new random id."""
    if given is not None and _SANE_REQUEST_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`2024-01-01 12:00:00,000 INFO sidecar [request id]: message`, one line per record
    (a traceback follows it): line breaks in the message are escaped, so that a value a
    client chose cannot forge a line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = request_id.get()
        record.rid = f" [{rid}]" if rid is not None else ""
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return line.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


class RateLimit(logging.Filter):
    """Lets one record through per `interval` seconds of `clock`, without its traceback;
    the next one through after some were left out says how many."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._next: float | None = None
        self._left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        if self._next is not None and now < self._next:
            self._left_out += 1
            return False
        self._next = now + self.interval
        record.exc_info = record.exc_text = None
        if self._left_out:
            record.msg = (
                f"{record.msg} ({self._left_out} more like it not logged: one line per"
                f" {self.interval:g} s)"
            )
            self._left_out = 0
        return True


# The logger of trio.serve_listeners (trio/_highlevel_serve_listeners.py).
ACCEPT_ERRORS = "trio.serve_listeners"
ACCEPT_ERRORS_EVERY = 10.0


def configure(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send every log record at `level` or above to `stream` (stderr) in `fmt` ("json" or
    "text"), replacing the root logger's handlers, and rate-limit trio's accept errors."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    accept_errors = logging.getLogger(ACCEPT_ERRORS)
    for old_filter in list(accept_errors.filters):
        if isinstance(old_filter, RateLimit):
            accept_errors.removeFilter(old_filter)
    accept_errors.addFilter(RateLimit(ACCEPT_ERRORS_EVERY))
