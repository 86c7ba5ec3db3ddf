"""The demo page and its send route: absent unless SIDECAR_DEMO=true, and the route is the
send API's code (same validation, stored, then dispatched). The page itself runs in a real
browser in test_browser.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sidecar.protocol.message import State
from tests.sidecar_harness import running_sidecar, settings_for


def _body(recipient: str = "alice", text: str = "hi", connector: str = "web") -> dict[str, object]:
    return {
        "connectorId": connector,
        "recipientId": recipient,
        "response": {"responses": [{"text": text}]},
    }


async def test_demo_is_off_by_default(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    assert settings.demo is False
    async with running_sidecar(settings) as sidecar:
        page = await sidecar.client.get(f"{sidecar.public}/")
        send = await sidecar.client.post(f"{sidecar.public}/demo/send", json=_body())
        assert page.status_code == 404
        assert send.status_code == 404
        # Nothing was stored by the refused send.
        async with sidecar.stream("alice", last_event_id="0" * 24) as stream:
            message_id = await sidecar.send("alice")
            assert (await stream.next_message()).id == message_id


async def test_demo_page_names_the_connectors(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, SIDECAR_DEMO="true", SIDECAR_CONNECTORS="web=/io/app/web,two=/x"
    )
    async with running_sidecar(settings) as sidecar:
        page = await sidecar.client.get(f"{sidecar.public}/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-store"
    html = page.text
    assert '<script src="sidecar-sse.js"></script>' in html
    assert "/*DEMO_CONFIG*/" not in html
    match = re.search(r"var config = (.*);\n", html)
    assert match is not None
    assert json.loads(match.group(1)) == {
        "connectors": [
            {"id": "web", "streamPath": "/io/app/web/sse"},
            {"id": "two", "streamPath": "/x/sse"},
        ]
    }


async def test_demo_send_stores_and_dispatches(tmp_path: Path) -> None:
    async with running_sidecar(settings_for(tmp_path, SIDECAR_DEMO="true")) as sidecar:
        async with sidecar.stream("bob") as stream:
            reply = await sidecar.client.post(
                f"{sidecar.public}/demo/send", json=_body("bob", "from the demo")
            )
            assert reply.status_code == 202, reply.text
            answer = reply.json()
            assert answer["deliveredTo"] == 1
            event = await stream.next_message()
        assert event.id == answer["id"]
        assert json.loads(event.data) == {"responses": [{"text": "from the demo"}]}
        stored = await sidecar.running.store.get(answer["id"])
        assert stored is not None
        assert stored.recipient_id == "bob"
        assert stored.state >= State.SENT


async def test_demo_send_validates_like_the_send_api(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, SIDECAR_DEMO="true", SIDECAR_MAX_PAYLOAD_BYTES="200")
    bad_bodies: list[tuple[object, dict[str, str]]] = [
        ({"recipientId": "a", "response": {}}, {}),
        ({**_body(), "extra": 1}, {}),
        (_body(connector="nope"), {}),
        (_body(text="x" * 300), {}),
        (_body(), {"content-type": "text/plain"}),
    ]
    async with running_sidecar(settings) as sidecar:
        for body, headers in bad_bodies:
            content = json.dumps(body).encode()
            # The same request id, so the error bodies (which carry it) compare equal.
            headers = {"content-type": "application/json", "x-request-id": "r1", **headers}
            demo = await sidecar.client.post(
                f"{sidecar.public}/demo/send", content=content, headers=headers
            )
            api = await sidecar.client.post(
                f"{sidecar.send_url}/v1/send", content=content, headers=headers
            )
            assert (demo.status_code, demo.json()) == (api.status_code, api.json()), body
            assert demo.status_code in (400, 404, 413, 415)
        # None of them was stored: a fresh stream asking for everything gets nothing but
        # the message sent now.
        async with sidecar.stream("alice", last_event_id="0" * 24) as stream:
            message_id = await sidecar.send("alice")
            assert (await stream.next_message()).id == message_id
