"""GET /api/v1/status: every service (version, last known good, automation, checks,
bake) and the rollbacks in flight; on PostgreSQL also which daemon holds each service.

On PostgreSQL a service another daemon holds shows its checks as that holder saved them
(this daemon does not evaluate it). The lease fields (``member``; ``holder``, ``held_since``,
``epoch`` per service) are set only there: unset fields are left out of the answer, so a
daemon alone on SQLite answers exactly as before leases.
"""

from __future__ import annotations

from fastapi import APIRouter

from rollbackd import __version__
from rollbackd.api.context import Api, ApiContext
from rollbackd.api.models import CheckOut, ServiceOut, StatusOut
from rollbackd.api.outputs import bake_out, check_out, rollback_out
from rollbackd.api.routes.common import API_PREFIX, AUTH, ERRORS
from rollbackd.config.loader import Service
from rollbackd.runtime.control import Holdings, StatusReads

router = APIRouter(prefix=API_PREFIX, dependencies=AUTH, tags=["state"])


@router.get(
    "/status", response_model=StatusOut, responses=ERRORS, response_model_exclude_unset=True
)
async def status(api: Api) -> StatusOut:
    """Services (version, last known good, automation, checks) and rollbacks in flight;
    on PostgreSQL, which daemon holds each service and since when."""
    loaded = api.control.loaded
    names = list(loaded.services)
    reads = await api.control.status_reads(names)
    holdings = await api.control.leases(names)
    now = api.clock()
    services = [_service_out(api, n, s, reads, holdings, now) for n, s in loaded.services.items()]
    # Set only on PostgreSQL: an unset field is left out of the answer.
    member = {} if holdings.member is None else {"member": holdings.member}
    return StatusOut(
        version=__version__,
        mode=loaded.config.daemon.mode.value,
        paused_all="*" in reads.paused,
        services=services,
        in_flight=[rollback_out(r) for r in reads.in_flight],
        **member,
    )


def _service_out(
    api: ApiContext,
    name: str,
    service: Service,
    reads: StatusReads,
    holdings: Holdings,
    now: float,
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
        checks=_checks(api, name, service, holdings),
        alerts=[str(r) for r in api.receiver.router.routes() if r.service == name],
        bake=bake_out(control.bake_status(service, state, reads.records.get(name), now)),
        **_lease_fields(holdings, name),
    )


def _lease_fields(holdings: Holdings, name: str) -> dict[str, str | float | int | None]:
    """``holder``, ``held_since`` and ``epoch`` on PostgreSQL (null while no daemon holds
    the service); nothing alone on SQLite, where they are left out of the answer."""
    if holdings.member is None:
        return {}
    lease = holdings.leases.get(name)
    if lease is None:
        return {"holder": None, "held_since": None, "epoch": None}
    return {"holder": lease.holder, "held_since": lease.acquired_at, "epoch": lease.epoch}


def _checks(api: ApiContext, name: str, service: Service, holdings: Holdings) -> list[CheckOut]:
    """Each check's state: as its holder saved it when another daemon holds the service,
    else this daemon's own."""
    found = []
    for check in service.rules.check:
        state = holdings.check_state(name, check.name)
        found.append(
            check_out(
                check,
                state or api.control.check_state(name, check.name),
                api.control.check_evidence(name, check.name),
            )
        )
    return found
