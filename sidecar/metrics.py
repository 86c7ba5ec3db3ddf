"""Prometheus metrics of one instance, exposed at `/metrics` on the send listener and on the
metrics listener (`SIDECAR_METRICS_BIND`, sidecar/http/scrape.py).

Built on prometheus_client rather than a hand-written exposition: it gets the text format
0.0.4 right (label escaping, cumulative histogram buckets with `+Inf`, `_sum`/`_count`,
`_total` counters), which is easy to get subtly wrong and is what every Prometheus user
knows. Each instance has its own `CollectorRegistry`, never the library's process-global
default, so several instances in one process (the tests run many) keep separate counts.
An increment costs a lock acquire (about 100 ns), cheap enough for every path here; what
already has a count elsewhere (open streams, feed resumes, dropped SENT marks) is read at
scrape time instead of being counted twice.

Nothing here imports a store, the hub or the HTTP layer: they call in (the store through
its decorator, sidecar/store/instrumented.py), so the metrics stay optional for unit tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from sidecar.protocol.message import Message

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Streams close for one of these (hub.CloseReason values); listed so each shows from 0.
CLOSE_REASONS = ("client", "slow", "shutdown", "replaced")
REJECT_REASONS = ("instance_limit", "draining")
STORE_OPERATIONS = (
    "save", "head", "position_of", "logged", "mark_sent", "ack", "acknowledge_through", "get",
    "ping",
)  # fmt: skip
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Messages saved here whose first write is awaited; past this the oldest are forgotten (a
# message whose streams were all cut off is never written live).
FIRST_WRITE_TRACKED = 10000


class _ScrapeTimeCounters:
    """Counters whose value something else already keeps, read when scraped."""

    def __init__(self) -> None:
        self._counters: list[tuple[str, str, Callable[[], float]]] = []

    def add(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        self._counters.append((name, documentation, value))

    def collect(self) -> Iterable[Metric]:
        for name, documentation, value in self._counters:
            yield CounterMetricFamily(name, documentation, value=value())


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.streams_open = Gauge(
            "sidecar_streams_open", "SSE streams open on this instance", registry=registry
        )
        self.streams_opened = Counter(
            "sidecar_streams_opened", "SSE streams opened", registry=registry
        )
        self.streams_closed = Counter(
            "sidecar_streams_closed",
            "SSE streams closed, by reason: client (went away), slow (buffer full), "
            "shutdown (draining), replaced (the user opened one too many)",
            ["reason"],
            registry=registry,
        )
        self.streams_rejected = Counter(
            "sidecar_streams_rejected",
            "stream requests answered 503: instance_limit (SIDECAR_MAX_STREAMS), draining",
            ["reason"],
            registry=registry,
        )
        self.slow_consumer_disconnects = Counter(
            "sidecar_slow_consumer_disconnects",
            "streams cut off because their buffer was full",
            registry=registry,
        )
        self.messages = Counter(
            "sidecar_messages",
            "message state transitions made by this instance: enqueued (saved by the send "
            "API), sent (marked SENT), delivered (acknowledged)",
            ["transition"],
            registry=registry,
        )
        self.send_to_first_write = Histogram(
            "sidecar_send_to_first_write_seconds",
            "from the start of saving a message sent here to its first write to a stream here",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.feed_events = Counter(
            "sidecar_feed_events",
            "messages the store's feed (MongoDB change stream, SQLite poll) reported",
            registry=registry,
        )
        self.feed_history_lost = Counter(
            "sidecar_feed_history_lost",
            "times the feed could not resume and every stream re-read the store",
            registry=registry,
        )
        self.feed_lag = Histogram(
            "sidecar_feed_lag_seconds",
            "from a message's enqueuedAt to its dispatch from the feed",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "sidecar_store_errors",
            "store operations that failed as unavailable, by operation",
            ["operation"],
            registry=registry,
        )
        self._scrape_time = _ScrapeTimeCounters()
        registry.register(self._scrape_time)

        for reason in CLOSE_REASONS:
            self.streams_closed.labels(reason)
        for reason in REJECT_REASONS:
            self.streams_rejected.labels(reason)
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)
        self.enqueued = self.messages.labels("enqueued")
        self.sent = self.messages.labels("sent")
        self.delivered = self.messages.labels("delivered")
        self._first_write: dict[str, float] = {}

    def count_at_scrape(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        """Expose `value()` as the counter `name` (without `_total`, added here)."""
        self._scrape_time.add(name, documentation, value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- streams ----------------------------------------------------------------------

    def stream_closed(self, reason: str) -> None:
        self.streams_closed.labels(reason).inc()
        if reason == "slow":
            self.slow_consumer_disconnects.inc()

    # -- send to first write ----------------------------------------------------------

    @staticmethod
    def clock() -> float:
        return time.monotonic()

    def await_first_write(self, message_id: str, since: float) -> None:
        """Message `message_id`, whose save began at `since` (`clock()`), was queued on
        streams here: its first write there is measured."""
        pending = self._first_write
        if len(pending) >= FIRST_WRITE_TRACKED:
            del pending[next(iter(pending))]
        pending[message_id] = since

    def written(self, message_id: str) -> None:
        """A stream here wrote `message_id` (called for every write: keep it cheap)."""
        if self._first_write:
            since = self._first_write.pop(message_id, None)
            if since is not None:
                self.send_to_first_write.observe(time.monotonic() - since)

    # -- feed -------------------------------------------------------------------------

    def feed_message(self, message: Message) -> None:
        self.feed_events.inc()
        lag = time.time() - message.enqueued_at.timestamp()
        self.feed_lag.observe(max(lag, 0.0))
