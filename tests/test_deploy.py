"""deploy/: the files parse, agree with the sidecar's real settings and with each other, the
compose file passes `docker-compose config`, nginx.conf passes `nginx -t` and carries a real
stream, the Dockerfile's health check and the demo bot work against a real sidecar, memory
and descriptor limits hold the stream limit by README's sizing rule (which a real sidecar
keeps to), and docs/tock.md's readiness check works. (Prometheus and Grafana files:
tests/test_dashboards.py.)

No container engine here, so the image is never built and nothing is run in a container.
nginx and docker-compose come from Debian's packages (.ci/run installs them); without them
these tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import yaml

from sidecar.config import OPTIONS, Settings
from sidecar.protocol.message import State
from tests.sidecar_harness import running_sidecar, settings_for, spawn_sidecar

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SETTING_ENVS = {option.env for option in OPTIONS}
TOCK_ALIASES = {alias for option in OPTIONS for alias in option.aliases}
# What a Secret would hold, for loading a container's settings.
SECRET_PLACEHOLDER = "mongodb://mongo-0.mongo,mongo-1.mongo/?replicaSet=rs0"
# Kubernetes manifests `kubectl apply -k` leaves out: they need a CRD a cluster may not have.
NEEDS_CRD = {"servicemonitor.yaml"}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- Kubernetes -----------------------------------------------------------------------------


def k8s_documents() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return documents


def k8s_one(kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [
        d
        for d in k8s_documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return found


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = k8s_one("Deployment")["spec"]["template"]["spec"]
    return spec


def sidecar_container() -> dict[str, Any]:
    (container,) = [c for c in pod_spec()["containers"] if "tock-sse-sidecar" in c["image"]]
    return container


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment, secret references replaced by a plausible value."""
    env = {}
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", SECRET_PLACEHOLDER)
    return env


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    assert isinstance(number, int)
    return number


def test_every_deploy_yaml_parses() -> None:
    files = [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
    assert len(files) >= 11
    for path in files:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert documents, path
        for document in documents:
            assert isinstance(document, dict), path
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} - NEEDS_CRD
    for name in NEEDS_CRD:
        for document in yaml.safe_load_all((K8S / name).read_text()):
            assert not document["apiVersion"].startswith(("v1", "apps/", "policy/", "networking"))


def test_every_sidecar_variable_named_anywhere_is_a_real_setting() -> None:
    texts = [p for p in DEPLOY.rglob("*") if p.is_file()]
    texts += [ROOT / "docs" / "tock.md", ROOT / ".dockerignore"]
    seen: set[str] = set()
    for path in texts:
        for name in re.findall(r"\bSIDECAR_[A-Z0-9_]+\b", path.read_text()):
            assert name in SETTING_ENVS, f"{path.relative_to(ROOT)} names unknown {name}"
            seen.add(name)
    assert {"SIDECAR_PUBLIC_BIND", "SIDECAR_SEND_BIND", "SIDECAR_STORE"} <= seen


def test_k8s_sidecar_settings_ports_and_probes() -> None:
    container = sidecar_container()
    env = container_env(container)
    for name in env:
        assert name in SETTING_ENVS or name in TOCK_ALIASES, f"{name} is no sidecar setting"
    settings = Settings.load(env)
    assert settings.store.startswith("mongodb://")
    # Browsers reach the public listener, Prometheus the metrics one; the send API is for
    # the pod only.
    assert settings.metrics_bind is not None
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"sse": settings.public_bind.port, "metrics": settings.metrics_bind.port}
    assert settings.public_bind.host == "0.0.0.0"
    assert settings.metrics_bind.host == "0.0.0.0"
    assert settings.send_bind.host == "127.0.0.1"
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"]["path"] == "/readyz"
    assert liveness["httpGet"]["path"] == "/healthz"
    for probe in (readiness, liveness):
        assert resolve_port(container, probe["httpGet"]["port"]) == settings.public_bind.port
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["runAsUser"] == dockerfile_user()


