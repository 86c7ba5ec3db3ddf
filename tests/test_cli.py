"""`sidecar` as an operator runs it: one-line refusals, start-up checks and warnings
(sidecar/startup.py), flags, the version, and the rate-limited accept-error log."""

from __future__ import annotations

import errno
import io
import logging
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
import trio

from sidecar import cli, logs
from sidecar.config import OPTIONS, Option, Settings
from sidecar.startup import FD_RESERVE
from tests.test_config import BAD, OPTION

SERVE = [sys.executable, "-m", "sidecar", "serve"]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SIDECAR_* or Tock setting from the outside; loopback binds."""
    for option in OPTIONS:
        for name in option.aliases:
            monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.upper().startswith("SIDECAR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SIDECAR_PUBLIC_BIND", "127.0.0.1:0")
    monkeypatch.setenv("SIDECAR_SEND_BIND", "127.0.0.1:0")
    monkeypatch.setenv("SIDECAR_LOG_FORMAT", "text")
    return monkeypatch


@pytest.fixture
def root_logging() -> Iterator[None]:
    """cli.main configures the root logger and trio's accept logger: restore both after."""
    root, accept = logging.getLogger(), logging.getLogger(logs.ACCEPT_ERRORS)
    handlers, level, filters = list(root.handlers), root.level, list(accept.filters)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        accept.filters[:] = filters


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("SIDECAR_")}
    return base | {
        "SIDECAR_PUBLIC_BIND": "127.0.0.1:0",
        "SIDECAR_SEND_BIND": "127.0.0.1:0",
        "SIDECAR_STORE": f"sqlite:///{tmp_path / 'sidecar.db'}",
        "SIDECAR_LOG_FORMAT": "text",
        **extra,
    }


