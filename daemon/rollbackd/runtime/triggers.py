"""What enters the decision pipeline and what it answers: a ``Trigger`` (a firing check, a
mapped Alertmanager alert, a person), a ``Submission`` (what the pipeline did with it), and
the pipeline's memory of refusals (which were announced lately, which are settled for good).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rollbackd.config.loader import Service
from rollbackd.core.alert_text import alert_reason
from rollbackd.core.guards import Decision
from rollbackd.core.model import JSONValue, Rollback, StoredAlert
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.firings import Firing

REFUSAL_QUIET = 300.0
"""Seconds during which the same refusal (service, release, failed guards) is not announced
again. An alert storm against a paused service is one ``rollback.refused`` event and one
warning, not 10,000 of each offered to every notifier; each alert's own record still says
it was refused."""
REFUSAL_LOG_EVERY = 1000
"""A repeated refusal is logged (at info) on every this many repeats."""
SETTLED_LIMIT = 10_000
"""Settled standing triggers remembered per service."""


class UnknownService(LookupError):
    """A trigger or a rollback names a service the loaded config does not have."""


def service_named(engine: Engine, name: str) -> Service:
    """The service as configured now (a reload may have removed it)."""
    service = engine.loaded.services.get(name)
    if service is None:
        raise UnknownService(f"unknown service {name!r}")
    return service


@dataclass(frozen=True)
class Trigger:
    service: str
    source: str
    """``check``, ``alert`` or ``manual``."""
    reason: str
    at: float
    automatic: bool = True
    breach_started: float | None = None
    to_version: str | None = None
    requested_by: str | None = None
    detail: dict[str, JSONValue] = field(default_factory=dict)
    key: tuple[object, ...] = ()
    """What keeps firing behind an automatic trigger (a check's series, an alert): the
    pipeline decides once per release and key, and again only after a refusal that may
    lapse."""
    judged_for: str | None = None
    """The version whose series fired, for a firing of a version-scoped check (the version
    current when it was judged); None for any other trigger, which is about whatever
    version is current when it is decided."""

    @classmethod
    def from_firing(cls, firing: Firing, service: Service | None = None) -> Trigger:
        """``service``: as configured, to tell the version a version-scoped check judged
        (``judged_for``); None (or a service no longer configured) tells none."""
        m = firing.measurement
        judged = _judged_for(firing, service)
        return cls(
            service=firing.service,
            source="check",
            reason=f"check {firing.check}: {m.reason}",
            at=firing.at,
            breach_started=firing.breach_started,
            key=("check", firing.check, m.labels),
            judged_for=judged,
            detail={
                "check": firing.check,
                "series": dict(m.labels),
                "value": m.value,
                "threshold": str(m.threshold) if m.threshold else None,
                "baseline": (
                    {"value": m.baseline.value, "source": m.baseline.source} if m.baseline else None
                ),
                "query": m.query,
                "reason": m.reason,
                "version": firing.version if judged is None else judged,
            },
        )

    @classmethod
    def from_alert(cls, alert: StoredAlert, at: float) -> Trigger:
        """A mapped firing alert; its ``startsAt`` is when its breach began."""
        assert alert.matched_service is not None
        return cls(
            service=alert.matched_service,
            source="alert",
            reason=alert_reason(alert.alertname, alert.labels, alert.annotations),
            at=at,
            automatic=True,
            breach_started=alert.starts_at,
            detail={
                "alert_id": alert.id,
                "alertname": alert.alertname,
                "fingerprint": alert.fingerprint,
                "starts_at": alert.starts_at,
                "labels": dict(alert.labels),
            },
            key=("alert", alert.fingerprint, alert.starts_at),
        )

    def stale(self, current: str | None) -> bool:
        """Judged for a version that ``current`` has replaced since: not to be decided
        against ``current`` (its series were another release's)."""
        return self.judged_for is not None and self.judged_for != current

    def as_json(self) -> dict[str, JSONValue]:
        """As recorded with a rollback, its joined triggers and its refusal events."""
        return {
            "source": self.source,
            "reason": self.reason,
            "at": self.at,
            "breach_started": self.breach_started,
            "requested_by": self.requested_by,
            **self.detail,
        }


def _judged_for(firing: Firing, service: Service | None) -> str | None:
    """The version a version-scoped check's firing series belongs to: its series carry the
    version label, and only the version current when it was judged is judged. None for a
    check that is not version-scoped: its series are the whole service's, kept across a
    release (a breach seen just before a version change may be the new release's; the
    guard ``breach_after_release`` tells), so it is decided against the version current.
    None too when no version was known when it fired: every version's series was judged."""
    label = service.rules.version_scope if service is not None else None
    if service is None or label is None or firing.version is None:
        return None
    check = next((c for c in service.rules.check if c.name == firing.check), None)
    if check is None or not check.groups_by_version:
        return None
    return dict(firing.measurement.labels).get(label)


@dataclass(frozen=True)
class Submission:
    """What the pipeline did with a trigger."""

    outcome: str
    """``executing``, ``pending_approval``, ``dry_run``, ``refused``, ``joined``,
    ``ignored``, ``unrecorded`` (the state store failed: nothing was done), or
    ``not_holder`` (another daemon holds the service's lease: it decides; nothing done)."""
    rollback: Rollback | None
    decision: Decision | None
    reason: str


class Refusals:
    """Which refusals were announced lately, to announce each only once per quiet period."""

    def __init__(self, quiet: float = REFUSAL_QUIET, limit: int = 4096) -> None:
        self._quiet = quiet
        self._limit = limit
        self._seen: dict[tuple[object, ...], tuple[float, int]] = {}

    def repeat(self, key: tuple[object, ...], now: float) -> int | None:
        """None when this refusal is to be announced (first time, or its quiet period is
        over); else how often it has been repeated within the period."""
        seen = self._seen.get(key)
        if seen is None or now - seen[0] >= self._quiet or now < seen[0]:
            if len(self._seen) >= self._limit:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._quiet}
                if len(self._seen) >= self._limit:
                    self._seen.clear()  # bounded, at the price of announcing again
            self._seen[key] = (now, 0)
            return None
        repeats = seen[1] + 1
        self._seen[key] = (seen[0], repeats)
        return repeats


class Settled:
    """Per service, the (release, trigger key) pairs refused for good, by a guard that
    cannot lapse: ``reconsider`` skips them. Memory only: after a restart each standing
    trigger is decided once more, silently."""

    def __init__(self, limit: int = SETTLED_LIMIT) -> None:
        self._limit = limit
        self._settled: dict[str, dict[tuple[int, tuple[object, ...]], None]] = {}

    def settle(self, service: str, release: int, trigger: Trigger) -> None:
        if trigger.key:
            settled = self._settled.setdefault(service, {})
            if len(settled) >= self._limit:
                settled.clear()  # bounded; at worst a standing trigger is decided once more
            settled[(release, trigger.key)] = None

    def is_settled(self, service: str, release: int, trigger: Trigger) -> bool:
        return (release, trigger.key) in self._settled.get(service, {})
