"""The changes to hypercorn's internals are installed once, and refuse a hypercorn they no
longer fit (sidecar/http/hypercorn_patches.py); what they do is tested end to end in
tests/test_abuse.py, tests/test_e2e_limits.py and tests/test_half_open.py."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import hypercorn.protocol
import hypercorn.protocol.h11
import hypercorn.protocol.http_stream
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import pytest

from sidecar import cli
from sidecar.config import StartupError
from sidecar.http import hypercorn_patches


def test_each_hook_is_in_place_once_after_installing_twice() -> None:
    hypercorn_patches.install()
    hypercorn_patches.install()
    # Where hypercorn looks each class up, the sidecar's, directly on hypercorn's own: a
    # second install wraps nothing again.
    for installed, original in (
        (hypercorn.trio.run.TCPServer, hypercorn.trio.tcp_server.TCPServer),
        (hypercorn.protocol.H11Protocol, hypercorn.protocol.h11.H11Protocol),
        (hypercorn.protocol.h11.HTTPStream, hypercorn.protocol.http_stream.HTTPStream),
    ):
        assert installed.__module__ == "sidecar.http.hypercorn_patches"
        assert installed.__bases__ == (original,)
        assert original.__module__.startswith("hypercorn.")
    # The recycling (shield, then the held head, then hypercorn's) is one method, once.
    recycle = hypercorn.protocol.H11Protocol._maybe_recycle
    assert recycle.__qualname__ == "_H11Protocol._maybe_recycle"
    assert hypercorn.protocol.h11.H11Protocol._maybe_recycle.__module__ == (
        "hypercorn.protocol.h11"
    )


HOOKS = [
    (hypercorn.trio.run, "TCPServer", "hypercorn.trio.run.TCPServer"),
    (hypercorn.protocol, "H11Protocol", "hypercorn.protocol.H11Protocol"),
    (hypercorn.protocol.h11, "HTTPStream", "hypercorn.protocol.h11.HTTPStream"),
    (hypercorn.trio.tcp_server.TCPServer, "_read_data", "hypercorn.trio.run.TCPServer._read_data"),
    (
        hypercorn.trio.tcp_server.TCPServer,
        "protocol_send",
        "hypercorn.trio.run.TCPServer.protocol_send",
    ),
    (
        hypercorn.protocol.h11.H11Protocol,
        "_check_protocol",
        "hypercorn.protocol.H11Protocol._check_protocol",
    ),
    (
        hypercorn.protocol.h11.H11Protocol,
        "_maybe_recycle",
        "hypercorn.protocol.H11Protocol._maybe_recycle",
    ),
    (
        hypercorn.protocol.http_stream.HTTPStream,
        "handle",
        "hypercorn.protocol.h11.HTTPStream.handle",
    ),
]


@pytest.mark.parametrize(("owner", "name", "hook"), HOOKS, ids=[h[2] for h in HOOKS])
def test_a_missing_hook_stops_install_naming_hypercorns_version(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, hook: str
) -> None:
    monkeypatch.delattr(owner, name)
    with pytest.raises(StartupError) as raised:
        hypercorn_patches.install()
    message = str(raised.value)
    assert f"hypercorn {version('hypercorn')} is not supported" in message
    assert hook in message


def test_a_hook_replaced_by_something_else_stops_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn.protocol, "H11Protocol", type("H11Protocol", (), {}))
    with pytest.raises(StartupError, match=r"hypercorn\.protocol\.H11Protocol, which"):
        hypercorn_patches.install()


def test_a_missing_hook_stops_start_up_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delattr(hypercorn.protocol.h11.H11Protocol, "_check_protocol")
    for name, value in {
        "SIDECAR_PUBLIC_BIND": "127.0.0.1:0",
        "SIDECAR_SEND_BIND": "127.0.0.1:0",
        "SIDECAR_STORE": f"sqlite:///{tmp_path / 'sidecar.db'}",
    }.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"sidecar: hypercorn {version('hypercorn')} is not supported: "), err
    assert "hypercorn.protocol.H11Protocol._check_protocol" in err
    assert not (tmp_path / "sidecar.db").exists()  # stopped before opening anything