def test_k8s_grace_period_covers_prestop_and_drain() -> None:
    container = sidecar_container()
    settings = Settings.load(container_env(container))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop > 0
    # app.run: in-flight requests get shutdown_seconds, then delivery states as long again.
    drain = 2 * settings.shutdown_seconds
    assert pod_spec()["terminationGracePeriodSeconds"] >= pre_stop + drain


def test_k8s_bot_container_is_tock_with_sse_on_the_same_store() -> None:
    (bot,) = [c for c in pod_spec()["containers"] if c is not None and c["name"] == "bot"]
    env = container_env(bot)
    assert env["tock_web_sse"] == "true"
    sidecar_env = {item["name"]: item for item in sidecar_container()["env"]}
    bot_env = {item["name"]: item for item in bot["env"]}
    # The same MongoDB and database as the bot.
    assert sidecar_env["SIDECAR_STORE"]["valueFrom"] == bot_env["tock_mongo_url"]["valueFrom"]
    assert sidecar_env["SIDECAR_MONGO_DB"]["value"] == bot_env["tock_bot_mongo_db"]["value"]
    # Two listeners on one port of the pod's shared network cannot be.
    settings = Settings.load(container_env(sidecar_container()))
    bot_ports = {p["containerPort"] for p in bot["ports"]}
    assert settings.metrics_bind is not None
    sidecar_ports = [settings.public_bind.port, settings.send_bind.port, settings.metrics_bind.port]
    assert len(set(sidecar_ports)) == 3
    assert not bot_ports & set(sidecar_ports)


