"""Run the benchmark suite: every server in its own process (pinned to one core when the
machine has two or more), the load generator in another (pinned to the other cores), the
same scenarios for each, ratios printed, one JSON file per scenario under bench/results/,
then the markdown report and chart (bench/report.py).

    python -m bench [--quick] [--servers sidecar,raw,bare,starlette] [--scenarios ...]
                    [--report bench/RESULTS.md] [--note TEXT]

Every scenario is bounded: each generator run has a time cap and is killed past it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    cpu_seconds,
    fd_count,
    free_port,
    machine_busy_seconds,
    nofile_hard,
    raise_nofile,
    rss_bytes,
    wait_listening,
)
from sidecar.startup import FD_RESERVE

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
SERVERS = ["sidecar", "raw", "bare", "starlette"]
LABELS = {
    "sidecar": "sidecar (quart-trio/hypercorn)",
    "raw": "raw trio (reference)",
    "bare": "bare ASGI on hypercorn-trio",
    "starlette": "sse-starlette/uvicorn",
}
SCENARIOS = ["idle", "fanout", "latency", "send", "cross", "replay"]


@dataclass(frozen=True)
class Sizes:
    idle: tuple[int, ...]
    seconds: float
    rates: tuple[int, ...]
    replay: tuple[int, ...]
    many_users: int
    few_users: tuple[int, int]  # users, streams per user


FULL = Sizes((1000, 5000, 10000, 20000), 10.0, (200, 1000, 5000), (1000, 10000), 1000, (10, 100))
QUICK = Sizes((500, 2000), 1.5, (200, 1000, 5000), (1000, 10000), 500, (10, 50))


def cpus() -> tuple[set[int], set[int]]:
    """(server cores, generator cores)."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return set(available), set(available)
    return {available[0]}, set(available[1:])


SERVER_CPUS, GEN_CPUS = cpus()


def pinned(cores: set[int]) -> Callable[[], None]:
    def setup() -> None:
        raise_nofile()
        os.sched_setaffinity(0, cores)

    return setup


# --- servers -------------------------------------------------------------------------------


@dataclass
class Server:
    kind: str
    process: subprocess.Popen[bytes]
    public: str
    send: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s; only this process, by its pid."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextlib.contextmanager
def server(kind: str, workdir: Path, env_extra: dict[str, str] | None = None) -> Iterator[Server]:
    port, send_port = free_port(), free_port()
    env = dict(os.environ)
    if kind == "sidecar":
        db = workdir / f"{kind}-{uuid.uuid4().hex[:8]}.db"
        env |= {
            "SIDECAR_PUBLIC_BIND": f"127.0.0.1:{port}",
            "SIDECAR_SEND_BIND": f"127.0.0.1:{send_port}",
            "SIDECAR_STORE": f"sqlite:///{db}",
            "SIDECAR_LOG_LEVEL": "WARNING",
            "SIDECAR_KEEPALIVE_SECONDS": "10",
            # Limits of the sidecar's own that the other servers do not have: as many
            # streams as its descriptors allow (it refuses to start with more).
            "SIDECAR_MAX_STREAMS": str(nofile_hard() - FD_RESERVE),
            "SIDECAR_MAX_STREAMS_PER_USER": "100000",
        } | (env_extra or {})
        command = [PY, "-m", "sidecar", "serve"]
    else:
        send_port = port
        module = {"raw": "raw_trio", "bare": "bare_asgi", "starlette": "starlette_sse"}[kind]
        command = [PY, "-m", f"bench.servers.{module}", str(port), "10"]
    log = workdir / f"{kind}-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=out, stderr=out, preexec_fn=pinned(SERVER_CPUS)
        )
    running = Server(
        kind, process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{send_port}", log
    )
    try:
        wait_listening(port)
        wait_listening(send_port)
        time.sleep(0.3)
        yield running
    finally:
        running.stop()
        if running.process.returncode not in (0, -signal.SIGTERM):
            print(f"  ({kind} exited {running.process.returncode}; log {log})")


# --- the generator -------------------------------------------------------------------------


