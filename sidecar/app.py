"""One sidecar instance: the store, the hub, the feed from the store, and two listeners (a
third, serving only `/metrics`, with `SIDECAR_METRICS_BIND`).

`run` owns everything in one nursery and signals readiness with `task_status.started`,
handing back a `Running` with the bound addresses. Setting `shutdown` drains: the
listeners stop accepting, open streams end so browsers reconnect elsewhere, in-flight
requests get `settings.shutdown_seconds` to finish, then the rest is cancelled.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from sidecar.config import OPTIONS, Settings
from sidecar.http import hypercorn_patches
from sidecar.http.observe import RequestIds
from sidecar.http.public import PublicApp
from sidecar.http.scrape import build_metrics_app
from sidecar.http.send import SendApp
from sidecar.hub import CloseReason, Hub
from sidecar.metrics import Metrics
from sidecar.net import ListenerConfig
from sidecar.protocol.feed import FeedItem, HistoryLost
from sidecar.store import Store, StoreOptions, open_store
from sidecar.store.instrumented import InstrumentedStore
from sidecar.stream import SentMarker

log = logging.getLogger("sidecar")

FEED_BUFFER = 1024


@dataclasses.dataclass(frozen=True)
class Running:
    public_url: str
    send_url: str
    hub: Hub
    store: Store
    settings: Settings
    metrics_url: str | None = None  # with SIDECAR_METRICS_BIND


def _listener_config(name: str, settings: Settings) -> Config:
    """hypercorn's config for the listener of setting `name` (`public_bind`, `send_bind`,
    `metrics_bind`), with the settings' limits."""
    bind = getattr(settings, name)
    # Half-open and never-reading clients are cut off by the kernel after the write
    # timeout: hypercorn's writes cannot be cancelled from here (sidecar/net.py).
    config = ListenerConfig()
    config.write_timeout = settings.write_timeout_seconds
    option = next(o for o in OPTIONS if o.name == name)
    config.setting = f"{option.env} ({option.flag})"
    config.bind = [str(bind)]
    config.graceful_timeout = settings.shutdown_seconds
    config.accesslog = None
    config.errorlog = logging.getLogger("sidecar.http")
    config.include_server_header = False
    # A bot keeps one connection open for all its sends; hypercorn's default of 1000
    # requests per connection would close it under load.
    config.keep_alive_max_requests = 2**62
    # Request line plus headers: RequestIds answers 431 past it; this bounds what hypercorn
    # buffers of an incomplete request (it answers 431 itself past that).
    config.h11_max_incomplete_size = settings.max_header_bytes
    if name != "public_bind":
        # Not on the public listener: it keeps hypercorn's idle default for connections
        # between requests, and its only request body (an ack) is bounded by Quart's body
        # timeout.
        config.keep_alive_timeout = settings.send_idle_seconds
        # The whole body, not each read (sidecar/http/hypercorn_patches.py): a body trickled
        # a byte at a time would never end.
        config.body_timeout = settings.send_read_seconds
    return config


def store_options(settings: Settings) -> StoreOptions:
    """What the store is opened with, of the settings."""
    return StoreOptions(
        url=settings.store,
        connector_ids=tuple(c.id for c in settings.connectors),
        max_count=settings.queue_max_count,
        ttl_days=settings.queue_ttl_days,
        mongo_database=settings.mongo_database,
        mongo_capped=settings.mongo_capped,
        max_size_kb=settings.queue_max_size_kb,
    )


async def _pump_feed(
    store: Store, hub: Hub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Dispatch what the store's feed reports: every message logged, by any writer (this
    instance's send API, another instance, Tock itself), reaches the streams held here
    this way alone."""
    metrics = hub.metrics
    send, receive = trio.open_memory_channel[FeedItem](FEED_BUFFER)
    async with trio.open_nursery() as nursery, receive:
        await nursery.start(store.run_feed, send)
        task_status.started()
        async for item in receive:
            if isinstance(item, HistoryLost):
                metrics.feed_history_lost.inc()
                hub.history_lost()
            else:
                metrics.feed_message(item)
                hub.dispatch(item)


@dataclasses.dataclass(frozen=True)
class Core:
    """What an instance serves from, whatever HTTP server carries it."""

    raw_store: Store
    store: Store  # the same, counted by `metrics`
    hub: Hub
    marker: SentMarker
    metrics: Metrics


@asynccontextmanager
async def open_core(settings: Settings) -> AsyncIterator[Core]:
    """Open the store and run the sent marker, the hub's pinger and the feed for the
    block. On exit the marker gets `shutdown_seconds` to write what it has queued, then
    the rest is cancelled and the store closed."""
    async with open_store(store_options(settings)) as raw_store, trio.open_nursery() as nursery:
        metrics = Metrics()
        store = InstrumentedStore(raw_store, metrics)
        hub = Hub(
            settings.stream_buffer, max_per_key=settings.max_streams_per_user, metrics=metrics
        )
        marker = SentMarker(store)
        metrics.count_at_scrape(
            "sidecar_feed_resumes",
            "times the store's feed reopened its change stream after an interruption",
            lambda: raw_store.feed_resumes,
        )
        metrics.count_at_scrape(
            "sidecar_sent_marks_dropped",
            "SENT marks dropped because their queue was full (the message replays once more)",
            lambda: marker.dropped,
        )
        nursery.start_soon(marker.run)
        await nursery.start(hub.run_pings)
        await nursery.start(_pump_feed, store, hub)
        yield Core(raw_store, store, hub, marker, metrics)
        marker.close()
        with trio.move_on_after(settings.shutdown_seconds):
            await marker.flushed.wait()
        nursery.cancel_scope.cancel()


async def run(
    settings: Settings,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    # Once, before anything opens: a hypercorn these patches no longer fit stops start-up.
    hypercorn_patches.install()
    async with open_core(settings) as core:
        hub, store = core.hub, core.store
        draining = trio.Event()
        stop_listening = trio.Event()
        public_app = RequestIds(
            PublicApp(settings, hub, store, core.marker, draining), settings.max_header_bytes
        )
        send_app = RequestIds(SendApp(settings, hub, store), settings.max_header_bytes)
        listeners = [("public_bind", public_app), ("send_bind", send_app)]
        if settings.metrics_bind is not None:
            metrics_app = RequestIds(build_metrics_app(core.metrics), settings.max_header_bytes)
            listeners.append(("metrics_bind", metrics_app))
        async with trio.open_nursery() as servers:
            urls = []
            for name, app in listeners:
                config = _listener_config(name, settings)
                (url,) = await servers.start(
                    partial(serve, app, config, shutdown_trigger=stop_listening.wait, mode="asgi")
                )
                urls.append(url)
            public_url, send_url, *more = urls
            metrics_url = more[0] if more else None
            log.info(
                "sidecar listening: public %s send %s%s store %s",
                public_url,
                send_url,
                f" metrics {metrics_url}" if metrics_url else "",
                settings.store.split("@")[-1],
            )
            # `Running.store` is the store itself (tests reach into it), not the counted one.
            task_status.started(
                Running(public_url, send_url, hub, core.raw_store, settings, metrics_url)
            )
            await shutdown.wait()
            log.info("draining: closing %d streams", hub.stream_count())
            draining.set()
            stop_listening.set()
            hub.close_all(CloseReason.SHUTDOWN)
        # Every server has returned: every request is finished or was cut at the deadline.
    log.info("stopped")
