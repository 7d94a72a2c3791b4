"""Operations: health, metrics, the HTTP server and the live preview, one job per module.

::

    health.py          HealthState / HealthReport: liveness and readiness (no HTTP)
    metrics.py         Metrics: the Prometheus Telemetry, its metric table (METRICS), per-source totals
    access.py          AccessPolicy: the preview token, the Host and WebSocket Origin checks
    http.py            build_app / HttpServer: /metrics, /healthz, /readyz, and mounts the preview routes
    preview.py         PreviewHub: the latest frame per source, annotated and encoded only when watched
    preview_routes.py  the preview's page, /api/sources, snapshots and WebSocket
    preview.html       the page (package data)
    docs.py            docs/metrics.md's generated tables (python -m worker.ops.docs --write)
"""

from worker.ops.access import AccessPolicy
from worker.ops.health import HealthReport, HealthState
from worker.ops.http import HttpServer, access_policy, build_app
from worker.ops.metrics import Metrics, SourceSnapshot
from worker.ops.preview import PreviewHub

__all__ = [
    "AccessPolicy",
    "HealthReport",
    "HealthState",
    "HttpServer",
    "Metrics",
    "PreviewHub",
    "SourceSnapshot",
    "access_policy",
    "build_app",
]
