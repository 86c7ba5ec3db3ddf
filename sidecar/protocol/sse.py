"""Server-Sent Events frames: encoding for the server, parsing for tests and clients.

The wire format is Tock's (`bot/connector-web-sse`): a `ping` event with data `1` when a
stream opens and at every keepalive, and `id`/`event: message`/`data` for each response,
whose data is the response serialised compactly on one line.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

PING = b"event: ping\ndata: 1\n\n"


def dumps(value: Any) -> str:
    """Compact JSON on one line, unicode kept as is (JSON escapes every newline)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def encode(data: str, *, event: str | None = None, id: str | None = None) -> bytes:
    """One SSE frame. Every line of `data` becomes its own `data:` field, so the frame is
    well-formed whatever `data` holds; `\\r\\n`, `\\r` and `\\n` all count as line breaks, as
    they do for a parser."""
    parts = []
    if id is not None:
        if "\n" in id or "\r" in id:
            raise ValueError("an SSE id cannot contain a line break")
        parts.append(f"id: {id}\n")
    if event is not None:
        if "\n" in event or "\r" in event:
            raise ValueError("an SSE event name cannot contain a line break")
        parts.append(f"event: {event}\n")
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    parts.extend(f"data: {line}\n" for line in lines)
    parts.append("\n")
    return "".join(parts).encode()


def encode_message(message_id: str, response: Any) -> bytes:
    """The frame Tock writes for a bot response."""
    return encode(dumps(response), event="message", id=message_id)


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


class Parser:
    """An incremental parser following the HTML living standard's event-stream rules.

    Feed it bytes in any chunking; it returns the events completed so far.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._first_line = True
        self._after_cr = False  # the last line ended with a `\r` that ended the buffer
        self.last_event_id = ""

    def feed(self, chunk: bytes) -> list[Event]:
        if chunk and self._after_cr:
            # That `\r` already ended its line; a `\n` right after it belongs to it.
            self._after_cr = False
            chunk = chunk.removeprefix(b"\n")
        self._buffer += chunk
        events: list[Event] = []
        while True:
            line, sep, rest = _split_line(self._buffer)
            if not sep:
                return events
            self._buffer = rest
            self._after_cr = sep == b"\r" and not rest
            text = line.decode("utf-8", errors="replace")
            if self._first_line:
                self._first_line = False
                text = text.removeprefix("\ufeff")  # one leading byte order mark is ignored
            event = self._line(text)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> Event | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        if self._id is not None:
            self.last_event_id = self._id
        event_id, self._id = self._id, None
        retry, self._retry = self._retry, None
        if not self._data:
            self._event = ""
            return None
        event = Event(
            event=self._event or "message", data="\n".join(self._data), id=event_id, retry=retry
        )
        self._data, self._event = [], ""
        return event


def _split_line(buffer: bytes) -> tuple[bytes, bytes, bytes]:
    """Split off the first line; the separator is empty when no line is complete yet."""
    cr, lf = buffer.find(b"\r"), buffer.find(b"\n")
    if lf >= 0 and (cr < 0 or lf < cr):
        return buffer[:lf], b"\n", buffer[lf + 1 :]
    if cr < 0:
        return buffer, b"", b""
    if buffer[cr + 1 : cr + 2] == b"\n":
        return buffer[:cr], b"\r\n", buffer[cr + 2 :]
    return buffer[:cr], b"\r", buffer[cr + 1 :]
