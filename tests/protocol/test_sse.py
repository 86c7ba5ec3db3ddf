"""SSE frames: exact encoder output, the incremental parser, and a property test that checks
the encoder, the parser and an independent reference parser against each other."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.protocol.sse import PING, Event, Parser, dumps, encode, encode_message

MESSAGE_ID = "65a1b2c3d4e5f60718293a4b"


# --- a second parser, straight from the HTML standard's event-stream interpretation -------


def reference_parse(stream: bytes) -> tuple[list[tuple[str, str, str]], str]:
    """(event type, data, last event id) per dispatched event, and the final last event id."""
    text = stream.decode("utf-8", errors="replace").removeprefix("\ufeff")
    lines = re.split(r"\r\n|\r|\n", text)[:-1]  # what follows the last line break is no line
    events, data, event_type, id_buffer, last_id = [], "", "", "", ""
    for line in lines:
        if line == "":
            last_id = id_buffer
            if data:
                events.append((event_type or "message", data[:-1], last_id))
            data, event_type = "", ""
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data += value + "\n"
            elif name == "event":
                event_type = value
            elif name == "id" and "\0" not in value:
                id_buffer = value
    return events, last_id


def feed_all(parser: Parser, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


def parse(stream: bytes) -> list[Event]:
    return Parser().feed(stream)


def byte_by_byte(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# --- encoding ------------------------------------------------------------------------------


def test_ping_bytes() -> None:
    assert PING == b"event: ping\ndata: 1\n\n"
    assert parse(PING) == [Event(event="ping", data="1")]


@pytest.mark.parametrize(
    ("data", "kwargs", "expected"),
    [
        ("", {}, b"data: \n\n"),
        ("x", {}, b"data: x\n\n"),
        ("x", {"event": "e", "id": "1"}, b"id: 1\nevent: e\ndata: x\n\n"),
        ("x", {"id": ""}, b"id: \ndata: x\n\n"),
        ("a\nb", {}, b"data: a\ndata: b\n\n"),
        ("a\rb", {}, b"data: a\ndata: b\n\n"),
        ("a\r\nb", {}, b"data: a\ndata: b\n\n"),
        ("a\n\rb", {}, b"data: a\ndata: \ndata: b\n\n"),
        ("a\n", {}, b"data: a\ndata: \n\n"),
        ("\n", {}, b"data: \ndata: \n\n"),
        (" lead", {}, b"data:  lead\n\n"),
        (": not a comment", {}, b"data: : not a comment\n\n"),
        ("é😀\u2028", {}, "data: é😀\u2028\n\n".encode()),
    ],
)
def test_encode_exact(data: str, kwargs: dict[str, str], expected: bytes) -> None:
    assert encode(data, **kwargs) == expected


@pytest.mark.parametrize(
    "data", ["", "x", "a\nb", "a\rb", "a\r\nb", "a\n\n\nb", "\r\n", " x ", "é😀", "data: x"]
)
def test_encode_then_parse_gives_the_data_back(data: str) -> None:
    normalized = data.replace("\r\n", "\n").replace("\r", "\n")
    assert parse(encode(data, event="e", id="7")) == [Event(event="e", data=normalized, id="7")]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "\n", "x\r"])
@pytest.mark.parametrize("field", ["id", "event"])
def test_encode_refuses_line_breaks_in_id_and_event(field: str, bad: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        encode("x", **{field: bad})


@pytest.mark.parametrize(
    ("response", "json_text"),
    [
        ({}, "{}"),
        ({"text": "hi"}, '{"text":"hi"}'),
        ({"a": [1, 2.5, None, True, False]}, '{"a":[1,2.5,null,true,false]}'),
        ({"text": "a\nb"}, '{"text":"a\\nb"}'),
        ({"text": "a\rb"}, '{"text":"a\\rb"}'),
        ({"text": "a\r\nb"}, '{"text":"a\\r\\nb"}'),
        ({"text": "été"}, '{"text":"été"}'),
        ({"text": "😀"}, '{"text":"😀"}'),
        ({"text": "\u2028\u2029\u0085"}, '{"text":"\u2028\u2029\u0085"}'),
        ({"text": "tab\there"}, '{"text":"tab\\there"}'),
        ({"q": '"\\'}, '{"q":"\\"\\\\"}'),
        ({"nested": {"k": {"k": []}}}, '{"nested":{"k":{"k":[]}}}'),
    ],
)
def test_encode_message_exact(response: dict[str, Any], json_text: str) -> None:
    frame = encode_message(MESSAGE_ID, response)
    assert frame == f"id: {MESSAGE_ID}\nevent: message\ndata: {json_text}\n\n".encode()
    assert dumps(response) == json_text
    assert frame.count(b"\n") == 4  # the response is always a single data line
    assert parse(frame) == [Event(event="message", data=json_text, id=MESSAGE_ID)]
    assert json.loads(json_text) == response


# --- the parser ----------------------------------------------------------------------------

PARSER_CASES: list[tuple[str, bytes, list[Event]]] = [
    ("lf", b"data: a\n\n", [Event(data="a")]),
    ("crlf", b"data: a\r\n\r\n", [Event(data="a")]),
    ("cr", b"data: a\r\r", [Event(data="a")]),
    ("mixed endings", b"data: a\rdata: b\r\ndata: c\n\n", [Event(data="a\nb\nc")]),
    ("cr then crlf", b"data: a\r\r\n", [Event(data="a")]),
    ("two events", b"data: a\n\ndata: b\n\n", [Event(data="a"), Event(data="b")]),
    ("blank lines around", b"\n\r\n\rdata: a\n\n\n\n", [Event(data="a")]),
    ("comments ignored", b": hi\ndata: a\n:\n: data: b\n\n", [Event(data="a")]),
    ("only a comment", b": keepalive\n\n", []),
    ("no space after colon", b"data:a\n\n", [Event(data="a")]),
    ("only one space stripped", b"data:  a\n\n", [Event(data=" a")]),
    ("colon in value", b"data: a: b\n\n", [Event(data="a: b")]),
    ("field without colon", b"data\n\n", [Event(data="")]),
    ("two empty data lines", b"data\ndata\n\n", [Event(data="\n")]),
    ("empty data value", b"data:\n\n", [Event(data="")]),
    ("event type", b"event: ping\ndata: 1\n\n", [Event(event="ping", data="1")]),
    ("empty event type is message", b"event:\ndata: 1\n\n", [Event(data="1")]),
    ("event without data not dispatched", b"event: x\n\n", []),
    ("event type reset after no-data", b"event: x\n\ndata: y\n\n", [Event(data="y")]),
    ("event type reset after event", b"event: x\ndata: 1\n\ndata: 2\n\n",
     [Event(event="x", data="1"), Event(data="2")]),
    ("id", b"id: 7\ndata: a\n\n", [Event(data="a", id="7")]),
    ("id without data not dispatched", b"id: 7\n\n", []),
    ("id with nul ignored", b"id: a\x00b\ndata: x\n\n", [Event(data="x")]),
    ("last id field wins", b"id: 1\nid: 2\ndata: x\n\n", [Event(data="x", id="2")]),
    ("retry", b"retry: 1500\ndata: x\n\n", [Event(data="x", retry=1500)]),
    ("retry not a number", b"retry: 1.5\ndata: x\n\n", [Event(data="x")]),
    ("retry negative", b"retry: -1\ndata: x\n\n", [Event(data="x")]),
    ("retry empty", b"retry:\ndata: x\n\n", [Event(data="x")]),
    ("retry non-ascii digit", "retry: ²\ndata: x\n\n".encode(), [Event(data="x")]),
    ("retry arabic digits", "retry: ١٢\ndata: x\n\n".encode(), [Event(data="x")]),
    ("unknown field ignored", b"foo: bar\nData: y\ndata: x\n\n", [Event(data="x")]),
    ("unfinished event dropped", b"data: x\n", []),
    ("unfinished line dropped", b"data: x", []),
    ("leading bom ignored", b"\xef\xbb\xbfdata: x\n\n", [Event(data="x")]),
    ("only one bom ignored", b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n", []),
    ("bom later is data", "data: \ufeffx\n\n".encode(), [Event(data="\ufeffx")]),
    ("utf-8", "data: été 😀\n\n".encode(), [Event(data="été 😀")]),
    ("invalid utf-8 replaced", b"data: \xff\xfe\n\n", [Event(data="\ufffd\ufffd")]),
    ("nul in data kept", b"data: a\x00b\n\n", [Event(data="a\x00b")]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stream", "expected"), [case[1:] for case in PARSER_CASES], ids=[c[0] for c in PARSER_CASES]
)
def test_parser(stream: bytes, expected: list[Event]) -> None:
    assert parse(stream) == expected
    assert feed_all(Parser(), byte_by_byte(stream)) == expected
    for cut in range(len(stream) + 1):
        assert feed_all(Parser(), [stream[:cut], stream[cut:]]) == expected, cut
    assert [(e.event, e.data) for e in expected] == [e[:2] for e in reference_parse(stream)[0]]


def test_parser_tracks_last_event_id() -> None:
    parser = Parser()
    assert parser.last_event_id == ""
    assert parser.feed(b"id: 1\ndata: a\n\n") == [Event(data="a", id="1")]
    assert parser.last_event_id == "1"
    # An event without an id keeps the last one.
    assert parser.feed(b"data: b\n\n") == [Event(data="b")]
    assert parser.last_event_id == "1"
    # An id is taken at the blank line even when nothing is dispatched.
    assert parser.feed(b"id: 2\n") == []
    assert parser.last_event_id == "1"
    assert parser.feed(b"\n") == []
    assert parser.last_event_id == "2"
    # A nul makes the field ignored; an empty id resets it.
    assert parser.feed(b"id: 3\x00\ndata: c\n\n") == [Event(data="c")]
    assert parser.last_event_id == "2"
    assert parser.feed(b"id\ndata: d\n\n") == [Event(data="d", id="")]
    assert parser.last_event_id == ""


def test_lone_cr_at_chunk_end_then_lf_is_one_line_break() -> None:
    parser = Parser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # the \n completes "\r\n": not a blank line
    assert parser.feed(b"") == []
    assert parser.feed(b"\r") == [Event(data="a")]
    assert parser.feed(b"\n") == []  # belongs to the \r that ended the event
    assert parser.feed(b"data: b\n\n") == [Event(data="b")]


def test_lone_cr_at_chunk_end_survives_empty_chunks() -> None:
    parser = Parser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n\n") == [Event(data="a")]


def test_cr_ending_dispatches_without_waiting_for_more_bytes() -> None:
    parser = Parser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == [Event(data="a")]


def test_cr_then_other_bytes_in_next_chunk() -> None:
    parser = Parser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"data: b\r\r") == [Event(data="a\nb")]


def test_retry_only_applies_to_its_event() -> None:
    parser = Parser()
    assert parser.feed(b"retry: 10\ndata: a\n\ndata: b\n\n") == [
        Event(data="a", retry=10),
        Event(data="b"),
    ]


def test_encoded_frames_byte_by_byte() -> None:
    stream = PING + encode_message(MESSAGE_ID, {"text": "a\nb é"}) + PING
    parser = Parser()
    events = feed_all(parser, byte_by_byte(stream))
    assert events == [
        Event(event="ping", data="1"),
        Event(event="message", data='{"text":"a\\nb é"}', id=MESSAGE_ID),
        Event(event="ping", data="1"),
    ]
    assert parser.last_event_id == MESSAGE_ID


# --- properties ----------------------------------------------------------------------------

line_break_chars = st.sampled_from('\n\r\u2028\u2029\u0085\ufeff\x00\t"\\')
# Any Unicode scalar value (lone surrogates have no UTF-8 form).
texts = st.text(st.one_of(st.characters(codec="utf-8"), line_break_chars), max_size=12)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=20,
)
message_ids = st.from_regex(r"[0-9a-f]{24}", fullmatch=True)


def chunked(data: st.DataObject, stream: bytes) -> list[bytes]:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts")
    return split_at(stream, cuts)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.tuples(message_ids, json_values), min_size=1, max_size=3), data=st.data())
def test_encode_message_round_trips(values: list[tuple[str, Any]], data: st.DataObject) -> None:
    stream = b"".join(PING + encode_message(i, v) for i, v in values)
    parser = Parser()
    events = [e for e in feed_all(parser, chunked(data, stream)) if e.event != "ping"]
    assert len(events) == len(values)
    for event, (message_id, value) in zip(events, values, strict=True):
        assert event.event == "message"
        assert event.id == message_id
        assert json.loads(event.data) == value
    assert parser.last_event_id == values[-1][0]
    reference, last_id = reference_parse(stream)
    assert [(e.event, e.data, e.id) for e in events] == [r for r in reference if r[0] != "ping"]
    assert last_id == parser.last_event_id


field_lines = st.one_of(
    st.builds(lambda v: "data: " + v, texts),
    st.builds(lambda v: "data:" + v, texts),
    st.just("data"),
    st.builds(lambda v: "event: " + v, st.sampled_from(["", "message", "ping", "x"])),
    st.builds(lambda v: "id: " + v, texts),
    st.just("id"),
    st.builds(lambda v: "retry: " + v, st.sampled_from(["10", "x", "", "²"])),
    st.builds(lambda v: ":" + v, texts),
    st.builds(lambda v: "other: " + v, texts),
    st.just(""),
    st.just(""),
)


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.tuples(field_lines, st.sampled_from(["\n", "\r", "\r\n"])), max_size=12),
    bom=st.booleans(),
    junk=st.sampled_from([b"", b"\xff", b"\xe2\x82", b"\r", b"\n"]),
    data=st.data(),
)
def test_parser_agrees_with_reference(
    lines: list[tuple[str, str]], bom: bool, junk: bytes, data: st.DataObject
) -> None:
    stream = (
        b"\xef\xbb\xbf" * bom + "".join(line + sep for line, sep in lines).encode("utf-8") + junk
    )
    parser = Parser()
    events = feed_all(parser, chunked(data, stream))
    reference, last_id = reference_parse(stream)
    assert [(e.event, e.data) for e in events] == [r[:2] for r in reference]
    for event, ref in zip(events, reference, strict=True):
        if event.id is not None:
            assert event.id == ref[2]
    assert parser.last_event_id == last_id
