"""/healthz, /readyz and /metrics: answered without the token (see ``gate.PUBLIC_PATHS``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rollbackd.api.context import Api
from rollbackd.api.models import HealthOut, ReadyCheckOut, ReadyOut

router = APIRouter(tags=["probes"])


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> HealthOut:
    """Alive: the daemon's event loop answers."""
    return HealthOut()


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "a part is not ready"}},
)
async def readyz(response: Response, api: Api) -> ReadyOut:
    """Config loaded, state store writable, Prometheus reached."""
    loaded = api.control.loaded
    store = await api.control.store_health()
    reached = await api.prometheus.get()
    checks = {
        "config": ReadyCheckOut(
            ok=True, detail=f"{len(loaded.services)} service(s) from {loaded.path}"
        ),
        "store": ReadyCheckOut(
            ok=store.writable,
            detail=f"{store.location} is writable"
            if store.writable
            else f"cannot write {store.location}" + (f": {store.failure}" if store.failure else ""),
        ),
        "prometheus": ReadyCheckOut(
            ok=reached,
            detail="ready" if reached else "Prometheus did not answer /-/ready with 200",
        ),
    }
    ready = all(c.ok for c in checks.values())
    if not ready:
        response.status_code = 503
    return ReadyOut(ready=ready, checks=checks)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics(api: Api) -> Response:
    """The daemon's own metrics, in the Prometheus text format."""
    return Response(generate_latest(api.registry), media_type=CONTENT_TYPE_LATEST)
