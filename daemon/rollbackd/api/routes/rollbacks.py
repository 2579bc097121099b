"""/api/v1/rollbacks: the history, one rollback, a manual request, approve and reject."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Query

from rollbackd.api.context import Api
from rollbackd.api.models import (
    DecisionRequest,
    ErrorOut,
    HistoryOut,
    HistoryQuery,
    RollbackOut,
    RollbackRequest,
    SubmissionOut,
)
from rollbackd.api.outputs import rollback_out, submission_out
from rollbackd.api.routes.common import (
    API_PREFIX,
    AUTH,
    BODY_ERRORS,
    ERRORS,
    RollbackId,
    require_service,
    who,
)
from rollbackd.core.model import RollbackState
from rollbackd.logs import get_logger
from rollbackd.runtime.triggers import Trigger, UnknownService
from rollbackd.store.errors import StoreError

log = get_logger("rollbackd.server")

router = APIRouter(prefix=API_PREFIX, dependencies=AUTH, tags=["rollbacks"])

_DECIDED: dict[int | str, dict[str, Any]] = {
    **BODY_ERRORS,
    404: {"model": ErrorOut, "description": "no such rollback"},
    409: {"model": ErrorOut, "description": "the rollback is not waiting for approval"},
}


@router.get("/rollbacks", response_model=HistoryOut, responses=ERRORS)
async def history(query: Annotated[HistoryQuery, Query()], api: Api) -> HistoryOut:
    """Rollbacks, the latest first, each with its steps and the triggers it joined."""
    state = None if query.state is None else RollbackState(query.state)
    found = await api.control.history(query.service, state, query.limit)
    return HistoryOut(rollbacks=[rollback_out(r) for r in found])


@router.get(
    "/rollbacks/{rollback_id}",
    response_model=RollbackOut,
    responses={**ERRORS, 404: {"model": ErrorOut, "description": "no such rollback"}},
)
async def one_rollback(rollback_id: RollbackId, api: Api) -> RollbackOut:
    found = await api.control.rollback(rollback_id)
    if found is None:
        raise HTTPException(404, f"no rollback {rollback_id}")
    return rollback_out(found)


@router.post(
    "/rollbacks",
    status_code=202,
    response_model=SubmissionOut,
    responses={
        **BODY_ERRORS,
        404: {"model": ErrorOut, "description": "unknown service"},
        409: {"model": ErrorOut, "description": "another daemon holds the service"},
    },
)
async def request_rollback(body: RollbackRequest, api: Api) -> SubmissionOut:
    """A manual rollback, through the same pipeline as every other: guards, executors,
    verification, audit. The answer says what the pipeline did (``outcome``); a refusal
    is an answer too, with the guard that refused."""
    require_service(api.control, body.service)
    trigger = Trigger(
        service=body.service,
        source="manual",
        reason=body.reason,
        at=api.clock(),
        automatic=False,
        to_version=body.to_version,
        requested_by=body.requested_by or "api",
    )
    try:
        submission = await api.control.request(trigger)
    except UnknownService as exc:  # removed by a reload meanwhile
        raise HTTPException(404, str(exc)) from None
    if submission.outcome == "unrecorded":
        raise StoreError(submission.reason)
    if submission.outcome == "not_holder":  # another daemon holds the service: it decides
        raise HTTPException(409, submission.reason)
    log.info(
        "manual rollback requested",
        service=body.service,
        by=trigger.requested_by,
        outcome=submission.outcome,
    )
    rollback = submission.rollback
    detail = None if rollback is None else await api.control.detail(rollback)
    return submission_out(submission, detail)


@router.post("/rollbacks/{rollback_id}/approve", response_model=RollbackOut, responses=_DECIDED)
async def approve(
    rollback_id: RollbackId, api: Api, body: Annotated[DecisionRequest | None, Body()] = None
) -> RollbackOut:
    """Run a rollback that waits for approval."""
    try:
        rollback = await api.control.approve(rollback_id, who(body))
    except LookupError:
        raise HTTPException(404, f"no rollback {rollback_id}") from None
    return rollback_out(await api.control.detail(rollback))


@router.post("/rollbacks/{rollback_id}/reject", response_model=RollbackOut, responses=_DECIDED)
async def reject(
    rollback_id: RollbackId, api: Api, body: Annotated[DecisionRequest | None, Body()] = None
) -> RollbackOut:
    """Refuse a rollback that waits for approval; it never runs."""
    try:
        rollback = await api.control.reject(
            rollback_id, who(body), body.reason if body is not None else ""
        )
    except LookupError:
        raise HTTPException(404, f"no rollback {rollback_id}") from None
    return rollback_out(await api.control.detail(rollback))