def test_k8s_pdb_service_and_ingress_select_the_pods() -> None:
    deployment = k8s_one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    pdb = k8s_one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]

    service = k8s_one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    containers = pod_spec()["containers"]
    port_names = {p["name"]: c["name"] for c in containers for p in c["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for port in service_ports.values():
        assert port["targetPort"] in port_names

    settings = Settings.load(container_env(sidecar_container()))
    sse_ingress = k8s_one("Ingress", "tock-bot-sse")
    annotations = sse_ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "proxy-buffering"] == "off"
    assert int(annotations[prefix + "proxy-read-timeout"]) > 6 * settings.keepalive_seconds
    assert int(annotations[prefix + "proxy-send-timeout"]) > 6 * settings.keepalive_seconds
    routed: dict[str, str] = {}
    for ingress in (sse_ingress, k8s_one("Ingress", "tock-bot")):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                target = service_ports[backend["port"]["name"]]["targetPort"]
                routed[path["path"]] = port_names[target]
    # Every connector's stream (and /sse/ack below it, a Prefix match) goes to the sidecar.
    for connector in settings.connectors:
        assert routed[connector.stream_path] == "sse-sidecar"
    assert routed["/sidecar-sse.js"] == "sse-sidecar"
    assert routed["/"] == "bot"
    # The metrics port is in the Service (for the ServiceMonitor) but no Ingress routes to it.
    assert service_ports["metrics"]["targetPort"] == "metrics"
    for ingress in (sse_ingress, k8s_one("Ingress", "tock-bot")):
        for rule in ingress["spec"]["rules"]:
            assert all(
                p["backend"]["service"]["port"]["name"] != "metrics" for p in rule["http"]["paths"]
            )


def test_k8s_prometheus_scrapes_the_metrics_listener() -> None:
    container = sidecar_container()
    settings = Settings.load(container_env(container))
    assert settings.metrics_bind is not None
    port = settings.metrics_bind.port
    assert resolve_port(container, "metrics") == port
    # A Prometheus discovering pods by annotation...
    annotations = k8s_one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # ...or the Prometheus Operator, through the Service's metrics port.
    monitor = k8s_one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = k8s_one("Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    (service_port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert resolve_port(container, service_port["targetPort"]) == port


async def test_probe_paths_answer_on_the_public_listener(tmp_path: Path) -> None:
    container = sidecar_container()
    async with running_sidecar(settings_for(tmp_path)) as sidecar:
        for probe in ("readinessProbe", "livenessProbe"):
            path = container[probe]["httpGet"]["path"]
            reply = await sidecar.client.get(sidecar.public + path)
            assert reply.status_code == 200, (path, reply.text)


# --- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, rest in final_stage():
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def dockerfile_user() -> int:
    (user,) = [rest for keyword, rest in final_stage() if keyword == "USER"]
    return int(user.split(":")[0])


def dockerfile_healthcheck() -> list[str]:
    (healthcheck,) = [rest for keyword, rest in final_stage() if keyword == "HEALTHCHECK"]
    command: list[str] = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    return command


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2
    assert all(re.match(r"python:\$\{PYTHON_VERSION\}-slim\b", f) for f in froms)
    stage = final_stage()
    assert dockerfile_user() != 0
    final_runs = " ".join(rest for keyword, rest in stage if keyword == "RUN")
    for tool in ("apt-get", "gcc", "build-essential", "pip install"):
        assert tool not in final_runs
    copies = [rest for keyword, rest in stage if keyword == "COPY"]
    assert copies
    assert all(c.startswith("--from=build ") for c in copies)
    (entrypoint,) = [rest for keyword, rest in stage if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["sidecar", "serve"]
    # What the build stage copies exists in the context and gets past .dockerignore.
    ignore = (ROOT / ".dockerignore").read_text()
    for keyword, rest in instructions:
        if keyword == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert f"!{source.rstrip('/')}" in ignore.replace("/\n", "\n"), source


def test_dockerfile_settings_and_ports() -> None:
    env = dockerfile_env()
    sidecar_env = {k: v for k, v in env.items() if k.startswith("SIDECAR_")}
    assert set(sidecar_env) <= SETTING_ENVS
    settings = Settings.load(sidecar_env)
    assert settings.store == "sqlite:////data/sidecar.db"
    (expose,) = [rest for keyword, rest in final_stage() if keyword == "EXPOSE"]
    assert settings.metrics_bind is not None
    assert {int(p) for p in expose.split()} == {
        settings.public_bind.port,
        settings.send_bind.port,
        settings.metrics_bind.port,
    }
    assert settings.send_bind.host == "127.0.0.1"
    # Prometheus reaches the metrics listener from outside the container.
    assert settings.metrics_bind.host == "0.0.0.0"
    assert Settings.load(sidecar_env | {"SIDECAR_METRICS_BIND": ""}).metrics_bind is None
    assert "/healthz" in " ".join(dockerfile_healthcheck())


async def test_dockerfile_healthcheck_command_works(tmp_path: Path) -> None:
    command = dockerfile_healthcheck()
    assert command[0] == "python"
    command[0] = sys.executable
    async with running_sidecar(settings_for(tmp_path)) as sidecar:
        port = urlsplit(sidecar.public).port
        env = os.environ | {"SIDECAR_PUBLIC_BIND": f"0.0.0.0:{port}"}
        healthy = await trio.run_process(command, env=env, check=False, capture_stderr=True)
        assert healthy.returncode == 0, healthy.stderr
    closed = os.environ | {"SIDECAR_PUBLIC_BIND": f"0.0.0.0:{free_port()}"}
    unhealthy = await trio.run_process(command, env=closed, check=False, capture_stderr=True)
    assert unhealthy.returncode != 0


# --- Compose ----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return document


def compose_sidecars() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def expand(value: str) -> str:
    """Compose's ${NAME:-default}, as when NAME is not set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def compose_sidecar_settings(service: dict[str, Any]) -> Settings:
    env = {name: expand(str(value)) for name, value in service["environment"].items()}
    assert set(env) <= SETTING_ENVS
    return Settings.load(env)


def test_compose_services_agree() -> None:
    sidecars = compose_sidecars()
    assert len(sidecars) == 2
    services = compose()["services"]
    mongo = services["mongo"]
    replica_set = mongo["command"][mongo["command"].index("--replSet") + 1]
    healthcheck = " ".join(mongo["healthcheck"]["test"])
    assert "rs.initiate(" in healthcheck
    assert f'_id: "{replica_set}"' in healthcheck
    assert "isWritablePrimary" in healthcheck
    upstreams = nginx_upstream_servers()
    bot_env = services["bot"]["environment"]
    send_urls = set(bot_env["BOT_SEND_URLS"].split(","))
    for name, service in sidecars.items():
        settings = compose_sidecar_settings(service)
        assert settings.store.startswith("mongodb://mongo:27017/")
        assert f"replicaSet={replica_set}" in settings.store
        assert service["depends_on"]["mongo"]["condition"] == "service_healthy"
        assert settings.demo is True
        # nginx reaches the public listener, the bot the send API, by service name.
        assert f"{name}:{settings.public_bind.port}" in upstreams
        assert f"http://{name}:{settings.send_bind.port}/v1/send" in send_urls
        assert settings.send_bind.host == "0.0.0.0"
        assert settings.send_token == expand(bot_env["BOT_SEND_TOKEN"])
        stop_grace = int(service["stop_grace_period"].rstrip("s"))
        assert stop_grace >= 2 * settings.shutdown_seconds
    assert len(upstreams) == len(sidecars)
    nginx = services["nginx"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    for name in sidecars:
        assert nginx["depends_on"][name]["condition"] == "service_healthy"
    assert "./demo_bot.py:/bot/demo_bot.py:ro" in services["bot"]["volumes"]


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    return [require_tool("docker-compose")]


def test_compose_config_lints(tmp_path: Path) -> None:
    command = compose_command()
    result = subprocess.run(
        [
            *command,
            "--project-directory",
            str(DEPLOY),
            "-f",
            str(DEPLOY / "compose.yaml"),
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=os.environ | {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"},
    )
    assert result.returncode == 0, result.stderr


async def test_demo_bot_sends_through_the_send_api(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_SEND_TOKEN="t0k")
    async with running_sidecar(settings) as sidecar, sidecar.stream("demo") as stream:
        env = os.environ | {
            "BOT_SEND_URLS": f"{sidecar.send_url}/v1/send,{sidecar.send_url}/v1/send",
            "BOT_SEND_TOKEN": "t0k",
            "BOT_RECIPIENT": "demo",
            "BOT_INTERVAL_SECONDS": "0",
            "BOT_COUNT": "2",
        }
        bot = await trio.run_process(
            [sys.executable, str(DEPLOY / "demo_bot.py")],
            env=env,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
        assert bot.returncode == 0, bot.stderr
        first, second = await stream.messages(2)
    assert json.loads(first.data)["responses"][0]["text"].startswith("Message 1 at ")
    assert json.loads(second.data)["responses"][0]["text"].startswith("Message 2 at ")
    assert bot.stdout.decode().count("sent ") == 2


# --- nginx ------------------------------------------------------------------------------------


Block = list[tuple[list[str], "Block | None"]]


def parse_nginx(text: str) -> Block:
    """nginx's configuration as nested (words, block) pairs; block is None for a simple
    directive. Enough for this file: comments, quotes, braces, semicolons."""
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|[{};]|[^\s{};"\']+', re.sub(r"#[^\n]*", "", text))

    def block(it: Iterator[str]) -> Block:
        out: Block = []
        words: list[str] = []
        for token in it:
            if token == ";":
                out.append((words, None))
                words = []
            elif token == "{":
                out.append((words, block(it)))
                words = []
            elif token == "}":
                assert not words
                return out
            else:
                words.append(token.strip("\"'"))
        assert not words
        return out

    return block(iter(tokens))


def directives(block: Block, name: str) -> list[tuple[list[str], Block | None]]:
    return [(words[1:], inner) for words, inner in block if words and words[0] == name]


def nginx_config() -> Block:
    return parse_nginx((DEPLOY / "nginx.conf").read_text())


def nginx_server() -> Block:
    ((_, http),) = directives(nginx_config(), "http")
    assert http is not None
    ((_, server),) = directives(http, "server")
    assert server is not None
    return server


def nginx_upstream_servers() -> list[str]:
    ((_, http),) = directives(nginx_config(), "http")
    assert http is not None
    ((name, upstream),) = directives(http, "upstream")
    assert name == ["sidecars"]
    assert upstream is not None
    assert directives(upstream, "keepalive")
    return [args[0] for args, _ in directives(upstream, "server")]


def test_nginx_config_is_set_up_for_sse() -> None:
    server = nginx_server()
    simple = {words[0]: words[1:] for words, inner in server if inner is None}
    assert simple["proxy_http_version"] == ["1.1"]
    assert ["Connection", ""] in [args for args, _ in directives(server, "proxy_set_header")]
    locations = {" ".join(args): inner for args, inner in directives(server, "location")}
    for inner in locations.values():
        # A location's own proxy_set_header would drop the server's (Connection "").
        assert inner is not None
        assert not directives(inner, "proxy_set_header")
    settings = compose_sidecar_settings(next(iter(compose_sidecars().values())))
    for connector in settings.connectors:
        stream = locations[connector.stream_path]
        assert stream is not None
        options = {words[0]: words[1:] for words, _ in stream}
        assert options["proxy_pass"] == ["http://sidecars"]
        assert options["proxy_buffering"] == ["off"]
        for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
            value = options[timeout][0]
            seconds = int(value[:-1]) * {"s": 1, "m": 60, "h": 3600}[value[-1]]
            assert seconds > 6 * settings.keepalive_seconds
    for path in ("= /sidecar-sse.js", "= /", "= /demo/send"):
        inner = locations[path]
        assert inner is not None
        assert ["http://sidecars"] in [args for args, _ in directives(inner, "proxy_pass")]


def nginx_test_copy(tmp_path: Path, upstream: str, port: int) -> Path:
    """nginx.conf with the compose service names replaced by `upstream` (nginx resolves
    upstream hosts when it loads its configuration) and listening on loopback `port`."""
    text = (DEPLOY / "nginx.conf").read_text()
    text, count = re.subn(r"server sidecar-\d+:\d+", f"server {upstream}", text)
    assert count == 2
    text, count = re.subn(r"listen 80;", f"listen 127.0.0.1:{port};", text)
    assert count == 1
    path = tmp_path / "nginx.conf"
    path.write_text(text)
    return path


def nginx_command(tmp_path: Path, config: Path, *extra: str) -> list[str]:
    globals_ = f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;"
    return [require_tool("nginx"), "-p", str(tmp_path), "-c", str(config), "-g", globals_, *extra]


def test_nginx_t_accepts_the_config(tmp_path: Path) -> None:
    config = nginx_test_copy(tmp_path, "127.0.0.1:8080", free_port())
    result = subprocess.run(
        nginx_command(tmp_path, config, "-t"),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@asynccontextmanager
async def running_nginx(tmp_path: Path, upstream: str) -> AsyncIterator[str]:
    port = free_port()
    config = nginx_test_copy(tmp_path, upstream, port)
    command = nginx_command(tmp_path, config)
    command[-1] = f"daemon off; {command[-1]}"
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(10):
            while True:
                try:
                    connection = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    assert process.returncode is None, (tmp_path / "error.log").read_text()
                    await trio.sleep(0.05)
                else:
                    await connection.aclose()
                    break
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_stream_through_nginx(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_DEMO="true")
    async with running_sidecar(settings) as sidecar:
        upstream = urlsplit(sidecar.public).netloc
        async with running_nginx(tmp_path, upstream) as front, httpx.AsyncClient() as client:
            url = f"{front}/io/app/web/sse?userId=alice"
            async with client.stream("GET", url) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                chunks = response.aiter_raw()
                assert (await chunks.__anext__()).startswith(b"event: ping")
                message_id = await sidecar.send("alice", responses=[{"text": "via nginx"}])
                # Unbuffered: the event comes through while the response is still open.
                data = b""
                while b"via nginx" not in data:
                    data += await chunks.__anext__()
                assert f"id: {message_id}".encode() in data
                await chunks.aclose()
            ack = await client.post(
                f"{front}/io/app/web/sse/ack?userId=alice", json={"ids": [message_id]}
            )
            assert ack.status_code == 204
            for path in ("/sidecar-sse.js", "/", "/nginx-health"):
                assert (await client.get(front + path)).status_code == 200, path
            assert (await client.get(f"{front}/io/app/web")).status_code == 404
        stored = await sidecar.running.store.get(message_id)
        assert stored is not None
        assert stored.state == State.DELIVERED


# --- Sizing -----------------------------------------------------------------------------------


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n{title}\n")
    level = title.split()[0]
    end = re.search(rf"\n#{{1,{len(level)}}} ", readme[start + len(title) + 2 :])
    assert end is not None
    return readme[start : start + len(title) + 2 + end.start()]


def sizing_rule() -> tuple[float, float, int]:
    """README's sizing rule: (base MiB, KiB per stream, descriptors beyond the streams)."""
    section = readme_section("### Sizing")
    memory = re.search(r"`(\d+) MiB \+ SIDECAR_MAX_STREAMS x (\d+) KiB`", section)
    descriptors = re.search(r"`SIDECAR_MAX_STREAMS \+ (\d+)`", section)
    assert memory is not None
    assert descriptors is not None
    return float(memory[1]), float(memory[2]), int(descriptors[1])


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity (`512Mi`, `1Gi`) or a Compose one (`512m`, `1g`)."""
    match = re.fullmatch(r"(\d+)(Mi|Gi|m|g)", quantity)
    assert match is not None, quantity
    return int(match[1]) * {"Mi": 1, "Gi": 1024, "m": 1, "g": 1024}[match[2]]


def needed_mebibytes(max_streams: int) -> float:
    base, per_stream, _ = sizing_rule()
    return base + max_streams * per_stream / 1024


def test_k8s_memory_limit_holds_the_stream_limit() -> None:
    container = sidecar_container()
    settings = Settings.load(container_env(container))
    limit = mebibytes(container["resources"]["limits"]["memory"])
    assert needed_mebibytes(settings.max_streams) <= limit
    # Said in the manifest, not left to the default, next to the arithmetic.
    assert "SIDECAR_MAX_STREAMS" in container_env(container)
    assert mebibytes(container["resources"]["requests"]["memory"]) <= limit
    base, per_stream, _ = sizing_rule()
    comment = (K8S / "deployment.yaml").read_text()
    arithmetic = (
        f"{base:.0f} + {settings.max_streams} x {per_stream:.0f} / 1024 = "
        f"{math.ceil(needed_mebibytes(settings.max_streams))} MiB"
    )
    assert arithmetic in comment
    assert f"{limit:.0f} MiB limit" in comment


def test_compose_limits_hold_the_stream_limit() -> None:
    _, _, reserve = sizing_rule()
    for service in compose_sidecars().values():
        settings = compose_sidecar_settings(service)
        assert needed_mebibytes(settings.max_streams) <= mebibytes(service["mem_limit"])
        nofile = service["ulimits"]["nofile"]
        assert isinstance(nofile, int)  # soft and hard alike
        assert settings.max_streams + reserve <= nofile


def bench_idle_rows() -> list[tuple[int, float, float, int]]:
    """bench/RESULTS.md's idle streams held by the sidecar: (streams, RSS MiB, KB per stream,
    server fds)."""
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    section = text[text.index("## 1. Idle streams held") :]
    section = section[: section.index("\n## ", 1)]
    rows = re.findall(
        r"^\| sidecar \| (\d+)[^|]* \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \| (\d+) \|", section, re.M
    )
    return [(int(n), float(rss), float(kb), int(fds)) for n, rss, kb, fds in rows]


def test_the_sizing_rule_covers_the_benchmark() -> None:
    base, per_stream, reserve = sizing_rule()
    rows = bench_idle_rows()
    assert len(rows) >= 3
    for streams, rss, kb_per_stream, fds in rows:
        assert kb_per_stream <= per_stream
        assert rss <= base + streams * kb_per_stream / 1024
        assert rss <= needed_mebibytes(streams)
        assert streams <= fds <= streams + reserve


def process_rss_mebibytes(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    (kib,) = re.findall(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(kib) / 1024


def process_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


SIZING_STREAMS = 400
OPENING_AT_ONCE = 20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.time_limit(90)
async def test_a_sidecar_on_mongodb_keeps_to_the_sizing_rule(mongodb_server: str) -> None:
    """A sidecar process on MongoDB (as in deploy/), holding idle streams: memory within
    README's rule, one descriptor per stream."""
    import pymongo

    base, per_stream, _ = sizing_rule()
    database = f"t_sizing_{os.getpid()}"
    env = {"SIDECAR_STORE": mongodb_server, "SIDECAR_MONGO_DB": database}
    streams: list[trio.SocketStream] = []
    try:
        async with spawn_sidecar(env) as sidecar:
            pid = sidecar.process.pid
            host, port = urlsplit(sidecar.public).hostname, urlsplit(sidecar.public).port
            assert host is not None
            assert port is not None

            async def open_stream(user: int) -> None:
                stream = await trio.open_tcp_stream(host, port)
                streams.append(stream)
                request = f"GET /io/app/web/sse?userId=u{user} HTTP/1.1\r\nHost: x\r\n\r\n"
                await stream.send_all(request.encode())
                received = b""
                while b"event: ping" not in received:
                    chunk = await stream.receive_some()
                    assert chunk, received
                    received += chunk

            await open_stream(0)  # the first stream warms the code paths up
            rss, fds = process_rss_mebibytes(pid), process_fds(pid)
            assert rss <= base
            async with trio.open_nursery() as nursery:
                limit = trio.CapacityLimiter(OPENING_AT_ONCE)

                async def limited(user: int) -> None:
                    async with limit:
                        await open_stream(user)

                for user in range(1, SIZING_STREAMS + 1):
                    nursery.start_soon(limited, user)
            grown = process_rss_mebibytes(pid) - rss
            assert grown <= SIZING_STREAMS * per_stream / 1024, f"{grown:.1f} MiB"
            # One socket per stream, and maybe a store connection per stream being opened.
            opened = process_fds(pid) - fds
            assert SIZING_STREAMS <= opened <= SIZING_STREAMS + OPENING_AT_ONCE
    finally:
        for stream in streams:
            await stream.aclose()
        with pymongo.MongoClient(mongodb_server, serverSelectionTimeoutMS=5000) as client:
            client.drop_database(database)


# --- docs -----------------------------------------------------------------------------------


def tock_doc_check_commands() -> list[str]:
    text = (ROOT / "docs" / "tock.md").read_text()
    step = text[text.index("### 5. Check it") :]
    (block,) = re.findall(r"```sh\n(.*?)```", step[: step.index("\n## ")], re.S)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


async def test_tock_doc_readiness_check_shows_the_store(tmp_path: Path) -> None:
    """docs/tock.md step 5 asks the send listener's /readyz, where it listens: in the pod
    (kubectl exec, the image's Python) and on a host (the default bind)."""
    commands = tock_doc_check_commands()
    (kubectl,) = [c for c in commands if c.startswith("kubectl exec")]
    words = shlex.split(kubectl)
    target, container = words[2], words[words.index("-c") + 1]
    assert target == f"deploy/{k8s_one('Deployment')['metadata']['name']}"
    assert container == sidecar_container()["name"]
    command = words[words.index("--") + 1 :]
    assert command[:2] == ["python", "-c"]
    send_bind = Settings.load(container_env(sidecar_container())).send_bind
    code = command[2]
    assert f"'{send_bind.host}', {send_bind.port}" in code
    async with running_sidecar(settings_for(tmp_path)) as sidecar:
        port = urlsplit(sidecar.send_url).port
        code = code.replace(f", {send_bind.port},", f", {port},")
        result = await trio.run_process(
            [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0, result.stderr
    status, _, body = result.stdout.decode().partition(" ")
    assert status == "200"
    assert json.loads(body)["store"]["kind"] == "sqlite"
    (curl,) = [c for c in commands if c.startswith("curl -s http://127.0.0.1")]
    assert curl.endswith(f"http://{Settings.load({}).send_bind}/readyz")


def test_readme_says_what_the_js_tests_need() -> None:
    section = readme_section("## Test it")
    js_test = (ROOT / "tests" / "test_js_client.py").read_text()
    (version,) = re.findall(r"Node\.js (\d+\+)", js_test)
    assert f"**Node.js {version}**" in section
    assert "tests/js/" in section


def test_readme_lists_every_setting() -> None:
    section = readme_section("## Settings")
    for option in OPTIONS:
        assert f"| `{option.env}` | `{option.flag}` |" in section, option.env
