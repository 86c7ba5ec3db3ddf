"""The demo: a chat page at `/` and `POST /demo/send`, on the public listener, only when
`SIDECAR_DEMO=true`. Off, neither route exists (404), which is what production wants: the
demo send route lets anyone on the public side message any user.

`POST /demo/send` takes exactly the send API's body and goes through the send API's own
validation and store-then-dispatch code, so the demo shows what the bot side would do.
"""

from __future__ import annotations

import json
from importlib import resources

from quart import Response
from quart_trio import QuartTrio

from sidecar.config import Settings
from sidecar.http.common import json_response
from sidecar.http.send import json_body, parse_item, store_messages
from sidecar.hub import Hub
from sidecar.store.base import Store

CONFIG_PLACEHOLDER = "/*DEMO_CONFIG*/null"


def demo_page(settings: Settings) -> bytes:
    """demo.html with the connectors filled in (ids and stream paths, as JSON that cannot
    close the script element it sits in)."""
    config = {
        "connectors": [{"id": c.id, "streamPath": c.stream_path} for c in settings.connectors],
    }
    encoded = json.dumps(config).replace("<", "\\u003c").replace(">", "\\u003e")
    template = resources.files("sidecar").joinpath("static/demo.html").read_text("utf-8")
    return template.replace(CONFIG_PLACEHOLDER, encoded, 1).encode()


def install_demo_routes(app: QuartTrio, settings: Settings, hub: Hub, store: Store) -> None:
    page = demo_page(settings)

    @app.get("/")
    async def demo_index() -> Response:
        response = Response(page, content_type="text/html; charset=utf-8")
        response.headers["Cache-Control"] = "no-store"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self' 'unsafe-inline'; "
            "style-src 'unsafe-inline'; connect-src 'self'"
        )
        return response

    @app.post("/demo/send")
    async def demo_send() -> Response:
        item = parse_item(await json_body(settings.max_payload_bytes), settings)
        (result,) = await store_messages(store, hub, [item])
        return json_response(result, 202)
