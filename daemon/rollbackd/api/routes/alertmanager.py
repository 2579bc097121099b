"""POST /api/v1/alertmanager: Alertmanager's webhook, handed to the ``AlertReceiver``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from rollbackd.api.context import Api
from rollbackd.api.models import AlertmanagerWebhook, ErrorOut, WebhookOut
from rollbackd.api.outputs import webhook_alert_out
from rollbackd.api.routes.common import API_PREFIX, AUTH, BODY_ERRORS
from rollbackd.logs import get_logger
from rollbackd.runtime.alert_intake import Delivery, IncomingAlert
from rollbackd.store.errors import StoreError

log = get_logger("rollbackd.server")

router = APIRouter(prefix=API_PREFIX, dependencies=AUTH, tags=["alerts"])


@router.post(
    "/alertmanager",
    response_model=WebhookOut,
    responses={
        **BODY_ERRORS,
        503: {"model": ErrorOut, "description": "not stored; Alertmanager retries"},
    },
)
async def alertmanager(payload: AlertmanagerWebhook, api: Api) -> WebhookOut | JSONResponse:
    """Alertmanager's webhook (payload version 4). Answers 200 only once every alert of
    the delivery is stored; a matched firing alert enters the rollback pipeline."""
    try:
        results = await api.receiver.receive(_delivery(payload))
    except StoreError as exc:
        log.error("alerts not stored: Alertmanager will retry", error=str(exc))
        return JSONResponse({"detail": f"alerts not stored, retry: {exc}"}, status_code=503)
    fresh = sum(1 for r in results if r.new)
    # truncatedAlerts: alerts of the group Alertmanager left out (its max_alerts); they
    # are never seen here, and one firing alert of a service is enough to roll it back.
    log.info(
        "alertmanager delivery",
        receiver=payload.receiver,
        alerts=len(results),
        new=fresh,
        truncated=payload.truncatedAlerts,
    )
    return WebhookOut(
        received=len(results), new=fresh, alerts=[webhook_alert_out(r) for r in results]
    )


def _delivery(payload: AlertmanagerWebhook) -> Delivery:
    return Delivery(
        receiver=payload.receiver,
        group_key=payload.groupKey,
        alerts=[
            IncomingAlert(
                fingerprint=a.fingerprint,
                status=a.status,
                starts_at=a.startsAt,
                ends_at=a.endsAt,
                labels=a.labels,
                annotations=a.annotations,
                generator_url=a.generatorURL,
            )
            for a in payload.alerts
        ],
    )
