"""Metrics, request ids and structured logs, end to end."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from sidecar import logs
from sidecar.hub import Hub
from sidecar.metrics import Metrics
from sidecar.protocol.message import IdGenerator, Message
from sidecar.store.sqlite import SqliteStore
from tests.sidecar_harness import (
    BrokenSqliteConnection,
    Sidecar,
    running_sidecar,
    settings_for,
    spawn_sidecar,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    """Every sample of a text exposition, by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(sidecar: Sidecar) -> Samples:
    reply = await sidecar.client.get(f"{sidecar.send_url}/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return _samples(reply.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_for_metric(sidecar: Sidecar, name: str, at_least: float, **labels: str) -> Samples:
    with trio.fail_after(10):
        while True:
            samples = await scrape(sidecar)
            if value(samples, name, **labels) >= at_least:
                return samples
            await trio.sleep(0.05)


# --- metrics --------------------------------------------------------------------------------


async def test_metrics_follow_a_message_from_send_to_ack(sidecar: Sidecar, tmp_path: Path) -> None:
    before = await scrape(sidecar)
    assert value(before, "sidecar_streams_open") == 0
    for reason in ("client", "slow", "shutdown", "replaced"):
        assert ("sidecar_streams_closed_total", (("reason", reason),)) in before

    async with sidecar.stream("alice") as client:
        message_id = await sidecar.send("alice")
        assert (await client.next_message()).id == message_id
        samples = await wait_for_metric(sidecar, "sidecar_messages_total", 1, transition="sent")
        assert value(samples, "sidecar_streams_open") == 1
        assert value(samples, "sidecar_streams_opened_total") == 1
        assert value(samples, "sidecar_messages_total", transition="enqueued") == 1
        assert value(samples, "sidecar_send_to_first_write_seconds_count") == 1
        assert value(samples, "sidecar_send_to_first_write_seconds_sum") < 5
        # The feed yields this instance's own saves too, logged; another writer's as well.
        assert value(samples, "sidecar_feed_events_total") == 1
        other = await SqliteStore.open(str(tmp_path / "sidecar.db"))
        try:
            await other.save([Message(IdGenerator()(), "web", "alice", {"from": "other"})])
        finally:
            await other.aclose()
        await client.next_message()
        samples = await wait_for_metric(sidecar, "sidecar_feed_events_total", 2)
        assert value(samples, "sidecar_feed_lag_seconds_count") == 2

        reply = await sidecar.client.post(
            f"{sidecar.public}/io/app/web/sse/ack?userId=alice", json={"ids": [message_id]}
        )
        assert reply.status_code == 204
        samples = await scrape(sidecar)
        assert value(samples, "sidecar_messages_total", transition="delivered") == 1

    samples = await wait_for_metric(sidecar, "sidecar_streams_closed_total", 1, reason="client")
    assert value(samples, "sidecar_streams_open") == 0
    assert value(samples, "sidecar_slow_consumer_disconnects_total") == 0
    assert value(samples, "sidecar_feed_resumes_total") == 0
    assert value(samples, "sidecar_sent_marks_dropped_total") == 0


async def test_a_message_nobody_listens_to_is_not_timed(sidecar: Sidecar) -> None:
    await sidecar.send("nobody")
    async with sidecar.stream("nobody", last_event_id="0" * 24) as client:
        await client.next_message()  # replayed, not live
    samples = await scrape(sidecar)
    assert value(samples, "sidecar_messages_total", transition="enqueued") == 1
    assert value(samples, "sidecar_send_to_first_write_seconds_count") == 0


async def test_instances_in_one_process_keep_their_own_metrics(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        running_sidecar(settings_for(tmp_path / "a")) as a,
        running_sidecar(settings_for(tmp_path / "b")) as b,
    ):
        await a.send("alice")
        await a.send("alice")
        assert value(await scrape(a), "sidecar_messages_total", transition="enqueued") == 2
        assert value(await scrape(b), "sidecar_messages_total", transition="enqueued") == 0


async def test_feed_lag_of_a_message_another_writer_stored(sidecar: Sidecar) -> None:
    db = sidecar.running.settings.store.removeprefix("sqlite:///")
    other = await SqliteStore.open(db)
    try:
        async with sidecar.stream("bob") as client:
            message = Message(IdGenerator()(), "web", "bob", {"text": "from elsewhere"})
            await other.save([message])
            assert (await client.next_message()).id == message.id
    finally:
        await other.aclose()
    samples = await wait_for_metric(sidecar, "sidecar_feed_lag_seconds_count", 1)
    assert value(samples, "sidecar_feed_lag_seconds_sum") < 60
    # Saved elsewhere: not a transition this instance made.
    assert value(samples, "sidecar_messages_total", transition="enqueued") == 0


async def test_store_errors_are_counted_by_operation(sidecar: Sidecar) -> None:
    store: Any = sidecar.running.store
    real, store._db = store._db, BrokenSqliteConnection()
    try:
        body = {"connectorId": "web", "recipientId": "alice", "response": {}}
        reply = await sidecar.client.post(f"{sidecar.send_url}/v1/send", json=body)
        assert reply.status_code == 503
        assert (await sidecar.client.get(f"{sidecar.send_url}/readyz")).status_code == 503
    finally:
        store._db = real
    samples = await scrape(sidecar)
    assert value(samples, "sidecar_store_errors_total", operation="save") == 1
    assert value(samples, "sidecar_store_errors_total", operation="ping") == 1
    assert value(samples, "sidecar_messages_total", transition="enqueued") == 0


async def test_slow_consumers_are_counted() -> None:
    metrics = Metrics()
    hub = Hub(1, metrics=metrics)
    new_id = IdGenerator()
    with hub.subscribe(("web", "slow")) as sub:
        hub.dispatch(Message(new_id(), "web", "slow", {}))
        hub.dispatch(Message(new_id(), "web", "slow", {}))
        assert sub.cancel_scope.cancel_called
    samples = _samples(metrics.exposition().decode())
    assert value(samples, "sidecar_slow_consumer_disconnects_total") == 1
    assert value(samples, "sidecar_streams_closed_total", reason="slow") == 1
    assert value(samples, "sidecar_streams_open") == 0


async def test_first_write_bookkeeping_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sidecar.metrics.FIRST_WRITE_TRACKED", 3)
    metrics = Metrics()
    for n in range(10):
        metrics.await_first_write(f"id{n}", Metrics.clock())
    assert list(metrics._first_write) == ["id7", "id8", "id9"]
    metrics.written("id0")  # forgotten: not measured
    metrics.written("id9")
    metrics.written("id9")  # only the first write counts
    samples = _samples(metrics.exposition().decode())
    assert value(samples, "sidecar_send_to_first_write_seconds_count") == 1


# --- request ids ---------------------------------------------------------------------------


async def test_a_sane_request_id_is_echoed_and_a_bad_one_replaced(sidecar: Sidecar) -> None:
    for base in (sidecar.public, sidecar.send_url):
        reply = await sidecar.client.get(f"{base}/healthz", headers={"X-Request-ID": "abc-123"})
        assert reply.headers["x-request-id"] == "abc-123"
        for bad in ("has space", "x" * 129, "é", ""):
            reply = await sidecar.client.get(
                f"{base}/healthz", headers={"X-Request-ID": bad.encode()}
            )
            generated = reply.headers["x-request-id"]
            assert generated != bad
            assert len(generated) == 32
            int(generated, 16)
        first = (await sidecar.client.get(f"{base}/healthz")).headers["x-request-id"]
        second = (await sidecar.client.get(f"{base}/healthz")).headers["x-request-id"]
        assert first != second


async def test_every_json_error_carries_the_request_id(sidecar: Sidecar) -> None:
    headers = {"X-Request-ID": "req-42"}
    requests = [
        # The send app (ApiError, werkzeug 404/405).
        ("POST", f"{sidecar.send_url}/v1/send", b"{", "invalid_json"),
        ("GET", f"{sidecar.send_url}/nowhere", None, "not_found"),
        ("GET", f"{sidecar.send_url}/v1/send", None, "method_not_allowed"),
        # The public listener: the raw ASGI stream route and the Quart ack route.
        ("GET", f"{sidecar.public}/io/app/web/sse", None, "missing_user_id"),
        ("POST", f"{sidecar.public}/io/app/web/sse", None, "method_not_allowed"),
        ("POST", f"{sidecar.public}/io/app/web/sse/ack?userId=a", b"[]", "invalid_ack"),
    ]
    for method, url, body, code in requests:
        reply = await sidecar.client.request(
            method,
            url,
            content=body,
            headers={**headers, "content-type": "application/json"},
        )
        assert reply.headers["x-request-id"] == "req-42", url
        assert reply.json()["error"]["code"] == code, reply.text
        assert reply.json()["error"]["requestId"] == "req-42", url


async def test_the_stream_response_carries_a_request_id(sidecar: Sidecar) -> None:
    async with sidecar.client.stream(
        "GET", sidecar.stream_url("alice"), headers={"X-Request-ID": "stream-1"}
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "stream-1"


# --- logs ----------------------------------------------------------------------------------


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """The root logger configured by `logs.configure`, writing to a buffer; restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buffer = io.StringIO()
    try:
        yield buffer
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)


async def test_json_logs_carry_the_request_id_and_no_payload(
    tmp_path: Path, log_output: io.StringIO
) -> None:
    logs.configure("DEBUG", "json", log_output)
    async with running_sidecar(settings_for(tmp_path)) as sc:
        async with sc.stream("alice") as client:
            item = {
                "connectorId": "web",
                "recipientId": "alice",
                "response": {"text": "SECRET-PAYLOAD"},
            }
            reply = await sc.client.post(
                f"{sc.send_url}/v1/send/batch",
                json=[item] * 3,
                headers={"X-Request-ID": "log-test-1"},
            )
            assert reply.status_code == 202
            await client.messages(3)
        await sc.client.get(f"{sc.send_url}/healthz", headers={"X-Request-ID": "log-test-2"})
    lines = log_output.getvalue().splitlines()
    assert lines
    records = [json.loads(line) for line in lines]  # one JSON object per line
    for record in records:
        assert {"ts", "level", "logger", "msg"} <= record.keys()
        assert record["ts"].endswith("Z")
    assert "SECRET-PAYLOAD" not in log_output.getvalue()
    access = [r for r in records if r["logger"] == "sidecar.http.access"]
    assert any(r.get("request_id") == "log-test-2" and "/healthz 200" in r["msg"] for r in access)
    assert any(r.get("request_id") == "log-test-1" and "/v1/send/batch" in r["msg"] for r in access)
    assert any(r["msg"].startswith("sidecar listening:") for r in records)
    assert "request_id" not in next(r for r in records if r["msg"] == "stopped")


def test_text_log_format_is_readable() -> None:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.TextFormatter())
    logger = logging.getLogger("sidecar.test.text")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        token = logs.request_id.set("r-9")
        logger.warning("hello %s", "world")
        logs.request_id.reset(token)
        logger.warning("outside")
        logger.warning("user %s", "x\n2026-01-01 00:00:00,000 ERROR sidecar: forged\\n\r")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    first, second, third = buffer.getvalue().splitlines()
    assert first.endswith("WARNING sidecar.test.text [r-9]: hello world")
    assert second.endswith("WARNING sidecar.test.text: outside")
    assert third.endswith(": user x\\n2026-01-01 00:00:00,000 ERROR sidecar: forged\\\\n\\r")


def test_json_formatter_keeps_a_traceback_on_one_line() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom\nnext", None, None)
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "boom\nnext"
    assert "ValueError: bad" in entry["exc"]


@pytest.mark.time_limit(40)
async def test_the_process_logs_json_by_default_and_text_on_request(tmp_path: Path) -> None:
    for fmt in ("json", "text"):
        env = {"SIDECAR_STORE": f"sqlite:///{tmp_path / fmt}.db"}
        if fmt == "text":
            env["SIDECAR_LOG_FORMAT"] = "text"
        async with spawn_sidecar(env) as process:
            process.process.terminate()
            log = (await process.read_log()).decode()
        lines = [line for line in log.splitlines() if line.strip()]
        assert any("sidecar listening:" in line for line in lines)
        if fmt == "json":
            entries = [json.loads(line) for line in lines]
            assert entries[-1]["msg"] == "stopped"
        else:
            assert lines[-1].endswith("INFO sidecar: stopped")
