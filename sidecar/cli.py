"""`sidecar serve`: every setting from a flag or the environment (see sidecar.config)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version

import trio

from sidecar import app, logs, startup
from sidecar.config import OPTIONS, ConfigError, Settings, StartupError
from sidecar.store import StoreError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="SSE sidecar for Tock bots")
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version('tock-sse-sidecar')}"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the sidecar")
    for option in OPTIONS:
        aliases = f"; also {', '.join(option.aliases)}" if option.aliases else ""
        serve.add_argument(
            option.flag,
            dest=option.name,
            metavar="VALUE",
            help=f"{option.help} [env {option.env}{aliases}; default {option.default!r}]",
            # A true/false setting's flag alone means true: `--demo`, or `--demo false`.
            nargs="?" if option.boolean else None,
            const="true" if option.boolean else None,
        )
    _add_token_parser(commands)
    return parser


def _add_token_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser(
        "token", help="print a signed identity token (SIDECAR_IDENTITY=signed)"
    )
    token.add_argument("--user", required=True, help="the user id the token grants")
    token.add_argument("--connector", required=True, help="the connector id it is valid for")
    token.add_argument("--ttl-seconds", type=int, default=3600, help="lifetime (default 3600)")
    token.add_argument(
        "--signing-keys",
        metavar="KEYS",
        help="KEYID:SECRET,... (the first signs) [env SIDECAR_SIGNING_KEYS]",
    )


def _mint_token(args: argparse.Namespace) -> int:
    """`sidecar token`: a token for --user on --connector, signed with the first key."""
    from sidecar.identity import user_id_problem
    from sidecar.protocol import token

    raw = args.signing_keys
    source = "--signing-keys"
    if raw is None:
        raw, source = os.environ.get("SIDECAR_SIGNING_KEYS", ""), "SIDECAR_SIGNING_KEYS"
    try:
        keys = token.parse_keys(raw)
    except ValueError as exc:
        print(f"sidecar: invalid configuration: {source}: {exc}", file=sys.stderr)
        return 2
    if not keys:
        print(f"sidecar: invalid configuration: {source}: no signing key", file=sys.stderr)
        return 2
    problem = user_id_problem(args.user)
    if problem is not None:
        print(f"sidecar: --user {problem}: no stream would take the token", file=sys.stderr)
        return 2
    if args.ttl_seconds < 1:
        print("sidecar: --ttl-seconds must be positive", file=sys.stderr)
        return 2
    expires = int(time.time()) + args.ttl_seconds
    print(token.mint(keys[0], args.user, args.connector, expires))
    return 0


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
    if args.command == "token":
        return _mint_token(args)
    try:
        settings = Settings.load(os.environ, vars(args))
        logs.configure(settings.log_level, settings.log_format, sys.stderr)
        startup.prepare(settings, os.environ)
    except ConfigError as exc:
        print(f"sidecar: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_serve, settings)
    except Exception as exc:
        reason = _operator_error(exc)
        if reason is None:
            raise
        print(f"sidecar: {reason}", file=sys.stderr)
        return 1
    return 0


def _operator_error(exc: BaseException) -> BaseException | None:
    """The store or listener failure in `exc` (trio's nurseries wrap errors in groups),
    which an operator fixes and which needs no traceback; None for anything else."""
    if isinstance(exc, StoreError | StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _operator_error(inner)
            if found is not None:
                return found
    return None
