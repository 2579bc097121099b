"""GET /api/v1/status: every service (version, last known good, automation, checks,
bake) and the rollbacks in flight."""

from __future__ import annotations

from fastapi import APIRouter

from rollbackd import __version__
from rollbackd.api.context import Api, ApiContext
from rollbackd.api.models import ServiceOut, StatusOut
from rollbackd.api.outputs import bake_out, check_out, rollback_out
from rollbackd.api.routes.common import API_PREFIX, AUTH, ERRORS
from rollbackd.config.loader import Service
from rollbackd.runtime.control import StatusReads

router = APIRouter(prefix=API_PREFIX, dependencies=AUTH, tags=["state"])


@router.get("/status", response_model=StatusOut, responses=ERRORS)
async def status(api: Api) -> StatusOut:
    """Services (version, last known good, automation, checks) and rollbacks in flight."""
    loaded = api.control.loaded
    reads = await api.control.status_reads(list(loaded.services))
    now = api.clock()
    return StatusOut(
        version=__version__,
        mode=loaded.config.daemon.mode.value,
        paused_all="*" in reads.paused,
        services=[_service_out(api, n, s, reads, now) for n, s in loaded.services.items()],
        in_flight=[rollback_out(r) for r in reads.in_flight],
    )


def _service_out(
    api: ApiContext, name: str, service: Service, reads: StatusReads, now: float
) -> ServiceOut:
    control = api.control
    state = reads.states[name]
    return ServiceOut(
        name=name,
        current_version=state.current_version if state else None,
        current_since=state.current_since if state else None,
        healthy_since=state.healthy_since if state else None,
        last_known_good=reads.last_known_good[name],
        paused=name in reads.paused or "*" in reads.paused,
        frozen=bool(state and state.frozen),
        frozen_reason=state.frozen_reason if state else None,
        canary_active=control.canary_active(name),
        checks=[check_out(c, control.check_state(name, c.name)) for c in service.rules.check],
        alerts=[str(r) for r in api.receiver.router.routes() if r.service == name],
        bake=bake_out(control.bake_status(service, state, reads.records.get(name), now)),
    )
