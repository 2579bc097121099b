"""Baking: a healthy version becomes the last known good, the target of the next rollback.

The rules are in ``bake_evidence.py`` (what a bake period must show) and ``versions.py``
(the bake clock, kept in the store). This module feeds them: it counts each check
evaluation and each Alertmanager read as evidence for the current version, says what
keeps a version from baking, advances the clock at every service poll, keeps the checks'
values of a version that bakes as its baselines (``baselines.py``), and explains the
state of a bake for ``rollbackd status``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rollbackd.alertmanager import AlertWatch
from rollbackd.checks.judge import Measurement
from rollbackd.config.loader import LoadedConfig, Service
from rollbackd.core.sequential import Decision
from rollbackd.logs import get_logger
from rollbackd.runtime.bake_evidence import (
    BakeStatus,
    Evidence,
    Judgement,
    Requirement,
    Shortfall,
    assess,
    bake_status,
    evaluation_verdict,
    record_alerts,
    record_check,
    requirement,
    within,
)
from rollbackd.runtime.baselines import Baselines
from rollbackd.runtime.bus import EventBus
from rollbackd.runtime.versions import VersionTracker
from rollbackd.store.errors import StoreError
from rollbackd.store.interfaces import StateStore

log = get_logger("rollbackd.engine")


@dataclass
class _Bake:
    """One service's bake, as far as the store does not keep it."""

    evidence: Evidence = field(default_factory=Evidence)
    """What the current version's bake period has shown (``bake_evidence.py``)."""
    blockers: tuple[str, ...] = ()
    """What kept the version from baking at the last poll: checks and alerts firing."""
    shortfall: Shortfall | None = None
    """The current version's last bake period that ended without enough evidence."""
    not_worse: dict[str, str | None] = field(default_factory=dict)
    """check -> the version its sequential test last concluded not worse for."""


