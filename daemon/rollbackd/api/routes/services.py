"""/api/v1/services/{name}/pause and /resume: automatic rollbacks off and on again."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from rollbackd.api.context import Api
from rollbackd.api.models import AutomationOut, AutomationRequest, ErrorOut
from rollbackd.api.routes.common import (
    API_PREFIX,
    AUTH,
    BODY_ERRORS,
    ScopeName,
    require_service,
    who,
)

router = APIRouter(prefix=API_PREFIX, dependencies=AUTH, tags=["automation"])

_AUTOMATION: dict[int | str, dict[str, Any]] = {
    **BODY_ERRORS,
    404: {"model": ErrorOut, "description": "unknown service"},
}


@router.post("/services/{name}/pause", response_model=AutomationOut, responses=_AUTOMATION)
async def pause(
    name: ScopeName, api: Api, body: Annotated[AutomationRequest | None, Body()] = None
) -> AutomationOut:
    """Stop automatic rollbacks of a service, or of all (``*``). Checks keep running and
    reporting; people can still roll back by hand."""
    if name != "*":
        require_service(api.control, name)
    paused = await api.control.pause(name, who(body), api.clock())
    return AutomationOut(scope=name, paused=True, thawed=False, paused_scopes=sorted(paused))


@router.post("/services/{name}/resume", response_model=AutomationOut, responses=_AUTOMATION)
async def resume(
    name: ScopeName, api: Api, body: Annotated[AutomationRequest | None, Body()] = None
) -> AutomationOut:
    """Restart automatic rollbacks. For one service this also thaws it when it was
    frozen (by a failed rollback, or max_rollbacks): a person has looked."""
    if name != "*":
        require_service(api.control, name)
    resumed = await api.control.resume(name, who(body), api.clock())
    return AutomationOut(
        scope=name,
        paused=name in resumed.paused or "*" in resumed.paused,
        thawed=resumed.thawed is not None,
        paused_scopes=sorted(resumed.paused),
    )
