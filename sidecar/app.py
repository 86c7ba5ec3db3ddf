"""One sidecar instance: the store, the hub, the feed from the store, and two listeners.

`run` owns everything in one nursery and signals readiness with `task_status.started`,
handing back a `Running` with the bound addresses. Setting `shutdown` drains: both
listeners stop accepting, open streams end so browsers reconnect elsewhere, in-flight
requests get `settings.shutdown_seconds` to finish, then the rest is cancelled.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from sidecar.config import Bind, Settings
from sidecar.http.public import PublicApp
from sidecar.http.send import build_send_app
from sidecar.hub import CloseReason, Hub
from sidecar.store import FeedItem, HistoryLost, Store, open_store
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


def _hypercorn_config(bind: Bind, settings: Settings) -> Config:
    config = Config()
    config.bind = [str(bind)]
    config.graceful_timeout = settings.shutdown_seconds
    config.accesslog = None
    config.errorlog = logging.getLogger("sidecar.http")
    config.include_server_header = False
    # A bot keeps one connection open for all its sends; hypercorn's default of 1000
    # requests per connection would close it under load.
    config.keep_alive_max_requests = 2**62
    return config


async def _pump_feed(
    store: Store, hub: Hub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Dispatch what the store's feed reports: other writers' messages (another instance,
    Tock itself) reach the streams held here."""
    send, receive = trio.open_memory_channel[FeedItem](FEED_BUFFER)
    async with trio.open_nursery() as nursery, receive:
        await nursery.start(store.run_feed, send)
        task_status.started()
        async for item in receive:
            if isinstance(item, HistoryLost):
                hub.history_lost()
            else:
                hub.dispatch(item)


async def run(
    settings: Settings,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with open_store(settings) as store, trio.open_nursery() as nursery:
        hub = Hub(settings.stream_buffer)
        marker = SentMarker(store)
        draining = trio.Event()
        nursery.start_soon(marker.run)
        await nursery.start(_pump_feed, store, hub)

        stop_listening = trio.Event()
        public_app = PublicApp(settings, hub, store, marker, draining)
        send_app = build_send_app(settings, hub, store)
        async with trio.open_nursery() as servers:
            (public_url,) = await servers.start(
                partial(
                    serve,
                    public_app,
                    _hypercorn_config(settings.public_bind, settings),
                    shutdown_trigger=stop_listening.wait,
                    mode="asgi",
                )
            )
            (send_url,) = await servers.start(
                partial(
                    serve,
                    send_app,
                    _hypercorn_config(settings.send_bind, settings),
                    shutdown_trigger=stop_listening.wait,
                    mode="asgi",
                )
            )
            log.info(
                "sidecar listening: public %s send %s store %s",
                public_url,
                send_url,
                settings.store.split("@")[-1],
            )
            task_status.started(Running(public_url, send_url, hub, store, settings))
            await shutdown.wait()
            log.info("draining: closing %d streams", hub.stream_count())
            draining.set()
            stop_listening.set()
            hub.close_all(CloseReason.SHUTDOWN)
        # Both servers have returned: every request is finished or was cut at the deadline.
        marker.close()
        with trio.move_on_after(settings.shutdown_seconds):
            await marker.flushed.wait()
        nursery.cancel_scope.cancel()
    log.info("stopped")
