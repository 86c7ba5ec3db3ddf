"""Metrics for Prometheus: the metrics listener (SIDECAR_METRICS_BIND) serves `/metrics` and
nothing else; deploy/prometheus/ (scrape configuration, alert rules) passes `promtool`, each
alert fires on its signal and stays quiet without it; deploy/grafana/sidecar-dashboard.json
is a well-formed dashboard whose queries parse; and every metric and label value the rules
and the dashboard name is in a real sidecar's `/metrics`.

`promtool` comes from Debian's `prometheus` package (.ci/run installs it; nothing is started).
Without it these tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar import cli
from sidecar.config import ConfigError, Settings
from tests.sidecar_harness import Sidecar, running_sidecar, settings_for
from tests.test_deploy import DEPLOY, ROOT, compose, compose_sidecars, require_tool

PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "sidecar-dashboard.json"

# The signals issue 14 asks an operator be paged on, each with the metric it is read from.
SIGNALS = {
    "store unavailable": "sidecar_store_errors_total",
    "feed history lost": "sidecar_feed_history_lost_total",
    "feed stalled": "sidecar_feed_events_total",
    "feed lag": "sidecar_feed_lag_seconds_bucket",
    "slow-consumer cut-offs": "sidecar_slow_consumer_disconnects_total",
    "stream limit reached": "sidecar_streams_rejected_total",
    "SENT marks dropped": "sidecar_sent_marks_dropped_total",
}

Samples = list[tuple[str, dict[str, str]]]


def samples_of(text: str) -> Samples:
    return [
        (sample.name, sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


async def scrape(sidecar: Sidecar) -> str:
    """The metrics listener's /metrics."""
    url = sidecar.running.metrics_url
    assert url is not None
    reply = await sidecar.client.get(f"{url}/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return reply.text


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for panel in dashboard_panels() for t in panel["targets"]]


