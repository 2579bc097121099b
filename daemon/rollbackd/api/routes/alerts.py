"""GET /api/v1/alerts: the alerts received from Alertmanager."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from rollbackd.api.context import Api
from rollbackd.api.models import AlertsOut, AlertsQuery
from rollbackd.api.outputs import alert_out
from rollbackd.api.routes.common import API_PREFIX, AUTH, ERRORS

router = APIRouter(prefix=API_PREFIX, dependencies=AUTH, tags=["alerts"])


@router.get("/alerts", response_model=AlertsOut, responses=ERRORS)
async def alerts(query: Annotated[AlertsQuery, Query()], api: Api) -> AlertsOut:
    """Alerts received from Alertmanager, the latest first; ``service`` filters on the
    service they matched."""
    found = await api.control.alerts(query.service, query.limit)
    return AlertsOut(alerts=[alert_out(a) for a in found])
