"""POST /api/v1/releases: a release recorded by CI, for services whose version is not
discovered from metrics."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from rollbackd.api.context import Api
from rollbackd.api.models import ErrorOut, ReleaseOut, ReleaseRequest
from rollbackd.api.routes.common import API_PREFIX, AUTH, BODY_ERRORS, require_service

router = APIRouter(prefix=API_PREFIX, dependencies=AUTH, tags=["releases"])


@router.post(
    "/releases",
    response_model=ReleaseOut,
    responses={
        **BODY_ERRORS,
        404: {"model": ErrorOut, "description": "unknown service"},
        409: {
            "model": ErrorOut,
            "description": "the service discovers its version from version_query",
        },
    },
)
async def release(body: ReleaseRequest, api: Api) -> ReleaseOut:
    """Record a release (from CI), for a service whose version is not discovered from
    metrics."""
    require_service(api.control, body.service)
    service = api.control.services[body.service]
    if service.rules.service.version_query:
        raise HTTPException(
            409,
            f"service {body.service!r} reads its version from version_query; a release "
            "recorded here would flap against it. Record releases only for services "
            "without one",
        )
    try:
        seen = await api.control.release(body.service, body.version, dict(body.meta), api.clock())
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return ReleaseOut(
        service=body.service,
        version=body.version,
        changed=seen.changed,
        previous=seen.previous,
        bad=seen.bad,
    )