def as_promql(expr: str) -> str:
    """A dashboard query as Prometheus gets it: Grafana's variables filled in."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


# --- the metrics listener -------------------------------------------------------------------


async def test_the_metrics_listener_serves_metrics_and_nothing_else(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_METRICS_BIND="127.0.0.1:0")
    async with running_sidecar(settings) as sidecar:
        url = sidecar.running.metrics_url
        assert url is not None
        assert url not in (sidecar.public, sidecar.send_url)
        await sidecar.send("alice")
        # The instance's own counters, the same as the send listener's /metrics.
        enqueued = ("sidecar_messages_total", {"transition": "enqueued"})
        assert enqueued in samples_of(await scrape(sidecar))
        via_send = await sidecar.client.get(f"{sidecar.send_url}/metrics")
        on_metrics = await sidecar.client.get(f"{url}/metrics")
        assert samples_of(via_send.text) == samples_of(on_metrics.text)
        assert 'sidecar_messages_total{transition="enqueued"} 1.0' in on_metrics.text

        body = {"connectorId": "web", "recipientId": "bob", "response": {"text": "no"}}
        for method, path in (
            ("POST", "/v1/send"),
            ("POST", "/v1/send/batch"),
            ("GET", "/openapi.json"),
            ("GET", "/readyz"),
            ("GET", "/healthz"),
            ("GET", "/io/app/web/sse?userId=bob"),
            ("POST", "/io/app/web/sse/ack?userId=bob"),
            ("GET", "/sidecar-sse.js"),
            ("GET", "/static/openapi.json"),
        ):
            reply = await sidecar.client.request(method, url + path, json=body)
            assert reply.status_code == 404, (method, path, reply.text)
            assert reply.json()["error"]["code"] == "not_found"
        assert (await sidecar.client.post(f"{url}/metrics")).status_code == 405
        head = await sidecar.running.store.head("web", "bob")
        assert head is None  # nothing was stored for bob


async def test_the_metrics_listener_is_off_unless_set(sidecar: Sidecar) -> None:
    assert sidecar.running.settings.metrics_bind is None
    assert sidecar.running.metrics_url is None


def test_a_metrics_address_in_use_stops_start_up_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name in list(os.environ):
        if name.startswith("SIDECAR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SIDECAR_STORE", f"sqlite:///{tmp_path}/sidecar.db")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        binds = ["--public-bind", "127.0.0.1:0", "--send-bind", "127.0.0.1:0"]
        assert cli.main(["serve", *binds, "--metrics-bind", f"127.0.0.1:{port}"]) == 1
    with warnings.catch_warnings():
        # hypercorn leaves the socket it could not bind to the garbage collector.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"sidecar: SIDECAR_METRICS_BIND (--metrics-bind) 127.0.0.1:{port}: ")


def test_the_metrics_bind_setting() -> None:
    settings = Settings.load({"SIDECAR_METRICS_BIND": "0.0.0.0:8082"})
    assert settings.metrics_bind is not None
    assert (settings.metrics_bind.host, settings.metrics_bind.port) == ("0.0.0.0", 8082)
    assert Settings.load({"SIDECAR_METRICS_BIND": ""}).metrics_bind is None
    with pytest.raises(ConfigError, match=r"^SIDECAR_METRICS_BIND: expected HOST:PORT"):
        Settings.load({"SIDECAR_METRICS_BIND": "8082"})


# --- Prometheus -----------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args], capture_output=True, text=True, check=False, timeout=60
    )


def test_promtool_accepts_the_compose_prometheus_config_and_its_rules() -> None:
    checked = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(alert_rules())} rules found" in checked.stdout
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_prometheus_scrapes_every_sidecar_metrics_listener() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for static in job["static_configs"] for t in static["targets"]}
    expected = set()
    for name, service in compose_sidecars().items():
        env = {k: str(v) for k, v in service["environment"].items()}
        bind = Settings.load({k: v for k, v in env.items() if k == "SIDECAR_METRICS_BIND"})
        assert bind.metrics_bind is not None
        assert bind.metrics_bind.host == "0.0.0.0"
        expected.add(f"{name}:{bind.metrics_bind.port}")
    assert targets == expected
    # What the prometheus and grafana services mount is here, where they read it from.
    services = compose()["services"]
    mounts = {
        volume.split(":")[1]: DEPLOY / volume.split(":")[0]
        for service in ("prometheus", "grafana")
        for volume in services[service]["volumes"]
    }
    for source in mounts.values():
        assert source.exists(), source
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS / "prometheus.yml"
    for rule_file in config["rule_files"]:
        assert mounts[f"/etc/prometheus/{rule_file}"] == PROMETHEUS / rule_file
    provisioning = mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "sidecar.yaml").read_text())[
        "providers"
    ]
    folder = provider["options"]["path"]
    assert mounts[f"{folder}/{DASHBOARD.name}"] == DASHBOARD
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


# Input series for `promtool test rules`, as a scrape of two instances would give them
# (one sample a minute), and when each alert must and must not be firing.
INSTANCE = {"job": "tock-sse-sidecar", "instance": "sidecar-1:8082"}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    labels = INSTANCE | labels
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


# Each: the input, then {minute: fires?}. Series stay flat for 10 minutes, then move.
ALERT_CASES: dict[str, tuple[list[dict[str, str]], dict[int, bool]]] = {
    "SidecarStoreUnavailable": (
        [series("sidecar_store_errors_total", "0x10 0+12x10", operation="ping")],
        {9: False, 11: False, 15: True},
    ),
    "SidecarFeedStalled": (
        [
            series("sidecar_messages_total", "0+5x10 50+5x10", transition="enqueued"),
            series("sidecar_feed_events_total", "0+5x10 50x10"),
        ],
        {9: False, 15: False, 18: True},
    ),
    "SidecarFeedLagHigh": (
        [
            series("sidecar_feed_lag_seconds_bucket", "0+10x10 100x10", le="0.1"),
            series("sidecar_feed_lag_seconds_bucket", "0+10x10 100x10", le="10.0"),
            series("sidecar_feed_lag_seconds_bucket", "0+10x20", le="+Inf"),
        ],
        {9: False, 13: False, 19: True},
    ),
    "SidecarFeedHistoryLost": (
        [series("sidecar_feed_history_lost_total", "0x10 1x30")],
        {9: False, 12: True, 30: False},
    ),
    "SidecarSlowConsumers": (
        [series("sidecar_slow_consumer_disconnects_total", "0+1x10 10+5x10")],
        {9: False, 15: True},
    ),
    "SidecarStreamLimitReached": (
        [
            series("sidecar_streams_rejected_total", "0+3x20", reason="draining"),
            series("sidecar_streams_rejected_total", "0x10 1x10", reason="instance_limit"),
        ],
        {9: False, 12: True, 19: False},
    ),
    "SidecarSentMarksDropped": (
        [series("sidecar_sent_marks_dropped_total", "0x10 3x30")],
        {9: False, 12: True, 30: False},
    ),
}


def test_each_alert_fires_on_its_signal_and_not_without(tmp_path: Path) -> None:
    assert set(ALERT_CASES) == {rule["alert"] for rule in alert_rules()}
    tests = []
    for alert, (input_series, expected) in ALERT_CASES.items():
        tests.append(
            {
                "interval": "1m",
                "input_series": input_series,
                "alert_rule_test": [
                    {
                        "eval_time": f"{minute}m",
                        "alertname": alert,
                        "exp_alerts": [{"exp_labels": _labels(alert)}] if fires else [],
                    }
                    for minute, fires in expected.items()
                ],
            }
        )
    # The rules without their annotations: promtool would compare those too.
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            del rule["annotations"]
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(rules))
    unit = tmp_path / "alerts_test.yaml"
    unit.write_text(yaml.safe_dump({"rule_files": ["alerts.yaml"], "tests": tests}))
    result = promtool("test", "rules", str(unit))
    assert result.returncode == 0, result.stdout + result.stderr


def _labels(alert: str) -> dict[str, str]:
    """The labels of `alert` firing on `INSTANCE`."""
    (rule,) = [r for r in alert_rules() if r["alert"] == alert]
    kept = {"reason": "instance_limit"} if alert == "SidecarStreamLimitReached" else {}
    labels: dict[str, str] = INSTANCE | kept | rule["labels"]
    return labels


def test_every_alert_has_a_severity_and_says_what_happened() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("page", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_readme_lists_the_alerts() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Alerts") :]
    section = section[: section.index("\n### ", 1)]
    listed = dict(re.findall(r"^\| `(\w+)` \| (\w+) \|", section, re.MULTILINE))
    assert listed == {rule["alert"]: rule["labels"]["severity"] for rule in alert_rules()}


# --- Grafana --------------------------------------------------------------------------------


def test_the_dashboard_is_well_formed() -> None:
    document = dashboard()
    assert document["title"]
    assert document["uid"]
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in document["panels"]:
        box = panel["gridPos"]
        assert 0 <= box["x"] < box["x"] + box["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(box["x"], box["x"] + box["w"])
            for y in range(box["y"], box["y"] + box["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
    for panel in dashboard_panels():
        assert panel["title"], panel["id"]
        assert panel["description"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            # Every variable a query uses is defined (or is one of Grafana's own).
            for name in re.findall(r"\$(\w+)", target["expr"]):
                assert name in variables or name == "__rate_interval", (panel["title"], name)


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # As recording rules, the queries get Prometheus' own parser.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": as_promql(expr)}
                    for i, expr in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- every name they use is real ------------------------------------------------------------

# Not metric names: PromQL's keywords and the functions the files use.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
PROMQL_FUNCTIONS = {"sum", "rate", "increase", "histogram_quantile", "max", "min", "avg"}


def names_in(expr: str) -> tuple[set[str], list[tuple[str, dict[str, str]]]]:
    """The metric names a PromQL expression reads, and its selectors' `label="value"`
    matchers (by metric). Loose (regular expressions, not a parser) but strict about what
    it cannot place: an identifier that is not a known function, keyword or label name
    counts as a metric name."""
    selectors = [
        (name, dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', matchers)))
        for name, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr)
    ]
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    metrics = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", bare):
        word, call = match.groups()
        if call:
            assert word in PROMQL_FUNCTIONS, f"unknown function {word} in {expr}"
        elif word not in PROMQL_WORDS:
            metrics.add(word)
    return metrics, selectors


async def test_every_metric_the_rules_and_the_dashboard_name_is_in_a_real_scrape(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path, SIDECAR_METRICS_BIND="127.0.0.1:0")
    async with running_sidecar(settings) as sidecar:
        text = await scrape(sidecar)
    samples = samples_of(text)
    exposed = {name for name, _ in samples}
    uses = {
        "alerts": [rule["expr"] for rule in alert_rules()],
        "dashboard": [as_promql(expr) for expr in dashboard_exprs()],
    }
    for where, exprs in uses.items():
        named: set[str] = set()
        for expr in exprs:
            metrics, selectors = names_in(expr)
            assert metrics, f"{where}: no metric in {expr}"
            assert metrics <= exposed, f"{where}: {metrics - exposed} not in /metrics ({expr})"
            for name, labels in selectors:
                assert any(n == name and labels.items() <= s.items() for n, s in samples), (
                    f"{where}: no sample {name}{labels} in /metrics"
                )
            named |= metrics
        # Each signal has its alert and its panel.
        for signal, metric in SIGNALS.items():
            assert metric in named, f"{where}: nothing reads {metric} ({signal})"
    # The dashboard shows every metric the sidecar has (a histogram by its buckets), the
    # `_created` timestamps prometheus_client adds aside.
    shown = set().union(*(names_in(expr)[0] for expr in uses["dashboard"]))
    for family in text_string_to_metric_families(text):
        if not family.name.endswith("_created"):
            assert {s.name for s in family.samples} & shown, f"no panel shows {family.name}"
