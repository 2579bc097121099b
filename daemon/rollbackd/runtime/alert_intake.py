"""Alertmanager alerts: which service an alert may roll back, and handing it to the pipeline.

An alert is outside input. Its labels decide only *whether* it matches a service's
``[[alert]]`` (alertname equal, every matcher satisfied); the service, the executors and the
version always come from the config and the state store, never from the alert. Labels and
annotations are stored as data and shown to people, nothing more.

Every delivered alert is recorded before the webhook answers; the receiver is idempotent on
(fingerprint, startsAt, status), because Alertmanager re-sends a firing group every
``group_interval``. A resolved alert is recorded and never taken as proof of health: it may
be synthetic (an alert that merely expired).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from rollbackd.config.loader import LoadedConfig
from rollbackd.core.matchers import LabelMatcher, parse_matchers
from rollbackd.core.model import AlertDraft, StoredAlert
from rollbackd.logs import get_logger
from rollbackd.runtime.control import Control
from rollbackd.runtime.triggers import Trigger, UnknownService
from rollbackd.store.errors import StoreError

log = get_logger("rollbackd.alerts")


@dataclass(frozen=True)
class AlertRoute:
    """One ``[[alert]]`` of one service."""

    service: str
    alertname: str
    matchers: tuple[LabelMatcher, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return labels.get("alertname") == self.alertname and all(
            m.matches(labels) for m in self.matchers
        )

    def __str__(self) -> str:
        inner = ", ".join(str(m) for m in self.matchers)
        return f"{self.alertname}{{{inner}}}" if inner else self.alertname


def compile_routes(loaded: LoadedConfig) -> list[AlertRoute]:
    """Every service's ``[[alert]]``, matchers parsed once. The loader has already rejected
    matchers that cannot be read (rules.AlertMapping), so parsing cannot fail here."""
    routes: list[AlertRoute] = []
    for service in loaded.services.values():
        for mapping in service.rules.alert:
            matchers = tuple(m for text in mapping.matchers for m in parse_matchers(text))
            routes.append(AlertRoute(service.name, mapping.alertname, matchers))
    return routes


class AlertRouter:
    """The routes of the config in force, recompiled when a reload replaces it."""

    def __init__(self, current: Callable[[], LoadedConfig]) -> None:
        self._current = current
        self._compiled_for: LoadedConfig | None = None
        self._routes: list[AlertRoute] = []

    def routes(self) -> list[AlertRoute]:
        loaded = self._current()
        if loaded is not self._compiled_for:
            self._routes = compile_routes(loaded)
            self._compiled_for = loaded
        return self._routes

    def services_for(self, labels: Mapping[str, str]) -> list[str]:
        return sorted({r.service for r in self.routes() if r.matches(labels)})


@dataclass(frozen=True)
class IncomingAlert:
    """One alert of a delivery, validated (see ``api_models.AlertmanagerAlert``)."""

    fingerprint: str
    status: str
    starts_at: datetime
    ends_at: datetime | None
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    generator_url: str


@dataclass(frozen=True)
class Delivery:
    receiver: str
    group_key: str
    alerts: Sequence[IncomingAlert]


@dataclass(frozen=True)
class AlertResult:
    alert: StoredAlert
    new: bool


def _unix(at: datetime) -> float:
    return at.astimezone(UTC).timestamp()


def _end(at: datetime | None) -> float | None:
    # Alertmanager marks "no end" with Go's zero time, 0001-01-01T00:00:00Z.
    return None if at is None or at.year <= 1 else _unix(at)


class AlertReceiver:
    """Records each delivery, then hands every matched firing alert not yet handed over to
    the pipeline, as a firing check would be. It reaches the daemon through ``control``
    only: the store and the pipeline are the facade's to call."""

    def __init__(
        self,
        control: Control,
        *,
        clock: Callable[[], float] = time.time,
        counted: Callable[[StoredAlert, bool], None] | None = None,
    ) -> None:
        self.control = control
        self.router = AlertRouter(lambda: control.loaded)
        self.clock = clock
        self._counted = counted

    def draft(self, delivery: Delivery, alert: IncomingAlert) -> AlertDraft:
        alertname = alert.labels.get("alertname", "")
        services = self.router.services_for(alert.labels)
        matched = services[0] if len(services) == 1 else None
        if len(services) > 1:
            outcome = (
                f"ambiguous: matches the [[alert]] of services {', '.join(services)}; "
                "recorded, nothing done"
            )
        elif matched is None:
            outcome = "matches no [[alert]]: recorded and ignored"
        elif alert.status != "firing":
            outcome = "resolved: recorded; never taken as proof of health"
        else:
            outcome = ""
        return AlertDraft(
            fingerprint=alert.fingerprint,
            status=alert.status,
            starts_at=_unix(alert.starts_at),
            ends_at=_end(alert.ends_at),
            alertname=alertname,
            labels=dict(alert.labels),
            annotations=dict(alert.annotations),
            generator_url=alert.generator_url,
            receiver=delivery.receiver,
            group_key=delivery.group_key,
            matched_service=matched,
            outcome=outcome,
            needs_handling=matched is not None and alert.status == "firing",
        )

    async def receive(self, delivery: Delivery) -> list[AlertResult]:
        """Store every alert (raises StoreError when that fails: nothing was stored, and
        Alertmanager is to retry), then hand matched firing alerts to the pipeline."""
        async with self.control.alert_hand_over:
            now = self.clock()
            drafts = [self.draft(delivery, alert) for alert in delivery.alerts]
            stored = await self.control.record_alerts(drafts, now)
            results: list[AlertResult] = []
            for alert, new in stored:
                if self._counted is not None:
                    self._counted(alert, new)
                if alert.handled_at is None and alert.matched_service is not None:
                    alert = await hand_over(self.control, alert, now)
                results.append(AlertResult(alert, new))
            return results


