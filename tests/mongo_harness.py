"""MongoDB test-server harness (sync, test-only).

Tests use ``MONGODB_URI`` when it is set (see :func:`mongodb_uri_from_env`); otherwise they
start mongo-java-server 1.47.0 (``de.bwaldvogel``) on a free loopback port through the
small launcher in ``tests/mongo_server/Launcher.java``.  ``tests/mongo_server/build.sh``
resolves the jars with Maven (cached in ``~/.m2``) and compiles the launcher into
``tests/mongo_server/target/``; :class:`MongoJavaServer` runs it once per process.

What we found about mongo-java-server 1.47.0 with pymongo 4.20:

* Wire version: every ``ServerVersion`` enum value (MONGO_3_6, MONGO_4_0, MONGO_5_0 -- the
  last one is also the default) reports ``maxWireVersion`` <= 8, and pymongo >= 4.18
  refuses servers below 9 ("requires at least 9 (MongoDB 4.4)").  ``MongoVersion`` is an
  interface and the version is only echoed in ``isMaster``/``buildInfo`` (it changes no
  behaviour), so the launcher passes its own ``MongoVersion``: version 5.0.0, wire
  version 13 (MongoDB 5.0's real value) to ``backend.version(...)``.
* The ``hello`` command does not exist (CommandNotFound); pymongo falls back to the legacy
  ``isMaster`` handshake, so connecting works, but ``db.command("hello")`` fails.
* The stock main classes bind 27017 and do not call ``enableOplog()``; without the oplog
  a change stream never returns anything.  The launcher enables it.
* Change streams:
  - Replies never carry ``operationTime`` (nor ``$clusterTime``), so a plain ``watch()``
    fails with "Expected field 'operationTime' missing from command response".  Pass
    ``start_at_operation_time=`` (or ``resume_after=``/``start_after=``) explicitly.
  - The oplog is unbounded and ``startAtOperationTime`` is honoured: a timestamp in the
    past replays every matching event since then, ``Timestamp(0, 0)`` replays everything.
  - Batches never contain ``postBatchResumeToken``; ``ChangeStream.resume_token`` stays
    ``None`` until the first event has been returned, then it is the event's ``_id``
    (``{"_data": "<8 hex ts seconds><8 hex counter>"}``).  ``resume_after=token`` works
    and continues with the event after the token.
  - ``getMore`` ignores ``maxTimeMS`` / ``max_await_time_ms``: it returns an empty
    ``nextBatch`` at once (a few ms), so ``try_next()`` returns ``None`` immediately on
    an empty batch and a polling loop must pace itself (it does not block server-side).
    The cursor stays open (same id) after an empty batch.
  - Update events are odd: no ``updateDescription``; ``documentKey`` holds the update
    operator (e.g. ``{"$set": {...}}``) and, without ``full_document="updateLookup"``,
    ``fullDocument`` holds the *update* contents rather than the document.  With
    ``updateLookup`` the ``fullDocument`` is the correct post-image.  Insert events are
    complete (``fullDocument``, ``documentKey``, ``clusterTime``).
* H2 backend (``H2Backend(path)``): data survives a graceful shutdown (stdin EOF or
  SIGTERM -> shutdown hook -> ``server.shutdown()``); restarting on the same port right
  after works.
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from bson import Binary, ObjectId, Regex

SERVER_DIR = Path(__file__).resolve().parent / "mongo_server"
BUILD_SCRIPT = SERVER_DIR / "build.sh"
TARGET_DIR = SERVER_DIR / "target"
LAUNCHER_CLASS = "Launcher"

BUILD_TIMEOUT_S = 600.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

# struct linger {l_onoff=1, l_linger=0}: close() sends RST instead of FIN.
_LINGER_RST = struct.pack("ii", 1, 0)

_build_lock = threading.Lock()
_built = False


def mongodb_uri_from_env() -> str | None:
    """Return ``MONGODB_URI`` if it is set to a non-empty value, else ``None``."""
    uri = os.environ.get("MONGODB_URI", "").strip()
    return uri or None


def free_port(host: str = "127.0.0.1") -> int:
    """Return a currently unused TCP port on ``host`` (racy by nature; callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def ensure_built() -> None:
    """Run ``build.sh`` once per process (it is itself a no-op when up to date)."""
    global _built
    with _build_lock:
        if _built:
            return
        for tool in ("bash", "java", "javac", "mvn"):
            if shutil.which(tool) is None:
                raise RuntimeError(
                    f"mongo-java-server harness: {tool!r} not found on PATH; Java 17 and "
                    "Maven are required (or set MONGODB_URI to use a real MongoDB)"
                )
        try:
            result = subprocess.run(
                ["bash", str(BUILD_SCRIPT)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{BUILD_SCRIPT} timed out after {BUILD_TIMEOUT_S:.0f}s") from exc
        if result.returncode != 0:
            raise RuntimeError(
                f"{BUILD_SCRIPT} failed (exit {result.returncode}):\n"
                f"{_tail(result.stdout)}\n{_tail(result.stderr)}"
            )
        _built = True


class MongoJavaServer:
    """One mongo-java-server process on 127.0.0.1 (memory backend, or H2 with a file)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._reader: threading.Thread | None = None
        self.port: int | None = None
        self.h2_path: str | None = None

    # -- properties -------------------------------------------------------------------
    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("server not started")
        return self._proc.pid

    @property
    def uri(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle --------------------------------------------------------------------
    def start(
        self,
        h2_path: str | os.PathLike[str] | None = None,
        port: int | None = None,
        timeout: float = START_TIMEOUT_S,
    ) -> MongoJavaServer:
        """Start the server; with ``port`` reuse that port (e.g. restart tests).

        Raises RuntimeError (with the server's stderr tail) on any failure.
        """
        if self.running:
            raise RuntimeError(f"server already running (pid {self.pid})")
        self._cleanup()
        ensure_built()
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("mongo-java-server harness: 'java' not found on PATH")
        self.h2_path = os.fspath(h2_path) if h2_path is not None else None
        deadline = time.monotonic() + timeout
        errors: list[str] = []
        pause = threading.Event()
        while True:
            attempt_port = port if port is not None else free_port()
            ok, detail = self._spawn(java, attempt_port, deadline)
            if ok:
                self.port = attempt_port
                return self
            errors.append(detail)
            # Bind races (auto-picked port taken, or the previous process on a reused port
            # not gone yet) are retried until the deadline; anything else fails at once.
            if "Address already in use" not in detail or time.monotonic() >= deadline:
                break
            pause.wait(0.2)
        raise RuntimeError(
            f"mongo-java-server failed to start (h2={self.h2_path!r}, port={port}):\n"
            + "\n---\n".join(errors[-2:])
        )

    def _spawn(self, java: str, port: int, deadline: float) -> tuple[bool, str]:
        fd, log_name = tempfile.mkstemp(prefix="mongo-java-server-", suffix=".log")
        self._log_path = Path(log_name)
        classpath = f"{TARGET_DIR / 'classes'}{os.pathsep}{TARGET_DIR / 'lib'}/*"
        cmd = [
            java,
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-Xmx512m",
            "-cp",
            classpath,
            LAUNCHER_CLASS,
            str(port),
        ]
        if self.h2_path is not None:
            cmd.append(self.h2_path)
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=fd,
                cwd=SERVER_DIR,
            )
        finally:
            os.close(fd)
        lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(
            target=self._read_stdout, args=(self._proc, lines), daemon=True
        )
        self._reader.start()
        expected = f"READY 127.0.0.1:{port}"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                return False, f"no READY line within timeout\n{self.log_tail()}"
            try:
                line = lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:  # stdout closed: the process exited
                self._wait(5.0)
                rc = self._proc.returncode
                tail = self.log_tail()
                self._cleanup()
                return False, f"exited with {rc} before READY\n{tail}"
            if line.strip() == expected:
                return True, ""

    @staticmethod
    def _read_stdout(proc: subprocess.Popen[bytes], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for raw in proc.stdout:
                lines.put(raw.decode("utf-8", "replace"))
        lines.put(None)

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the server's stderr (its log)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return _tail(self._log_path.read_text("utf-8", "replace"), lines)

    def _wait(self, timeout: float) -> bool:
        assert self._proc is not None
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def wait_exit(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Wait (bounded) for the process to exit by itself; its return code, or None."""
        if self._proc is None:
            raise RuntimeError("server not started")
        if not self._wait(timeout):
            return None
        rc = self._proc.returncode
        self._cleanup()
        return rc

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Graceful stop: close stdin, then SIGTERM, then SIGKILL (own PID only)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            if self._proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()
            if not self._wait(timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._proc.pid, signal.SIGTERM)
                if not self._wait(timeout):
                    self.kill()
                    return
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL the server process (no graceful shutdown: H2 may lose data)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGKILL)
            self._wait(STOP_TIMEOUT_S)
        self._cleanup()

    def _cleanup(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:  # defensive: never leave it running
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)
        if self._reader is not None:  # sees EOF once the process is gone
            self._reader.join(timeout=5.0)
            self._reader = None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None

    def __enter__(self) -> MongoJavaServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _ProxyConnection:
    """One proxied client<->target connection, pumped by a single thread."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, daemon=True, name="tcp-proxy-conn")

    def _pump(self) -> None:
        peers = {self.client: self.upstream, self.upstream: self.client}
        try:
            with selectors.DefaultSelector() as sel:
                for sock in peers:
                    sel.register(sock, selectors.EVENT_READ)
                while not self.stop.is_set():
                    for key, _ in sel.select(timeout=0.05):
                        if self.stop.is_set():
                            return
                        src: socket.socket = key.fileobj  # type: ignore[assignment]
                        data = src.recv(65536)
                        if not data:
                            return
                        peers[src].sendall(data)
        except OSError:
            return
        finally:
            self._close()

    def _close(self) -> None:
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                # RST instead of FIN: looks like an abrupt network failure.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Threaded TCP forwarder on 127.0.0.1 for network-fault injection in tests.

    ``cut()`` resets every current connection and resets new ones on accept until
    ``restore()``; ``close()`` stops everything.  All threads are daemons and all waits
    are bounded.
    """

    def __init__(self, target_host: str, target_port: int, connect_timeout: float = 5.0) -> None:
        self.target = (target_host, target_port)
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._conns: set[_ProxyConnection] = set()
        self._cut = False
        self._closed = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True, name="tcp-proxy")
        self._acceptor.start()

    @property
    def is_cut(self) -> bool:
        return self._cut

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self._cut or self._closed.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=self.connect_timeout)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(self.connect_timeout)  # bounds sendall
            client.settimeout(self.connect_timeout)
            conn = _ProxyConnection(client, upstream)
            with self._lock:
                if self._cut or self._closed.is_set():
                    conn._close()
                    continue
                self._conns.add(conn)
            conn.thread.start()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            conn.stop.set()
        for conn in conns:
            conn.thread.join(timeout=2.0)

    def cut(self) -> None:
        """Reset all current connections; new ones are reset on accept until restore()."""
        with self._lock:
            self._cut = True
        self._drop_all()

    def restore(self) -> None:
        """Accept and forward connections again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Stop accepting, drop every connection, join the threads (bounded)."""
        self._closed.set()
        self._drop_all()
        self._acceptor.join(timeout=2.0)
        with contextlib.suppress(OSError):
            self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    with contextlib.suppress(OSError):
        sock.close()


def not_messages(recipient: str) -> list[dict[str, Any]]:
    """Documents of `recipient` that are not messages a browser could parse."""
    fields = {"appId": "web", "recipientId": recipient, "status": 0}
    responses: list[Any] = [
        "not a document",
        {"blob": Binary(b"\x00\x01")},
        {"pattern": Regex("^a")},
        {"n": float("nan")},
    ]
    return [{"_id": ObjectId(), **fields, "webConnectorResponse": r} for r in responses] + [
        {"_id": ObjectId(), **fields}  # no response at all
    ]