def generate(mode: str, spec: dict[str, Any], cap: float, pids: list[int]) -> dict[str, Any]:
    """Run the generator once (time-capped); its result plus the other load on the machine
    meanwhile (cores busy with neither the servers nor the generator)."""
    spec = spec | {"server_pids": pids, "time_cap_s": cap}
    busy0, children0 = machine_busy_seconds(), _children_cpu()
    self0, server0 = _self_cpu(), sum(cpu_seconds(p) for p in pids)
    wall0 = time.monotonic()
    try:
        done = subprocess.run(
            [PY, "-m", "bench.loadgen", mode, json.dumps(spec)],
            cwd=ROOT,
            capture_output=True,
            timeout=cap + 15,
            preexec_fn=pinned(GEN_CPUS),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"generator killed after {cap + 15:.0f}s"}
    wall = time.monotonic() - wall0
    other = (
        machine_busy_seconds()
        - busy0
        - (_children_cpu() - children0)
        - (_self_cpu() - self0)
        - (sum(cpu_seconds(p) for p in pids) - server0)
    )
    lines = done.stdout.decode().strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.decode().strip().splitlines() or ["?"])[-1][:300]}
    result: dict[str, Any] = json.loads(lines[-1])
    result["other_load_cores"] = max(0.0, other / wall)
    return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class WorkerGone(Exception):
    pass


