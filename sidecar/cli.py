"""`sidecar serve`: every setting from a flag or the environment (see sidecar.config)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from sidecar import app
from sidecar.config import OPTIONS, ConfigError, Settings
from sidecar.store import StoreUnavailable


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="SSE sidecar for Tock bots")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the sidecar")
    for option in OPTIONS:
        aliases = f"; also {', '.join(option.aliases)}" if option.aliases else ""
        serve.add_argument(
            option.flag,
            dest=option.name,
            metavar="VALUE",
            help=f"{option.help} [env {option.env}{aliases}; default {option.default!r}]",
        )
    return parser


async def _serve(settings: Settings) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    shutdown.set()

        nursery.start_soon(on_signals)
        await app.run(settings, shutdown)
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load(os.environ, vars(args))
    except ConfigError as exc:
        print(f"sidecar: invalid configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(_serve, settings)
    except StoreUnavailable as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1
    return 0