# --- invalid settings: exit 2, one line ------------------------------------------------------


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize(("name", "value"), BAD)
def test_every_bad_value_exits_2_with_one_line_naming_the_setting(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    option = OPTION[name]
    env.setenv(option.env, value)
    assert cli.main(["serve"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"sidecar: invalid configuration: {option.env}: ")
    assert err.endswith("\n")
    assert err[:-1].isprintable(), err


@pytest.mark.parametrize(
    "url", ["mongodb://", "mongodb://host:notaport", "mongodb://admin:s3cret@h:x"]
)
def test_malformed_mongodb_url_from_the_command_is_one_line(tmp_path: Path, url: str) -> None:
    result = subprocess.run(
        SERVE,
        env=subprocess_env(tmp_path, SIDECAR_STORE=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    line, rest = result.stderr.split("\n", 1)
    assert rest == ""
    assert line.startswith(
        "sidecar: invalid configuration: SIDECAR_STORE: not a valid MongoDB URL: "
    )
    assert "s3cret" not in line


@pytest.mark.usefixtures("root_logging")
def test_a_srv_name_that_does_not_resolve_exits_1_with_one_line(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dns.resolver

    def nxdomain(*args: object, **kwargs: object) -> None:
        raise dns.resolver.NXDOMAIN

    env.setattr(dns.resolver, "resolve", nxdomain)  # no DNS query leaves the machine
    env.setenv("SIDECAR_STORE", "mongodb+srv://admin:s3cret@cluster0.example.invalid/tock")
    assert cli.main(["serve"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("sidecar: SIDECAR_STORE: cannot open MongoDB store: ")
    assert "s3cret" not in err


@pytest.mark.usefixtures("root_logging")
def test_a_mongodb_host_that_does_not_answer_exits_1_with_one_line(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env.setenv("SIDECAR_STORE", f"mongodb://admin:s3cret@127.0.0.1:{port}/?directConnection=true")
    assert cli.main(["serve"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("sidecar: SIDECAR_STORE: cannot open MongoDB store: ")
    assert "s3cret" not in err


# --- flags -------------------------------------------------------------------------------------


def settings_from(argv: list[str]) -> Settings:
    return Settings.load({}, vars(cli._parser().parse_args(["serve", *argv])))


BOOLEANS = [o for o in OPTIONS if o.boolean]


def test_the_boolean_settings_are_the_four_flags() -> None:
    assert {o.flag for o in BOOLEANS} == {
        "--demo",
        "--cors-credentials",
        "--mongo-capped",
        "--replay-sent",
    }


@pytest.mark.parametrize("option", BOOLEANS, ids=lambda o: o.flag)
def test_a_boolean_flag_alone_means_true(option: Option) -> None:
    name, flag = option.name, option.flag
    assert getattr(settings_from([flag]), name) is True
    assert getattr(settings_from([flag, "--log-level", "debug"]), name) is True
    assert getattr(settings_from([flag, "true"]), name) is True
    assert getattr(settings_from([flag, "false"]), name) is False
    assert getattr(settings_from([]), name) is False


def test_other_flags_still_need_a_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--max-streams"])
    assert info.value.code == 2
    assert "expected one argument" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"sidecar {version('tock-sse-sidecar')}\n"


def test_version_from_the_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, f"sidecar {version('tock-sse-sidecar')}\n")


# --- start-up warnings ---------------------------------------------------------------------


@pytest.fixture
def start(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Callable[..., list[str]]:
    def run(*argv: str) -> list[str]:
        env.setenv("SIDECAR_STORE", f"sqlite:///{tmp_path}/missing/sidecar.db")
        assert cli.main(["serve", *argv]) == 1
        lines = capsys.readouterr().err.splitlines()
        assert lines[-1].startswith("sidecar: SIDECAR_STORE: cannot open SQLite store")
        return lines[:-1]

    return run


def warnings_in(lines: list[str]) -> list[str]:
    return [line.split(" WARNING sidecar: ", 1)[1] for line in lines if " WARNING " in line]


@pytest.mark.usefixtures("root_logging")
def test_unknown_sidecar_variables_are_warned_about_with_the_closest_setting(
    env: pytest.MonkeyPatch, start: Callable[..., list[str]]
) -> None:
    env.setenv("SIDECAR_KEEPALIVE_SECOND", "3")
    env.setenv("SIDECAR_MAX_STREAM", "5")
    env.setenv("sidecar_store", "x")
    env.setenv("SIDECAR_XYZZY", "1")
    env.setenv("SIDECAR_DEMO", "false")  # known: no warning
    env.setenv("OTHER_SETTING", "1")  # not ours: no warning
    assert warnings_in(start()) == [
        "SIDECAR_KEEPALIVE_SECOND is not a setting and is ignored;"
        " did you mean SIDECAR_KEEPALIVE_SECONDS?",
        "SIDECAR_MAX_STREAM is not a setting and is ignored; did you mean SIDECAR_MAX_STREAMS?",
        "SIDECAR_XYZZY is not a setting and is ignored; no setting has a name like it",
        "sidecar_store is not a setting and is ignored; did you mean SIDECAR_STORE?",
    ]


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize(
    ("bind", "token", "warned"),
    [
        ("0.0.0.0:0", None, True),
        ("[::]:0", None, True),
        ("192.0.2.1:0", None, True),
        ("sidecar.example:0", None, True),
        ("0.0.0.0:0", "t0ken", False),
        ("127.0.0.1:0", None, False),
        ("127.3.2.1:0", None, False),
        ("[::1]:0", None, False),
        ("localhost:0", None, False),
    ],
)
def test_a_send_listener_beyond_loopback_without_a_token_is_warned_about(
    env: pytest.MonkeyPatch,
    start: Callable[..., list[str]],
    bind: str,
    token: str | None,
    warned: bool,
) -> None:
    env.setenv("SIDECAR_SEND_BIND", bind)
    if token is not None:
        env.setenv("SIDECAR_SEND_TOKEN", token)
    shown = Settings.load({"SIDECAR_SEND_BIND": bind}).send_bind
    warning = (
        f"the send listener (SIDECAR_SEND_BIND {shown}) binds beyond loopback and"
        " SIDECAR_SEND_TOKEN is not set: anyone who reaches it can send to any user"
    )
    expected = [warning] if warned else []
    assert warnings_in(start()) == expected


# --- file descriptors ------------------------------------------------------------------------


def nofile(soft: int, hard: int) -> Callable[[], None]:
    def set_limit() -> None:  # in the child, before it runs the sidecar
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return set_limit


@pytest.mark.parametrize(
    ("limit", "streams", "hint"),
    [
        (1200, "1000", "raise it to 1512 or lower the setting to 688"),
        (300, None, "raise it to 10512"),
    ],
)
def test_refuses_to_start_when_the_streams_do_not_fit_the_descriptor_limit(
    tmp_path: Path, limit: int, streams: str | None, hint: str
) -> None:
    extra = {"SIDECAR_MAX_STREAMS": streams} if streams else {}
    max_streams = int(streams or "10000")
    result = subprocess.run(
        SERVE,
        env=subprocess_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=nofile(limit, limit),
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"sidecar: invalid configuration: SIDECAR_MAX_STREAMS: {max_streams} streams need"
        f" {max_streams + FD_RESERVE} file descriptors ({FD_RESERVE} more for the listeners,"
        f" the store and requests) and the limit (RLIMIT_NOFILE, ulimit -n) is {limit}: {hint}\n"
    )


@pytest.mark.time_limit(40)
async def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 4096)
    # Fits the hard limit only: the sidecar starts only if it raised the soft one.
    env = subprocess_env(tmp_path, SIDECAR_MAX_STREAMS=str(hard - FD_RESERVE))
    process = await trio.lowlevel.open_process(
        SERVE, env=env, stderr=subprocess.PIPE, preexec_fn=nofile(256, hard)
    )
    assert process.stderr is not None
    try:
        log = b""
        with trio.fail_after(30):
            while b"sidecar listening:" not in log:
                chunk = await process.stderr.receive_some()
                assert chunk, f"sidecar exited before listening:\n{log.decode()}"
                log += chunk
        limits = await trio.Path(f"/proc/{process.pid}/limits").read_text()
        (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
        assert line.split()[3:5] == [str(hard), str(hard)]
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
        await process.wait()
        await process.stderr.aclose()


# --- the accept-error log --------------------------------------------------------------------


def error_record(msg: str = "accept returned %s") -> logging.LogRecord:
    try:
        raise OSError(errno.EMFILE, "Too many open files")
    except OSError:
        exc_info = sys.exc_info()
    return logging.LogRecord("x", logging.ERROR, __file__, 1, msg, ("EMFILE",), exc_info)


def test_the_rate_limit_lets_one_record_through_per_interval_and_counts_the_rest() -> None:
    now = [100.0]
    limit = logs.RateLimit(10.0, clock=lambda: now[0])
    passed = []
    for _ in range(35):  # 3.5 s of errors every 0.1 s
        record = error_record()
        if limit.filter(record):
            passed.append((now[0], record))
        now[0] += 0.1
    now[0] = 110.0
    record = error_record()
    assert limit.filter(record)
    passed.append((now[0], record))
    now[0] = 119.9
    assert not limit.filter(error_record())
    now[0] = 125.0
    record = error_record()
    assert limit.filter(record)
    passed.append((now[0], record))
    assert [t for t, _ in passed] == [100.0, 110.0, 125.0]
    messages = [r.getMessage() for _, r in passed]
    assert messages == [
        "accept returned EMFILE",
        "accept returned EMFILE (34 more like it not logged: one line per 10 s)",
        "accept returned EMFILE (1 more like it not logged: one line per 10 s)",
    ]
    assert all(r.exc_info is None and r.exc_text is None for _, r in passed)


class OutOfDescriptors(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose every accept fails as it does when the process has no fd left."""

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async def aclose(self) -> None:
        pass


@pytest.mark.usefixtures("root_logging")
async def test_trios_accept_errors_are_logged_once_without_a_traceback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    output = io.StringIO()
    logs.configure("INFO", "json", output)

    async def handler(stream: trio.abc.Stream) -> None:
        raise AssertionError("nothing is accepted")

    with trio.move_on_after(5):  # trio retries every 0.1 s: 50 failed accepts
        await trio.serve_listeners(handler, [OutOfDescriptors()])
    lines = output.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert '"logger": "trio.serve_listeners"' in lines[0]
    assert "accept returned EMFILE" in lines[0]
    assert '"exc"' not in lines[0]