class Baking:
    def __init__(
        self, store: StateStore, versions: VersionTracker, bus: EventBus, baselines: Baselines
    ) -> None:
        self.store = store
        self.versions = versions
        self.bus = bus
        self.baselines = baselines
        self._bakes: dict[str, _Bake] = {}
        self._alert_watch: AlertWatch | None = None

    def _of(self, service: str) -> _Bake:
        return self._bakes.setdefault(service, _Bake())

    def count(
        self,
        service: Service,
        check: str,
        measurements: Sequence[Measurement],
        at: float,
        *,
        groups_by_version: bool,
    ) -> None:
        """Count one evaluation of ``check`` for the current version's bake."""
        try:
            current = self.versions.current(service.name)
        except StoreError:
            return  # uncounted is no health: the bake only lacks one evaluation
        scope = service.rules.version_scope if groups_by_version else None
        verdict, reason = evaluation_verdict(measurements, scope, current)
        bake = self._of(service.name)
        bake.evidence = record_check(bake.evidence, current, check, verdict, reason, at)
        if any(m.evidence and m.evidence.decision is Decision.NOT_WORSE for m in measurements):
            bake.not_worse[check] = current
        else:
            bake.not_worse.pop(check, None)

    async def bake(
        self,
        loaded: LoadedConfig,
        service: Service,
        now: float,
        *,
        firing_checks: Sequence[str],
        version_read: bool,
    ) -> str | None:
        """Advance the current version's bake: it becomes the last known good after
        ``bake_time`` with no check firing and none of its mapped alerts firing, in which
        every rollback check -- and, with ``[alertmanager] url``, the mapped alerts -- was
        judged OK in most evaluations (``bake_evidence.py``). The version when it has just
        baked, else None. ``firing_checks``: the service's checks firing now;
        ``version_read``: the last version_query answered (a version never bakes at a poll
        that could not tell which version runs: it may have just been replaced)."""
        name = service.name
        bake = self._of(name)
        blockers = await self._blockers(loaded, service, now, firing_checks)
        if blockers is None:
            return None
        bake.blockers = tuple(blockers)
        need = self.requirement(loaded, service)
        current = self.versions.current(name)
        # Every check a sequential test that has concluded "not worse": the evidence the
        # bake time stands in for is in, so the version need not wait it out.
        early = bool(need.checks) and all(bake.not_worse.get(c) == current for c in need.checks)

        def judged(version: str, since: float) -> Judgement:
            if not version_read:
                return Judgement.NOT_YET
            bake.evidence = within(bake.evidence, version, since)
            assessment = assess(bake.evidence, need)
            if assessment.judgement is Judgement.NOT_ENOUGH:
                bake.shortfall = Shortfall(version, now, assessment.shortfalls)
                log.info(
                    "bake period ended without enough evidence: a new one starts",
                    service=name,
                    version=version,
                    shortfalls=list(assessment.shortfalls),
                )
            return assessment.judgement

        try:
            baked = await self.versions.update_bake(
                name,
                now,
                not blockers,
                service.rules.service.bake_time,
                evidence=judged,
                early=early,
            )
            state = self.store.service_state(name)
        except StoreError as exc:
            # Read back from the store on the next evaluation: nothing is lost but time.
            log.critical("bake clock not recorded", service=name, error=str(exc))
            return None
        if state is not None:
            # What the period (restarted, perhaps) has not seen is dropped here, so that
            # what is counted from now on is the period's own.
            bake.evidence = within(bake.evidence, state.current_version, state.healthy_since)
            if bake.shortfall is not None and bake.shortfall.version != state.current_version:
                bake.shortfall = None
        if baked is not None:
            bake.shortfall = None
            self.baselines.baked(name, baked)
            log.info("version baked", service=name, version=baked, early=early)
            data = {"version": baked}
            if early:
                data["early"] = "every check's sequential test concluded not worse"
            await self.bus.publish("version.baked", now, name, data=data)
        return baked

    async def _blockers(
        self, loaded: LoadedConfig, service: Service, now: float, firing_checks: Sequence[str]
    ) -> list[str] | None:
        """What keeps the version from baking now; the Alertmanager read counted as
        evidence on the way. None when the firing alerts could not be read."""
        name = service.name
        blockers = [f"check {check} firing" for check in firing_checks]
        try:
            stored = self.store.firing_alerts(name) if service.rules.alert else []
        except StoreError as exc:
            log.critical("firing alerts not read: not baking", service=name, error=str(exc))
            return None
        blockers.extend(f"alert {n} firing" for n in sorted({a.alertname for a in stored}))
        self._alert_watch = AlertWatch.for_config(loaded, self._alert_watch)
        reading = await self._alert_watch.reading(name, now)
        if reading is not None:
            bake = self._of(name)
            current = self.versions.current(name)
            bake.evidence = record_alerts(
                bake.evidence, current, reading.verdict, reading.reason, now
            )
            blockers.extend(f"alert {n} active in Alertmanager" for n in reading.active)
        return blockers

    def requirement(self, loaded: LoadedConfig, service: Service) -> Requirement:
        """The evidence the service's versions need to bake."""
        rules = service.rules
        return requirement(
            ((c.name, c.action) for c in rules.check),
            has_alerts=bool(rules.alert),
            alertmanager=loaded.config.alertmanager.url is not None,
        )

    def status(
        self,
        loaded: LoadedConfig,
        service: Service,
        version: str | None,
        baked_at: float | None,
        bad_reason: str | None,
        healthy_since: float | None,
        now: float,
    ) -> BakeStatus:
        """Why the current version has (not) baked; the version's record and bake clock
        come from the store."""
        bake = self._bakes.get(service.name) or _Bake()
        evidence = within(bake.evidence, version, healthy_since)
        return bake_status(
            version=version,
            baked_at=baked_at,
            bad_reason=bad_reason,
            healthy_since=healthy_since,
            now=now,
            bake_time=service.rules.service.bake_time,
            blockers=bake.blockers,
            assessment=assess(evidence, self.requirement(loaded, service)),
            shortfall=bake.shortfall,
        )


__all__ = ["Baking"]
