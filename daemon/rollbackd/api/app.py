"""The HTTP API (SPEC §5) and the Alertmanager receiver, as one FastAPI application.

``create_app`` only wires: it builds the app over a ``Control`` (the daemon as the API
sees it), installs the error handlers, includes one router per resource (``routes/``) and
puts the gate (``gate.py``: token, body limit, request metrics) in front of them all.
``server.py`` serves it inside the daemon; tests call it in-process.

Every answer but /metrics is JSON, errors included: ``{"detail": "..."}``, or for a 422
FastAPI's list of errors, each naming its field by ``loc``. A failing state store is a 503,
never a 500: for the webhook that makes Alertmanager retry.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from rollbackd import __version__
from rollbackd.api.api_metrics import ApiMetrics
from rollbackd.api.context import ApiContext, ReadyCache
from rollbackd.api.gate import Gate
from rollbackd.api.routes import (
    alertmanager,
    alerts,
    probes,
    releases,
    rollbacks,
    services,
    status,
)
from rollbackd.logs import get_logger
from rollbackd.runtime.alert_intake import AlertReceiver
from rollbackd.runtime.control import Control
from rollbackd.store.errors import ConflictError, StoreError

log = get_logger("rollbackd.server")

ROUTERS = (probes, status, rollbacks, services, releases, alerts, alertmanager)
"""In the order of the OpenAPI document's paths."""


def create_app(
    *,
    control: Control,
    registry: CollectorRegistry,
    token: str,
    max_body: int,
    webhook_max_body: int | None = None,
    prometheus_ready: Callable[[], Awaitable[bool]] | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The API over the daemon's ``control``, its own metrics on ``registry`` (which
    /metrics serves). ``prometheus_ready`` is /readyz's probe of Prometheus (None: not
    probed); ``webhook_max_body`` defaults to ``max_body``."""
    if not token:
        raise ValueError("the API token must not be empty")
    metrics = ApiMetrics(registry)
    app = FastAPI(
        title="rollbackd",
        version=__version__,
        description="Rolls bad releases back. Every /api route needs the bearer token of "
        "[server].token_file; /healthz, /readyz, /metrics and this document do not.",
        docs_url=None,  # the interactive docs load scripts from a CDN; the daemon serves none
        redoc_url=None,
    )
    app.state.context = ApiContext(
        control=control,
        receiver=AlertReceiver(control, clock=clock, counted=metrics.alert_counted),
        registry=registry,
        prometheus=ReadyCache(prometheus_ready),
        clock=clock,
    )
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(ConflictError)(_conflict)
    app.exception_handler(StoreError)(_store_failed)
    for module in ROUTERS:
        # Flat on the app, not include_router: FastAPI keeps an included router as one
        # opaque entry of app.routes, and the gate matches each request to a route to
        # name its template in the metrics and the methods of a 405. The routers' routes
        # carry their full paths, dependencies and tags already.
        app.router.routes.extend(module.router.routes)
    app.add_middleware(
        Gate,
        token=token,
        max_body=max_body,
        webhook_max_body=max_body if webhook_max_body is None else webhook_max_body,
        metrics=metrics,
        routes=lambda: app.router.routes,
    )
    return app


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's shape, less the rejected input: it can be large, and it is the caller's
    # own anyway.
    errors = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e["type"]}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)


async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=409)


async def _store_failed(request: Request, exc: StoreError) -> JSONResponse:
    log.error("state store failed while answering", path=request.url.path, error=str(exc))
    return JSONResponse({"detail": f"state store unavailable: {exc}"}, status_code=503)
