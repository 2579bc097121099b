"""What the routers share: the token's place in the document, path parameters, the error
answers every route documents, and the small checks several routes make."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import HTTPException, Security
from fastapi import Path as PathParam
from fastapi.params import Depends
from fastapi.security import HTTPBearer

from rollbackd.api.models import NAME_PATTERN, AutomationRequest, DecisionRequest, ErrorOut
from rollbackd.runtime.control import Control

API_PREFIX = "/api/v1"
MAX_ID = 2**63 - 1
"""SQLite's largest integer: a larger id would overflow the driver, not just miss."""

# Documents the scheme in the OpenAPI document; the check itself is the gate's, which
# runs before any body is read.
_bearer = HTTPBearer(auto_error=False, description="[server].token_file")
AUTH: list[Depends] = [Security(_bearer)]
"""The dependencies of every /api route."""

RollbackId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="a rollback's id")]
ScopeName = Annotated[
    str,
    PathParam(
        pattern=rf"^(\*|{NAME_PATTERN[1:-1]})$",
        description="a service, or * for every service",
        examples=["checkout"],
    ),
]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no bearer token, or a wrong one"},
    503: {"model": ErrorOut, "description": "the state store failed"},
}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    400: {"model": ErrorOut, "description": "the body is not JSON text (not UTF-8)"},
    413: {
        "model": ErrorOut,
        "description": "the request body is over [server].max_body (webhook_max_body)",
    },
}


def require_service(control: Control, name: str) -> None:
    """A 404 naming the services there are, unless ``name`` is one of them."""
    if name not in control.services:
        known = ", ".join(sorted(control.services)) or "none"
        raise HTTPException(404, f"unknown service {name!r}; services: {known}")


def who(body: DecisionRequest | AutomationRequest | None) -> str:
    """Who decided, as the request says; ``api`` when it does not."""
    return body.by if body is not None and body.by else "api"
