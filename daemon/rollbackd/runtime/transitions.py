"""A check's state transitions, told: log lines, events (``check.breach``,
``check.recovered``, ``prometheus.unreachable``/``recovered``) and the firings an
evaluation hands to the rollback pipeline. It keeps what telling needs between
evaluations: each series' latest measurement (``firing``) and which checks are blind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rollbackd.checks.base import Action, CheckSpec
from rollbackd.checks.judge import Measurement
from rollbackd.config.loader import Service
from rollbackd.core.check_state import CheckState, Phase, SeriesState, Transition
from rollbackd.core.samples import Labels, Verdict
from rollbackd.logs import get_logger
from rollbackd.runtime.bus import EventBus
from rollbackd.runtime.check_state_keeper import CheckStateKeeper, Key
from rollbackd.runtime.firings import CheckEvaluation, Firing, firing_data, measurement_at
from rollbackd.runtime.versions import VersionTracker
from rollbackd.store.errors import StoreError

log = get_logger("rollbackd.engine")


class Transitions:
    def __init__(self, bus: EventBus, versions: VersionTracker, keeper: CheckStateKeeper) -> None:
        self.bus = bus
        self.versions = versions
        self.keeper = keeper
        self._measured: dict[Key, dict[Labels, Measurement]] = {}
        """(service, check) -> series -> its latest measurement, for ``firing``."""
        self.blind: set[Key] = set()
        """The checks blind now: their queries keep failing."""

    async def report(
        self, service: Service, check: CheckSpec, evaluation: CheckEvaluation
    ) -> dict[Labels, Firing]:
        """Tell what the evaluation changed; the series to hand over, with their firings."""
        self._keep_measured((service.name, check.name), evaluation)
        fired = await self._tell_changes(service, check, evaluation)
        fired.update(self._restored_breaching(service, check, evaluation))
        return fired

    def firing(self, service: Service, states: Mapping[Key, CheckState]) -> list[Firing]:
        """Every series of the service's checks that fires in ``states``, with its latest
        measurement. A series restored firing after a restart counts once it has been
        evaluated again."""
        name = service.name
        found: list[tuple[str, Action, SeriesState, Measurement]] = []
        for check in service.rules.check:
            state = states.get((name, check.name))
            if state is None or not state.firing:
                continue
            measured = self._measured.get((name, check.name), {})
            for labels, series in state.series.items():
                measurement = measured.get(labels)
                if series.phase is Phase.FIRING and measurement is not None:
                    found.append((check.name, check.action, series, measurement))
        if not found:
            return []  # the common case, every few seconds for every service: no store read
        current = self.versions.current(name)
        firings = []
        for check_name, action, series, measurement in found:
            began = series.pending_since or series.firing_since
            firings.append(
                Firing(
                    service=name,
                    check=check_name,
                    action=action,
                    measurement=measurement,
                    version=current,
                    breach_started=began.timestamp() if began else measurement_at(series),
                    at=measurement_at(series),
                )
            )
        return firings

    def _keep_measured(self, key: Key, evaluation: CheckEvaluation) -> None:
        """The latest measurement of every series, kept while it may be needed: a firing
        series keeps the one that showed its breach when a gap follows."""
        measured = self._measured.setdefault(key, {})
        for labels in list(measured):
            if labels not in evaluation.state.series:
                del measured[labels]
        for m in evaluation.measurements:
            judged = m.verdict not in (Verdict.NO_DATA, Verdict.ERROR)
            if judged or (m.labels not in measured and m.labels in evaluation.state.series):
                measured[m.labels] = m

    async def _tell_changes(
        self, service: Service, check: CheckSpec, evaluation: CheckEvaluation
    ) -> dict[Labels, Firing]:
        by_labels = {m.labels: m for m in evaluation.measurements}
        key = (service.name, check.name)
        now = evaluation.at
        fired: dict[Labels, Firing] = {}
        for change in evaluation.changes:
            if change.transition is Transition.BLIND:
                await self._set_blind(key, True, evaluation)
            elif change.transition is Transition.SIGHTED:
                await self._set_blind(key, False, evaluation)
            elif change.transition is Transition.FIRED and change.labels is not None:
                measurement = by_labels.get(change.labels) or evaluation.measurements[0]
                started = change.state.pending_since if change.state else None
                firing = self._firing(
                    service, check, measurement, started.timestamp() if started else now, now
                )
                fired[change.labels] = firing
                await self._fired(firing)
            elif change.transition is Transition.RECOVERED and change.labels is not None:
                recovered = by_labels.get(change.labels)
                log.info("check recovered", service=service.name, check=check.name)
                await self._emit(
                    "check.recovered",
                    service.name,
                    now,
                    {
                        "check": check.name,
                        "series": dict(change.labels),
                        "reason": recovered.reason if recovered else "",
                    },
                )
            elif change.transition in (Transition.PENDING, Transition.CLEARED):
                log.info(
                    f"check {change.transition.value}",
                    service=service.name,
                    check=check.name,
                    series=dict(change.labels or ()),
                )
        return fired

    def _firing(
        self,
        service: Service,
        check: CheckSpec,
        measurement: Measurement,
        breach_started: float,
        at: float,
    ) -> Firing:
        return Firing(
            service=service.name,
            check=check.name,
            action=check.action,
            measurement=measurement,
            version=self.versions.current(service.name),
            breach_started=breach_started,
            at=at,
        )

    async def _fired(self, firing: Firing) -> None:
        m = firing.measurement
        log.warning(
            "check fired",
            service=firing.service,
            check=firing.check,
            series=m.series,
            reason=m.reason,
            action=firing.action.value,
        )
        try:
            await self._emit("check.breach", firing.service, firing.at, firing_data(firing))
        except StoreError as exc:
            # Not recorded is no reason not to act: the pipeline decides, and refuses what
            # it cannot record itself.
            log.critical("check.breach not recorded", service=firing.service, error=str(exc))

    def _restored_breaching(
        self, service: Service, check: CheckSpec, evaluation: CheckEvaluation
    ) -> dict[Labels, Firing]:
        """The series restored firing that this evaluation shows breaching: handed over
        again, as the pipeline may never have recorded their firing. What it did record,
        it joins: one rollback per release."""
        fired: dict[Labels, Firing] = {}
        key = (service.name, check.name)
        for labels, series in self.keeper.restored_breaching(key, evaluation.state, check.policy()):
            measurement = next(
                (m for m in evaluation.measurements if m.labels == labels),
                evaluation.measurements[0],
            )
            began = series.pending_since or series.firing_since
            log.warning(
                "check restored firing: handed over again",
                service=service.name,
                check=check.name,
                series=measurement.series,
                reason=measurement.reason,
            )
            fired[labels] = self._firing(
                service,
                check,
                measurement,
                began.timestamp() if began else evaluation.at,
                evaluation.at,
            )
        return fired

    async def _set_blind(self, key: Key, blind: bool, evaluation: CheckEvaluation) -> None:
        was_any = bool(self.blind)
        if blind:
            self.blind.add(key)
        else:
            self.blind.discard(key)
        reason = evaluation.measurements[0].reason if evaluation.measurements else ""
        log.warning("check blind" if blind else "check sees again", service=key[0], check=key[1])
        if blind and not was_any:
            await self._emit(
                "prometheus.unreachable",
                key[0],
                evaluation.at,
                {"check": key[1], "reason": reason},
            )
        elif not blind and was_any and not self.blind:
            await self._emit("prometheus.recovered", key[0], evaluation.at, {"check": key[1]})

    async def _emit(self, kind: str, service: str, at: float, data: Mapping[str, Any]) -> None:
        await self.bus.publish(kind, at, service, data=dict(data))


__all__ = ["Transitions"]
