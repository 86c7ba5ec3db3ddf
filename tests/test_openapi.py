"""The OpenAPI document: checked in, served as it is, complete, and true of a running
sidecar (schemathesis generates requests from it, valid and invalid, and checks every
answer against it)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
import trio
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import sidecar
from sidecar.http.public import PublicApp
from sidecar.http.send import build_send_app
from sidecar.hub import Hub
from sidecar.identity import MAX_USER_ID_LENGTH, user_id_problem
from sidecar.protocol.message import MAX_RESPONSE_DEPTH
from sidecar.store.sqlite import SqliteStore
from sidecar.stream import SentMarker
from tests.sidecar_harness import Sidecar, running_sidecar, settings_for

OPENAPI_FILE = Path(sidecar.__file__).parent / "static" / "openapi.json"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Per operation and generation mode; the whole run stays well under a minute.
MAX_EXAMPLES = 50


def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(OPENAPI_FILE.read_text())
    return document


async def test_the_served_document_is_the_checked_in_file(sidecar: Sidecar) -> None:
    reply = await sidecar.client.get(f"{sidecar.send_url}/openapi.json")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.content == OPENAPI_FILE.read_bytes()
    assert reply.json()["openapi"].startswith("3.")


async def test_metrics_and_the_document_need_no_send_token(tmp_path: Path) -> None:
    async with running_sidecar(settings_for(tmp_path, SIDECAR_SEND_TOKEN="s3cret")) as sc:
        for path in ("/metrics", "/openapi.json", "/healthz", "/readyz"):
            assert (await sc.client.get(f"{sc.send_url}{path}")).status_code == 200
        reply = await sc.client.post(f"{sc.send_url}/v1/send", json={})
        assert reply.status_code == 401


async def test_every_route_of_both_listeners_is_documented(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    store = await SqliteStore.open(str(tmp_path / "routes.db"))
    try:
        hub = Hub(1)
        apps = [
            build_send_app(settings, hub, store),
            PublicApp(settings, hub, store, SentMarker(store), trio.Event())._quart,
        ]
    finally:
        await store.aclose()
    served = {(c.stream_path, "get") for c in settings.connectors}  # the raw ASGI route
    for app in apps:
        for rule in app.url_map.iter_rules():
            path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
            served |= {
                (path, m.lower()) for m in rule.methods or () if m not in ("HEAD", "OPTIONS")
            }
    documented = {
        (path, method)
        for path, item in _document()["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    assert served == documented


async def test_no_listener_serves_a_static_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Quart's default would serve `<cwd>/static/` at `/static/` on both listeners.
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "secret.txt").write_text("not for the web")
    monkeypatch.chdir(tmp_path)
    async with running_sidecar(settings_for(tmp_path)) as sc:
        for base in (sc.public, sc.send_url):
            reply = await sc.client.get(f"{base}/static/secret.txt")
            assert reply.status_code == 404, (base, reply.text)
            assert reply.json()["error"]["code"] == "not_found"


def test_the_user_id_rule_is_stated_as_the_sidecar_applies_it() -> None:
    document = _document()
    schema = document["components"]["schemas"]["UserId"]
    assert (schema["minLength"], schema["maxLength"]) == (1, MAX_USER_ID_LENGTH)
    pattern = re.compile(schema["pattern"])
    for code in range(0x300):  # every control character and many around them
        user_id = f"a{chr(code)}b"
        assert (pattern.fullmatch(user_id) is not None) == (user_id_problem(user_id) is None)
    # Every user id the API takes is one of these.
    ref = {"$ref": "#/components/schemas/UserId"}
    assert document["components"]["schemas"]["SendRequest"]["properties"]["recipientId"] == ref
    for path in ("/io/app/web/sse", "/io/app/web/sse/ack"):
        operations = [o for m, o in document["paths"][path].items() if m in HTTP_METHODS]
        for parameter in (p for o in operations for p in o.get("parameters", ())):
            if parameter["name"] in ("userId", "userid"):
                assert parameter["schema"] == ref, (path, parameter)


def test_the_response_rules_are_stated() -> None:
    send_request = _document()["components"]["schemas"]["SendRequest"]
    description = send_request["properties"]["response"]["description"]
    assert f"nested at most {MAX_RESPONSE_DEPTH} levels" in description
    assert "64 bits" in description
    assert "NUL" in description
    assert "1e999" in description


def _operations_and_bases(send_url: str, public_url: str) -> list[tuple[Any, list[str]]]:
    """Every operation schemathesis can call, with the listeners that serve it. The stream
    is left out: its answer never ends."""
    document = _document()
    # The running sidecar has the one default connector: say so, or hardly any generated
    # send would name it (the others get 404, which is fine but stores nothing).
    send_request = document["components"]["schemas"]["SendRequest"]
    send_request["properties"]["connectorId"]["enum"] = ["web"]
    schema = schemathesis.openapi.from_dict(document, config=CONFIG).exclude(operation_id="stream")
    operations = []
    for result in schema.get_all_operations():
        operation = result.ok()
        servers = operation.definition.raw.get("servers") or _document()["paths"][
            operation.path
        ].get("servers")
        urls = {s["url"] for s in servers} if servers else {"http://127.0.0.1:8081"}
        bases = [send_url] if "http://127.0.0.1:8081" in urls else []
        bases += [public_url] if "http://127.0.0.1:8080" in urls else []
        operations.append((operation, bases))
    return operations


# Invalid data must be refused with one of schemathesis' default statuses, or with 413: a body
# over a limit (an `ids` list beyond maxItems is also beyond SIDECAR_MAX_ACK_BYTES) is
# refused for its size before it is parsed.
CONFIG = SchemathesisConfig.from_str(
    "[checks.negative_data_rejection]\n"
    'expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422",'
    ' "428", "429", "5xx"]\n'
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _fuzz(operation: Any, base_url: str, mode: GenerationMode) -> None:
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
    with requests.Session() as session:

        @hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=base_url, session=session, checks=checks, timeout=10)

        run()


@pytest.mark.time_limit(120)
async def test_schemathesis_finds_nothing_against_a_running_sidecar(tmp_path: Path) -> None:
    async with running_sidecar(settings_for(tmp_path)) as sc:
        operations = _operations_and_bases(sc.send_url, sc.public)
        assert {op.definition.raw["operationId"] for op, _ in operations} == {
            "send",
            "sendBatch",
            "metrics",
            "openapi",
            "healthz",
            "readyz",
            "ack",
            "browserClient",
        }
        for operation, bases in operations:
            assert bases, operation.path
            raw = operation.definition.raw
            modes = [GenerationMode.POSITIVE]
            if raw.get("parameters") or raw.get("requestBody"):  # something to get wrong
                modes.append(GenerationMode.NEGATIVE)
            for base in bases:
                for mode in modes:
                    await trio.to_thread.run_sync(_fuzz, operation, base, mode)
        # It really sent something: the send API stored what it accepted.
        reply = await sc.client.get(f"{sc.send_url}/metrics")
        assert 'sidecar_messages_total{transition="enqueued"} 0.0' not in reply.text