class IdleWorkers:
    """Generator processes holding idle streams (several: each process can hold at most
    its RLIMIT_NOFILE of sockets)."""

    def __init__(self, public: str, per_worker: int, workers: int, tag: str) -> None:
        self.procs = [
            subprocess.Popen(
                [
                    PY,
                    "-m",
                    "bench.loadgen",
                    "idle",
                    json.dumps({"public": public, "prefix": f"{tag}{w}-"}),
                ],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                preexec_fn=pinned(GEN_CPUS),
            )
            for w in range(workers)
        ]
        self.per_worker = per_worker

    def open(self, total: int, timeout: float) -> list[dict[str, Any]]:
        shares = _shares(total, len(self.procs))
        for proc, share in zip(self.procs, shares, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(f"open {share}\n".encode())
            proc.stdin.flush()
        answers = []
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            assert proc.stdout is not None
            ready, _, _ = select.select(
                [proc.stdout], [], [], max(0.0, deadline - time.monotonic())
            )
            if not ready:
                raise TimeoutError(f"idle streams not open within {timeout:.0f}s")
            line = proc.stdout.readline()
            if not line:
                raise WorkerGone(f"an idle stream worker exited ({proc.wait()})")
            answers.append(json.loads(line))
        return answers

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write(b"quit\n")
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# --- scenarios -------------------------------------------------------------------------------


def scenario_idle(servers: list[str], sizes: Sizes, work: Path) -> dict[str, Any]:
    hard = nofile_hard()
    cap = hard - FD_RESERVE  # the sidecar's limit (listeners, store files, pipes)
    per_worker = hard - FD_RESERVE
    out: dict[str, Any] = {"nofile_hard": hard, "capped_at": cap, "servers": {}}
    print(
        f"[idle] streams held: {sizes.idle} (RLIMIT_NOFILE hard {hard}: at most {cap} per server)"
    )
    for kind in servers:
        rows = []
        with server(kind, work) as srv:
            base_rss, base_fds = rss_bytes(srv.pid), fd_count(srv.pid)
            target_max = min(max(sizes.idle), cap)
            workers = IdleWorkers(srv.public, per_worker, -(-target_max // per_worker), f"i{kind}")
            try:
                for wanted in sizes.idle:
                    n = min(wanted, cap)
                    cpu0, t0 = cpu_seconds(srv.pid), time.monotonic()
                    try:
                        answers = workers.open(n, timeout=max(60.0, n / 200))
                    except (TimeoutError, WorkerGone) as exc:
                        # The sizes measured so far stay in the report.
                        rows.append({"wanted": wanted, "error": str(exc)})
                        break
                    open_s = time.monotonic() - t0
                    time.sleep(0.5)
                    rss, fds = rss_bytes(srv.pid), fd_count(srv.pid)
                    streams = sum(a["open"] for a in answers)
                    row = {
                        "wanted": wanted,
                        "streams": streams,
                        "capped": n < wanted,
                        "open_s": open_s,
                        "server_cpu_s": cpu_seconds(srv.pid) - cpu0,
                        "gen_cpu_s": sum(a["gen_cpu_s"] for a in answers),
                        "rss_mb": rss / 2**20,
                        "kb_per_stream": (rss - base_rss) / 1024 / max(1, streams),
                        "server_fds": fds,
                        "fds_per_stream": (fds - base_fds) / max(1, streams),
                        "failed": sum(a["failed"] for a in answers),
                    }
                    rows.append(row)
                    print(
                        f"  {kind:9} {row['streams']:6} streams: open {open_s:5.1f}s, "
                        f"RSS {row['rss_mb']:6.1f} MiB ({row['kb_per_stream']:5.1f} KB/stream), "
                        f"fds {fds}" + (" (capped)" if row["capped"] else "")
                    )
            finally:
                workers.close()
        out["servers"][kind] = {"base_rss_mb": base_rss / 2**20, "rows": rows}
    return out


def scenario_fanout(servers: list[str], sizes: Sizes, work: Path) -> dict[str, Any]:
    topologies = {
        "many_users": {"users": sizes.many_users, "streams_per_user": 1, "publishers": 32},
        "few_users": {
            "users": sizes.few_users[0],
            "streams_per_user": sizes.few_users[1],
            "publishers": 16,
        },
    }
    out: dict[str, Any] = {"seconds": sizes.seconds, "topologies": topologies, "servers": {}}
    print(f"[fanout] publish as fast as the streams drain, {sizes.seconds:g}s each")
    for kind in servers:
        out["servers"][kind] = {}
        with server(kind, work) as srv:
            for name, topo in topologies.items():
                spec = topo | {"public": srv.public, "send": srv.send, "seconds": sizes.seconds}
                result = generate("fanout", spec, sizes.seconds + 60, [srv.pid])
                out["servers"][kind][name] = result
                _print_fanout(kind, name, result)
    return out


def _print_fanout(kind: str, name: str, r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"  {kind:9} {name:10} ERROR {r['error']}")
        return
    print(
        f"  {kind:9} {name:10} {r['delivered_per_s']:9.0f} delivered/s "
        f"({r['publish_per_s']:7.0f} publishes/s), loss {r['loss']}, "
        f"server {r['server_cpu_us_per_delivered']:6.1f} us/delivered at "
        f"{r['server_cpu_util']:.0%} CPU, generator {r['gen_cpu_util']:.0%} CPU"
        + _generator_note(r)
    )


def _generator_note(r: dict[str, Any]) -> str:
    notes = []
    if r.get("gen_cpu_util", 0) > 0.9 * max(1, len(GEN_CPUS)):
        notes.append("GENERATOR-BOUND")
    if r.get("other_load_cores", 0) > 0.2:
        notes.append(f"other load {r['other_load_cores']:.1f} cores")
    return f" [{'; '.join(notes)}]" if notes else ""


def scenario_latency(servers: list[str], sizes: Sizes, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": sizes.seconds, "users": 100, "servers": {}}
    print(f"[latency] fixed rates {sizes.rates} msg/s, {sizes.seconds:g}s each, 100 streams")
    for kind in servers:
        out["servers"][kind] = {}
        with server(kind, work) as srv:
            for rate in sizes.rates:
                spec = {
                    "public": srv.public,
                    "send": srv.send,
                    "users": 100,
                    "rate": rate,
                    "seconds": sizes.seconds,
                    "publishers": 32,
                }
                r = generate("latency", spec, sizes.seconds + 60, [srv.pid])
                out["servers"][kind][str(rate)] = r
                if "error" in r:
                    print(f"  {kind:9} {rate:5}/s ERROR {r['error']}")
                    continue
                print(
                    f"  {kind:9} {rate:5}/s: achieved {r['achieved_rate']:6.0f}/s, "
                    f"p50 {_ms(r['p50_ms'])} p99 {_ms(r['p99_ms'])} max {_ms(r['max_ms'])}, "
                    f"loss {r['loss']}"
                    + (f", {r['unsent']} not sent (server behind)" if r.get("unsent") else "")
                    + _generator_note(r)
                )
    return out


def _ms(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}ms"


def scenario_send(servers: list[str], sizes: Sizes, work: Path) -> dict[str, Any]:
    modes = {"single": {"batch": 1, "concurrency": 16}, "batch": {"batch": 100, "concurrency": 4}}
    out: dict[str, Any] = {"seconds": sizes.seconds, "modes": modes, "servers": {}}
    print(f"[send] send API throughput, no stream open, {sizes.seconds:g}s each")
    for kind in servers:
        out["servers"][kind] = {}
        with server(kind, work) as srv:
            for name, mode in modes.items():
                spec = mode | {"send": srv.send, "seconds": sizes.seconds}
                r = generate("send", spec, sizes.seconds + 60, [srv.pid])
                out["servers"][kind][name] = r
                if "error" in r:
                    print(f"  {kind:9} {name:6} ERROR {r['error']}")
                    continue
                print(
                    f"  {kind:9} {name:6} {r['messages_per_s']:8.0f} msg/s "
                    f"({r['requests_per_s']:6.0f} req/s, p99 {_ms(r['request_p99_ms'])}), "
                    f"server {r['server_cpu_us_per_message']:6.1f} us/msg" + _generator_note(r)
                )
    return out


@contextlib.contextmanager
def mongodb() -> Iterator[tuple[str, str]]:
    """(uri, what it is): MONGODB_URI, else a mongo-java-server started here."""
    uri = os.environ.get("MONGODB_URI", "").strip()
    if uri:
        yield uri, "MONGODB_URI"
        return
    sys.path.insert(0, str(ROOT))
    from tests.mongo_harness import MongoJavaServer

    mongo = MongoJavaServer().start()
    try:
        os.sched_setaffinity(mongo.pid, GEN_CPUS)
        yield mongo.uri, "mongo-java-server 1.47 (memory backend, started by the bench)"
    finally:
        mongo.stop()


def scenario_cross(servers: list[str], sizes: Sizes, work: Path) -> dict[str, Any]:
    import pymongo

    out: dict[str, Any] = {"seconds": sizes.seconds}
    with mongodb() as (uri, kind):
        db = f"bench_{uuid.uuid4().hex[:10]}"
        out["mongodb"] = kind
        print(f"[cross] two sidecars on one MongoDB ({kind}); send on A, streams on B")
        # The load generator's responses are not Tock's: take any object, as on SQLite.
        env = {"SIDECAR_STORE": uri, "SIDECAR_MONGO_DB": db, "SIDECAR_RESPONSE_SCHEMA": "any"}
        try:
            with server("sidecar", work, env) as a, server("sidecar", work, env) as b:
                spec = {"public": b.public, "send": a.send, "users": 100, "publishers": 16}
                latency = generate(
                    "latency",
                    spec | {"rate": 200, "seconds": sizes.seconds},
                    sizes.seconds + 60,
                    [a.pid, b.pid],
                )
                out["latency_200"] = latency
                if "error" not in latency:
                    print(
                        f"  latency at 200/s: p50 {_ms(latency['p50_ms'])} "
                        f"p99 {_ms(latency['p99_ms'])} max {_ms(latency['max_ms'])}, "
                        f"loss {latency['loss']}"
                    )
                else:
                    print(f"  latency ERROR {latency['error']}")
                spec = {
                    "public": b.public,
                    "send": a.send,
                    "users": 100,
                    "streams_per_user": 1,
                    "publishers": 16,
                    "seconds": sizes.seconds,
                }
                fanout = generate("fanout", spec, sizes.seconds + 60, [a.pid, b.pid])
                out["throughput"] = fanout
                if "error" not in fanout:
                    print(
                        f"  throughput: {fanout['delivered_per_s']:.0f} delivered/s on B, "
                        f"loss {fanout['loss']}, both instances "
                        f"{fanout['server_cpu_us_per_delivered']:.0f} us CPU/message"
                    )
                else:
                    print(f"  throughput ERROR {fanout['error']}")
        finally:
            client: pymongo.MongoClient[dict[str, Any]]
            with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
                client.drop_database(db)
    return out


def scenario_replay(servers: list[str], sizes: Sizes, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"counts": {}}
    print(f"[replay] stored messages replayed on connect (sidecar only): {sizes.replay}")
    for n in sizes.replay:
        with server("sidecar", work) as srv:
            r = generate(
                "replay",
                {"public": srv.public, "send": srv.send, "count": n, "user": "r"},
                120,
                [srv.pid],
            )
        out["counts"][str(n)] = r
        if "error" in r:
            print(f"  {n:6}: ERROR {r['error']}")
            continue
        print(
            f"  {n:6} messages: all in {r['replay_s']:.2f}s ({r['messages_per_s']:.0f} msg/s), "
            f"first after {r['first_message_s']:.3f}s; storing them took {r['store_s']:.2f}s"
        )
    return out


RUNNERS = {
    "idle": scenario_idle,
    "fanout": scenario_fanout,
    "latency": scenario_latency,
    "send": scenario_send,
    "cross": scenario_cross,
    "replay": scenario_replay,
}


# --- machine and ratios ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    model = "?"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        mem_kb = int(info.readline().split()[1])
    versions = {"python": sys.version.split()[0]}
    for package in (
        "trio",
        "hypercorn",
        "quart",
        "quart-trio",
        "h11",
        "uvicorn",
        "sse-starlette",
        "starlette",
        "uvloop",
        "httptools",
        "pymongo",
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "-"
    fs = subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, check=False)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(mem_kb / 2**20, 1),
        "kernel": os.uname().release,
        "nofile_hard": nofile_hard(),
        "temp_fs": (fs.stdout.decode().splitlines()[-1].split()[1] if fs.returncode == 0 else "?"),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "server_cpus": sorted(SERVER_CPUS),
        "generator_cpus": sorted(GEN_CPUS),
        "versions": versions,
    }


def ratios(results: dict[str, Any]) -> list[str]:
    """Lines of 'sidecar / peer' for the headline figure of each scenario."""
    lines = []

    def add(label: str, values: dict[str, float | None], higher_better: bool = True) -> None:
        mine = values.get("sidecar")
        if not mine:
            return
        parts = [
            f"{mine / value:.2f}x {kind}"
            for kind, value in values.items()
            if kind != "sidecar" and value
        ]
        if parts:
            lines.append(
                f"{label}: sidecar = "
                + ", ".join(parts)
                + ("" if higher_better else " (lower is better)")
            )

    if "servers" in results.get("fanout", {}):
        for name in ("many_users", "few_users"):
            add(
                f"fan-out {name} delivered/s",
                {
                    k: v.get(name, {}).get("delivered_per_s")
                    for k, v in results["fanout"]["servers"].items()
                },
            )
    if "servers" in results.get("send", {}):
        for name in ("single", "batch"):
            add(
                f"send {name} msg/s",
                {
                    k: v.get(name, {}).get("messages_per_s")
                    for k, v in results["send"]["servers"].items()
                },
            )
    if "servers" in results.get("latency", {}):
        for rate in ("200", "1000", "5000"):
            add(
                f"p99 at {rate}/s",
                {
                    k: v.get(rate, {}).get("p99_ms")
                    for k, v in results["latency"]["servers"].items()
                },
                False,
            )
    if "servers" in results.get("idle", {}):

        def kb(rows: list[dict[str, Any]]) -> float | None:
            good = [r for r in rows if "kb_per_stream" in r]
            return good[-1]["kb_per_stream"] if good else None

        add(
            "idle KB/stream (largest size)",
            {k: kb(v["rows"]) for k, v in results["idle"]["servers"].items()},
            False,
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, short runs (< 2 min)")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument(
        "--report", default=None, help="markdown report to write (and a PNG beside it)"
    )
    parser.add_argument("--note", default="", help="a line put at the top of the report")
    args = parser.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(servers) - set(SERVERS) | set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    sizes = QUICK if args.quick else FULL
    raise_nofile()
    os.sched_setaffinity(0, GEN_CPUS)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = RESULTS / (stamp + ("-quick" if args.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(
        f"bench {'quick' if args.quick else 'full'}: {info['cpu_model']}, {info['nproc']} cores "
        f"(servers on {info['server_cpus']}, generator on {info['generator_cpus']}), "
        f"load {' '.join(info['loadavg_start'])}; results in {out_dir.relative_to(ROOT)}"
    )
    results: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    started = time.monotonic()
    try:
        for name in scenarios:
            t0 = time.monotonic()
            try:
                results[name] = RUNNERS[name](servers, sizes, work)
            except Exception as exc:  # one scenario failing does not lose the others
                results[name] = {"error": repr(exc)}
                print(f"[{name}] FAILED: {exc!r}")
            results[name]["elapsed_s"] = time.monotonic() - t0
            (out_dir / f"{name}.json").write_text(json.dumps(results[name], indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    info["elapsed_s"] = time.monotonic() - started
    run = {
        "machine": info,
        "quick": args.quick,
        "sizes": sizes.__dict__,
        "servers": servers,
        "results": results,
        "note": args.note,
    }
    (out_dir / "run.json").write_text(json.dumps(run, indent=2))
    print("\nratios:")
    for line in ratios(results):
        print(f"  {line}")
    from bench.report import write_report

    report = Path(args.report) if args.report else out_dir / "REPORT.md"
    write_report(run, report, report.with_suffix(".png"))
    print(
        f"\nreport: {report} (chart {report.with_suffix('.png')}); {info['elapsed_s']:.0f}s in all"
    )
    return 0
