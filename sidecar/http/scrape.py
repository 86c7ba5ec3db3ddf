"""`GET /metrics`: the route on the send listener, and the metrics listener made of it alone.

The metrics listener (`SIDECAR_METRICS_BIND`) is for Prometheus where the send listener is
kept on loopback (the image, the Kubernetes pod): it serves this one route, so opening it to
a network exposes the counters and nothing that reads or changes messages.
"""

from __future__ import annotations

from quart import Quart, Response
from quart_trio import QuartTrio

from sidecar.http.common import install_error_handlers
from sidecar.metrics import CONTENT_TYPE, Metrics


def install_metrics_route(app: Quart, metrics: Metrics) -> None:
    @app.get("/metrics")
    async def metrics_exposition() -> Response:
        return Response(metrics.exposition(), content_type=CONTENT_TYPE)


def build_metrics_app(metrics: Metrics) -> QuartTrio:
    """The metrics listener's application: `/metrics`, and a JSON 404 or 405 for the rest."""
    app = QuartTrio("sidecar.scrape", static_folder=None)
    install_error_handlers(app)
    install_metrics_route(app, metrics)
    return app