async def hand_over(control: Control, alert: StoredAlert, now: float) -> StoredAlert:
    """Hand one stored, unhandled alert to the pipeline and record what it did. The
    caller holds ``control.alert_hand_over``. When another daemon holds the service the
    alert stays unhandled, for that daemon's relay to hand over (``runtime/relay.py``)."""
    service = alert.matched_service
    assert service is not None
    trigger = Trigger.from_alert(alert, now)
    rollback_id: int | None = None
    try:
        submission = await control.submit(trigger)
    except UnknownService:
        outcome = f"service {service!r} is no longer configured: nothing done"
    else:
        if submission.outcome == "unrecorded":
            # The pipeline did nothing, since it could not record it: left unhandled,
            # so Alertmanager's retry (the caller answers 503) brings it back.
            raise StoreError(submission.reason)
        if submission.outcome == "not_holder":
            log.info(
                "alert left for the service's holder",
                service=service,
                alertname=alert.alertname,
                fingerprint=alert.fingerprint,
            )
            return alert
        rollback_id = submission.rollback.id if submission.rollback else None
        outcome = f"{submission.outcome}: {submission.reason}"
    log.info(
        "alert handed to the pipeline",
        service=service,
        alertname=alert.alertname,
        fingerprint=alert.fingerprint,
        outcome=outcome,
        rollback_id=rollback_id,
    )
    await control.set_alert_handled(alert.id, now, outcome, rollback_id)
    return replace(alert, handled_at=now, outcome=outcome, rollback_id=rollback_id)


async def hand_over_waiting(
    control: Control, services: Sequence[str], clock: Callable[[], float] = time.time
) -> int:
    """Hand over the alerts of ``services`` that wait unhandled in the store (another
    daemon received them, or this one stopped before it could hand them over); how many.
    The relay calls this for the services this daemon holds."""
    handed = 0
    async with control.alert_hand_over:
        for alert in await control.unhandled_alerts(services):
            done = await hand_over(control, alert, clock())
            handed += done.handled_at is not None
    return handed
