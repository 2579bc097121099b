"""What a check's values are compared with: the scope of one evaluation (which version is
current, which is the stable track beside a canary) and the last known good version's
value, the baseline of ``max_increase``.

A baseline is recorded when a version bakes (its checks' last values), or else measured
once, just before the current version went live, and kept for the life of the process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from rollbackd.checks.base import CheckSpec, Span
from rollbackd.checks.judge import Baseline, Measurement, Scope
from rollbackd.config.loader import Service
from rollbackd.logs import get_logger
from rollbackd.prometheus import PrometheusClient, PrometheusError
from rollbackd.runtime.versions import VersionTracker
from rollbackd.store.interfaces import StateStore

log = get_logger("rollbackd.engine")


@dataclass
class _Known:
    """One service's baselines, and the values that become one when its version bakes."""

    baselines: dict[tuple[str, str], Baseline] = field(default_factory=dict)
    """(check, version the baseline belongs to) -> the baseline."""
    last_values: dict[str, float] = field(default_factory=dict)
    """check -> its last value for the current version, recorded as the baseline at bake."""


class Baselines:
    def __init__(
        self, client: PrometheusClient, store: StateStore, versions: VersionTracker
    ) -> None:
        self.client = client
        self.store = store
        self.versions = versions
        self._known: dict[str, _Known] = {}

    def _of(self, service: str) -> _Known:
        return self._known.setdefault(service, _Known())

    async def scope(
        self,
        service: Service,
        check: CheckSpec,
        current: str | None,
        *,
        canary: bool,
        running: Sequence[str],
    ) -> Scope:
        """What one evaluation of ``check`` judges against, ``current`` running;
        ``canary``: one is in progress; ``running``: the versions version_query named."""
        rules = service.rules
        stable = None
        if canary:
            # The stable track is the version the canary replaces: the one before it in the
            # history, or else the one other version still running beside it.
            changes = self.store.version_changes(service.name, 1)
            stable = changes[0].from_version if changes else None
            others = [v for v in running if v != current]
            if stable is None and len(others) == 1:
                stable = others[0]
        baseline = None
        if check.max_increase is not None and not (canary and rules.version_scope):
            baseline = await self._last_known_good(service, check, current)
        return Scope(
            version_label=rules.version_scope,
            current_version=current,
            stable_version=stable,
            baseline=baseline,
        )

    def span(
        self, service: str, current: str | None, now: float, window_cap: timedelta | None
    ) -> Span | None:
        """What a check counting since the release counts over: since ``current`` went live,
        against the baseline window before that. While a rollback is verified
        (``window_cap``: the time since the switch), since the switch, against the window
        before the release that was rolled back: the target's own time."""
        if window_cap is None:
            since = self.versions.current_since(service)
            return None if since is None else Span.since_release(since, now)
        switched = now - window_cap.total_seconds()
        rolled_back = next(
            (
                change.at
                for change in self.store.version_changes(service, 10)
                if change.at <= switched and change.to_version != current
            ),
            None,
        )
        return Span(switched, now, switched if rolled_back is None else rolled_back)

    def note(
        self,
        service: Service,
        check: CheckSpec,
        measurements: list[Measurement],
        current: str | None,
    ) -> None:
        """Keep the check's values for the current version: its baseline if it bakes."""
        label = service.rules.version_scope
        for m in measurements:
            if (
                m.value is not None
                and not math.isnan(m.value)
                and (not label or dict(m.labels).get(label) == current)
            ):
                self._of(service.name).last_values[check.name] = m.value

    def version_changed(self, service: str) -> None:
        """The values kept belong to the version just replaced."""
        self._of(service).last_values.clear()

    def baked(self, service: str, version: str) -> None:
        """``version`` baked: its checks' last values are its baselines from now on."""
        known = self._of(service)
        for check_name, value in known.last_values.items():
            known.baselines[(check_name, version)] = Baseline(
                value, f"last known good {version}, recorded when it baked"
            )

    async def _last_known_good(
        self, service: Service, check: CheckSpec, current: str | None
    ) -> Baseline | None:
        """The last known good version's value: recorded when it baked, or else measured
        once, just before the current version went live."""
        lkg = self.versions.last_known_good(service.name)
        since = self.versions.current_since(service.name)
        if lkg is None or since is None:
            return None
        known = self._of(service.name)
        found = known.baselines.get((check.name, lkg))
        if found is not None:
            return found
        scope = service.rules.version_scope
        try:
            queries = check.queries(scope)
            answers = [
                await self.client.aquery(
                    q.expr, at=since - 1, deadline=check.interval.total_seconds()
                )
                for q in queries
            ]
        except PrometheusError as exc:
            log.info(
                "baseline not measured", service=service.name, check=check.name, error=str(exc)
            )
            return None
        readings = check.read({q.role: a for q, a in zip(queries, answers, strict=True)})
        if scope and check.groups_by_version:
            readings = {k: v for k, v in readings.items() if dict(k).get(scope) == lkg}
        values = [r.value for r in readings.values() if not math.isnan(r.value)]
        if len(values) != 1:
            return None
        baseline = Baseline(
            values[0], f"last known good {lkg}, measured just before {current} went live"
        )
        known.baselines[(check.name, lkg)] = baseline
        return baseline


__all__ = ["Baselines"]
