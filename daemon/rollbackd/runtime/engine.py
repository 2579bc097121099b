"""The evaluation engine: one tick of one check, or of everything, callable from a test.

For each check it runs the queries, judges the answers (``checks/judge.py``), steps the
state machine (``checks/state.py``), and turns transitions into events. For each service
it reads the running version, whether a canary is in progress, and bakes healthy versions
into the last known good. It never rolls anything back itself: a firing check is handed to
``on_fire`` (the rollback pipeline).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from rollbackd.alertmanager import AlertWatch
from rollbackd.checks.base import Action, CheckSpec, Query
from rollbackd.checks.batching import Batch, Plan, plan
from rollbackd.checks.judge import Baseline, Measurement, Scope, error_measurement, judge
from rollbackd.config.loader import LoadedConfig, Service
from rollbackd.core.check_state import (
    Change,
    CheckState,
    Errored,
    Judged,
    Phase,
    Policy,
    SeriesState,
    Transition,
    step_check,
)
from rollbackd.core.samples import Labels, QueryResult, Verdict
from rollbackd.prometheus import PrometheusClient, PrometheusError, QueryError
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
from rollbackd.runtime.bus import EventBus
from rollbackd.runtime.logs import get_logger
from rollbackd.runtime.metrics import Metrics
from rollbackd.runtime.versions import VersionTracker, is_valid_version
from rollbackd.store.check_state_codec import StateFormatError, decode, encode
from rollbackd.store.errors import StoreError
from rollbackd.store.sqlite import Store

log = get_logger("rollbackd.runtime.engine")

QUERY_BATCHING = True
"""Whether engines batch checks of one shape into one query per interval (``batching.py``)
unless told otherwise; the benchmark switches it to compare."""

Answers = Mapping[str, QueryResult] | PrometheusError
"""A check's query answers by role, fetched by its batch, or why the batch's query failed."""

_VERDICT_RANK = {Verdict.OK: 0, Verdict.NO_DATA: 1, Verdict.ERROR: 2, Verdict.BREACH: 3}


@dataclass(frozen=True)
class Firing:
    """A check that fired, handed to the rollback pipeline."""

    service: str
    check: str
    action: Action
    measurement: Measurement
    version: str | None
    breach_started: float
    at: float


@dataclass(frozen=True)
class CheckEvaluation:
    service: str
    check: CheckSpec
    at: float
    measurements: list[Measurement]
    state: CheckState
    changes: list[Change]
    duration: float

    @property
    def verdict(self) -> Verdict:
        """The worst verdict among the series, for metrics and tables."""
        return max((m.verdict for m in self.measurements), key=_VERDICT_RANK.__getitem__)


_BLANK_STATE = encode(CheckState())
"""What a check with nothing worth restoring encodes to: it has no row in the store."""

REJECTED_LOGGED_LIMIT = 64
"""Rejected version labels remembered per service as already logged."""


@dataclass
class _ServiceView:
    """What the engine last learnt about a service: its canary, its baselines."""

    canary: bool = False
    baselines: dict[tuple[str, str], Baseline] = field(default_factory=dict)
    """(check, version the baseline belongs to) -> the baseline."""
    last_values: dict[str, float] = field(default_factory=dict)
    """check -> its last value for the current version, recorded as the baseline at bake."""
    running: tuple[str, ...] = ()
    """Every valid version version_query answered last time (a canary runs two)."""
    rejected_logged: set[str] = field(default_factory=set)
    """Rejected version labels already logged: a broken exporter is reported once per
    value, not once per poll."""
    evidence: Evidence = field(default_factory=Evidence)
    """What the current version's bake period has shown (``bake_evidence.py``)."""
    bake_blockers: tuple[str, ...] = ()
    """What kept the version from baking at the last poll: checks and alerts firing."""
    shortfall: Shortfall | None = None
    """The current version's last bake period that ended without enough evidence."""
    version_read: bool = True
    """Whether the last version_query answered: a version never bakes at a poll that could
    not tell which version runs (it may have just been replaced)."""


def _dt(at: float) -> datetime:
    return datetime.fromtimestamp(at, tz=UTC)


class Engine:
    def __init__(
        self,
        loaded: LoadedConfig,
        client: PrometheusClient,
        store: Store,
        *,
        metrics: Metrics | None = None,
        on_fire: Callable[[Firing], Awaitable[bool]] | None = None,
        bus: EventBus | None = None,
        query_batching: bool | None = None,
    ) -> None:
        self.loaded = loaded
        self.bus = bus or EventBus(store)
        self.client = client
        self.store = store
        self.metrics = metrics or Metrics()
        self.on_fire = on_fire
        """Hands a firing over (to the pipeline); False when it could not be recorded."""
        self._not_handed_over: dict[tuple[str, str, Labels], Firing] = {}
        """Firings the pipeline could not record (the state store failed): handed over
        again on every evaluation while their series still fires, so a breach seen while
        the disk was full is acted on once it is not."""
        self.versions = VersionTracker(store)
        self.states: dict[tuple[str, str], CheckState] = {}
        self._measured: dict[tuple[str, str], dict[Labels, Measurement]] = {}
        """(service, check) -> series -> its latest measurement, for ``firing``."""
        self._views: dict[str, _ServiceView] = {}
        self._blind: set[tuple[str, str]] = set()
        self.query_batching = QUERY_BATCHING if query_batching is None else query_batching
        self._plan: Plan | None = None
        self._rejected: set[str] = set()
        """Batches whose query Prometheus (or a proxy) refused: their checks run alone."""
        self._alert_watch: AlertWatch | None = None
        self._saved: dict[tuple[str, str], str] = {}
        """(service, check) -> the state last written to the store (no entry: no row), so
        a state that did not change is not written again."""
        self._restored_firing: set[tuple[str, str, Labels]] = set()
        """Series restored firing, not yet handed over again since the restart."""
        self._restore_states()

    # -- configuration ------------------------------------------------------------

    def replace_config(self, loaded: LoadedConfig) -> None:
        """Take a reloaded config. Every check that still exists by (service, name) keeps
        its state, even if its definition changed: as Prometheus keeps an alert's state
        across a reload by rule name, a breach under way must neither be forgotten nor,
        restarted, dated after a release it predates. Removed checks are forgotten, here
        and in the store."""
        self.loaded = loaded
        configured = _configured(loaded)
        self.states = {key: state for key, state in self.states.items() if key in configured}
        self._blind &= configured
        self._restored_firing = {k for k in self._restored_firing if k[:2] in configured}
        for key in [key for key in self._saved if key not in configured]:
            self._delete_state(key)
        self._plan = None

    # -- persisted check states -----------------------------------------------------

    def _restore_states(self) -> None:
        """The states saved before a restart, for the checks configured now; the rows of
        checks no longer configured, or that cannot be read, are deleted."""
        configured = _configured(self.loaded)
        for key, row in self.store.check_states().items():
            if key not in configured:
                self._delete_state(key)
                continue
            try:
                state = decode(row.state)
            except StateFormatError as exc:
                log.error(
                    "saved check state unreadable: the check starts over",
                    service=key[0],
                    check=key[1],
                    error=str(exc),
                )
                self._delete_state(key)
                continue
            self.states[key] = state
            self._saved[key] = encode(state)
            if state.blind:
                self._blind.add(key)
            self._restored_firing.update((*key, labels) for labels in state.firing_series())

    async def _hand_over_restored(
        self, service: Service, check: CheckSpec, evaluation: CheckEvaluation
    ) -> None:
        """A series restored firing makes no new FIRED transition, yet the pipeline may
        never have recorded its firing (the daemon died in between), so it is handed over
        again at its first breaching evaluation after the restart. What the pipeline did
        record, it joins: one rollback per release."""
        if not self._restored_firing:
            return
        policy = check.policy()
        for key in sorted(k for k in self._restored_firing if k[:2] == (service.name, check.name)):
            series = evaluation.state.series.get(key[2])
            if series is None or series.phase is not Phase.FIRING:
                self._restored_firing.discard(key)  # over without being seen breaching
                continue
            verdict = series.last_verdict
            if verdict is None or policy.effective(verdict) is not Verdict.BREACH:
                continue  # a gap: no evidence yet that it still breaches
            self._restored_firing.discard(key)
            measurement = next(
                (m for m in evaluation.measurements if m.labels == key[2]),
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
            await self._hand_over(
                key,
                Firing(
                    service=service.name,
                    check=check.name,
                    action=check.action,
                    measurement=measurement,
                    version=self.versions.current(service.name),
                    breach_started=began.timestamp() if began else evaluation.at,
                    at=evaluation.at,
                ),
            )

    def _save_state(
        self, key: tuple[str, str], state: CheckState, policy: Policy, at: float
    ) -> None:
        """Write the check's state if it differs from what was last written. A failed
        write is logged and retried at the next evaluation; it never stops one."""
        # Past blind_after, more errors change nothing the state machine looks at; without
        # the cap every check would be written at every evaluation of an outage.
        stored = replace(state, error_count=min(state.error_count, policy.blind_after))
        text = encode(stored)
        if self._saved.get(key, _BLANK_STATE) == text:
            return
        try:
            if text == _BLANK_STATE:
                self.store.delete_check_state(*key)
            else:
                self.store.save_check_state(*key, text, at)
        except StoreError as exc:
            log.critical(
                "check state not saved: after a restart now the check would start over",
                service=key[0],
                check=key[1],
                error=str(exc),
            )
            return
        if text == _BLANK_STATE:
            self._saved.pop(key, None)
        else:
            self._saved[key] = text

    def _delete_state(self, key: tuple[str, str]) -> None:
        try:
            self.store.delete_check_state(*key)
        except StoreError as exc:
            # Harmless meanwhile: a row of a check not configured is never restored, and
            # the next start or reload deletes it.
            log.critical(
                "saved state of a removed check not deleted",
                service=key[0],
                check=key[1],
                error=str(exc),
            )
            return
        self._saved.pop(key, None)

    @property
    def plan(self) -> Plan:
        """Which checks run in a batch and which alone, for the config now loaded."""
        if self._plan is None:
            services = self.loaded.services.values()
            if self.query_batching:
                self._plan = plan(services)
            else:
                self._plan = Plan(singles=[(s, c) for s in services for c in s.rules.check])
        return self._plan

    def canary_active(self, service: str) -> bool:
        view = self._views.get(service)
        return view.canary if view else False

    def check_state(self, service: str, check: str) -> CheckState:
        return self.states.get((service, check)) or CheckState(series={})

    # -- one tick -----------------------------------------------------------------

    async def tick(self, now: float | None = None) -> list[CheckEvaluation]:
        """Every service's version, then every check, then baking, once. Tests and ``eval``
        call this; the daemon schedules the same steps per service, batch and check."""
        at = time.time() if now is None else now
        services = list(self.loaded.services.values())
        for service in services:
            await self.observe_service(service, at)
        current = self.plan
        batched, alone = await asyncio.gather(
            asyncio.gather(*(self.run_batch(batch, at) for batch in current.batches.values())),
            asyncio.gather(*(self.run_check(s, check, at) for s, check in current.singles)),
        )
        done = {(e.service, e.check.name): e for e in [*alone, *(e for b in batched for e in b)]}
        for service in services:
            await self.bake(service, at)
        # In the order of the config, as a test or a table reads them.
        return [
            done[(service.name, check.name)]
            for service in services
            for check in service.rules.check
            if (service.name, check.name) in done
        ]

    async def observe_service(self, service: Service, now: float) -> None:
        """Read the running version and whether a canary is in progress."""
        rules = service.rules
        view = self._views.setdefault(service.name, _ServiceView())
        if rules.service.version_query:
            try:
                result = await self.client.aquery(rules.service.version_query, at=now)
            except PrometheusError as exc:
                view.version_read = False
                self.metrics.queries.labels(_outcome(exc)).inc()
                log.warning("version query failed", service=service.name, error=str(exc))
            else:
                view.version_read = True
                self.metrics.queries.labels("ok").inc()
                self._observe_version(service, result, now)
        if rules.canary is not None:
            try:
                result = await self.client.aquery(rules.canary.active_query, at=now)
            except PrometheusError as exc:
                self.metrics.queries.labels(_outcome(exc)).inc()
                log.warning("canary query failed", service=service.name, error=str(exc))
            else:
                self.metrics.queries.labels("ok").inc()
                active = any(not math.isnan(s.value) and s.value != 0 for s in result.samples)
                if active != view.canary:
                    log.info("canary", service=service.name, active=active)
                view.canary = active

    def _observe_version(self, service: Service, result: QueryResult, now: float) -> None:
        label = service.rules.service.version_query_label
        # One poll of the service job: a version missing from a single answer stays current.
        poll = min((c.interval.total_seconds() for c in service.rules.check), default=15.0)
        seen = self.versions.observe(
            service.name, list(result.samples), label, now, absence_grace=poll
        )
        view = self._views.setdefault(service.name, _ServiceView())
        # Only valid versions: the stable track named from here reaches check reasons,
        # and through them {reason}.
        view.running = tuple(
            sorted({v for s in result.samples if (v := s.label(label)) and is_valid_version(v)})
        )
        for reason in seen.rejected:
            if reason in view.rejected_logged:
                continue
            if len(view.rejected_logged) >= REJECTED_LOGGED_LIMIT:
                view.rejected_logged.clear()  # bounded: a churning exporter logs again
            view.rejected_logged.add(reason)
            log.warning("version label rejected", service=service.name, reason=reason)
        if not seen.changed or seen.current is None:
            return
        self.metrics.version_changes.labels(service.name).inc()
        if seen.previous is not None:
            with contextlib.suppress(KeyError):  # never set: the daemon started on it
                self.metrics.version_info.remove(service.name, seen.previous)
        self.metrics.version_info.labels(service.name, seen.current).set(1)
        view = self._views.setdefault(service.name, _ServiceView())
        view.last_values.clear()
        self._forget_other_versions(service, seen.current)
        log.info(
            "version changed",
            service=service.name,
            from_version=seen.previous,
            to_version=seen.current,
            detected_at_start=seen.detected_at_start,
        )
        self._emit(
            "version.changed",
            service.name,
            now,
            {
                "from_version": seen.previous,
                "to_version": seen.current,
                "detected_at_start": seen.detected_at_start,
            },
        )
        record = self.store.version(service.name, seen.current)
        if record is not None and record.bad:
            self._emit(
                "release.bad_version_deployed",
                service.name,
                now,
                {"version": seen.current, "bad_reason": record.bad_reason},
            )

    def _forget_other_versions(self, service: Service, current: str) -> None:
        """Version-scoped checks judge only the running version's series. The series of the
        version just replaced vanish from judging; without this a firing one would stay
        firing forever (no data never recovers a series) and block baking. Checks that are not
        version-scoped keep their state: a breach that started before a release must not
        look like one the release caused."""
        label = service.rules.version_scope
        if label is None:
            return
        for check in service.rules.check:
            key = (service.name, check.name)
            state = self.states.get(key)
            if state is None or not check.groups_by_version:
                continue
            kept = {
                labels: series
                for labels, series in state.series.items()
                if dict(labels).get(label) == current
            }
            self.states[key] = CheckState(
                series=kept, error_count=state.error_count, blind=state.blind
            )
            # Saved too: restored after a restart, the old version's series would be
            # pending or firing for good, as the version is then no change to react to.
            self._save_state(key, self.states[key], check.policy(), time.time())

    async def bake(self, service: Service, now: float) -> str | None:
        """Advance the current version's bake (``bake_evidence.py``): it becomes the last
        known good after ``bake_time`` with no check firing and none of its mapped alerts
        firing, in which every rollback check -- and, with ``[alertmanager] url``, the
        mapped alerts -- was judged OK in most evaluations. Its checks' values are kept as
        the baseline for ``max_increase``."""
        name = service.name
        view = self._views.setdefault(name, _ServiceView())
        current = self.versions.current(name)
        blockers = [
            f"check {c.name} firing"
            for c in service.rules.check
            if self.check_state(name, c.name).phase is Phase.FIRING
        ]
        try:
            stored = self.store.firing_alerts(name) if service.rules.alert else []
        except StoreError as exc:
            log.critical("firing alerts not read: not baking", service=name, error=str(exc))
            return None
        blockers.extend(f"alert {n} firing" for n in sorted({a.alertname for a in stored}))
        self._alert_watch = AlertWatch.for_config(self.loaded, self._alert_watch)
        reading = await self._alert_watch.reading(name, now)
        if reading is not None:
            view.evidence = record_alerts(
                view.evidence, current, reading.verdict, reading.reason, now
            )
            blockers.extend(f"alert {n} active in Alertmanager" for n in reading.active)
        view.bake_blockers = tuple(blockers)
        need = self.bake_requirement(service)

        def judged(version: str, since: float) -> Judgement:
            if not view.version_read:
                return Judgement.NOT_YET
            view.evidence = within(view.evidence, version, since)
            assessment = assess(view.evidence, need)
            if assessment.judgement is Judgement.NOT_ENOUGH:
                view.shortfall = Shortfall(version, now, assessment.shortfalls)
                log.info(
                    "bake period ended without enough evidence: a new one starts",
                    service=name,
                    version=version,
                    shortfalls=list(assessment.shortfalls),
                )
            return assessment.judgement

        try:
            baked = self.versions.update_bake(
                name, now, not blockers, service.rules.service.bake_time, evidence=judged
            )
            state = self.store.service_state(name)
        except StoreError as exc:
            # Read back from the store on the next evaluation: nothing is lost but time.
            log.critical("bake clock not recorded", service=name, error=str(exc))
            return None
        if state is not None:
            # What the period (restarted, perhaps) has not seen is dropped here, so that
            # what is counted from now on is the period's own.
            view.evidence = within(view.evidence, state.current_version, state.healthy_since)
            if view.shortfall is not None and view.shortfall.version != state.current_version:
                view.shortfall = None
        if baked is not None:
            view.shortfall = None
            for check_name, value in view.last_values.items():
                view.baselines[(check_name, baked)] = Baseline(
                    value, f"last known good {baked}, recorded when it baked"
                )
            log.info("version baked", service=name, version=baked)
            self._emit("version.baked", name, now, {"version": baked})
        return baked

    def bake_requirement(self, service: Service) -> Requirement:
        """The evidence the service's versions need to bake."""
        rules = service.rules
        return requirement(
            ((c.name, c.action) for c in rules.check),
            has_alerts=bool(rules.alert),
            alertmanager=self.loaded.config.alertmanager.url is not None,
        )

    def bake_status(
        self,
        service: Service,
        version: str | None,
        baked_at: float | None,
        bad_reason: str | None,
        healthy_since: float | None,
        now: float,
    ) -> BakeStatus:
        """Why the current version has (not) baked, for ``rollbackd status``; the version's
        record and bake clock come from the store."""
        view = self._views.get(service.name) or _ServiceView()
        evidence = within(view.evidence, version, healthy_since)
        return bake_status(
            version=version,
            baked_at=baked_at,
            bad_reason=bad_reason,
            healthy_since=healthy_since,
            now=now,
            bake_time=service.rules.service.bake_time,
            blockers=view.bake_blockers,
            assessment=assess(evidence, self.bake_requirement(service)),
            shortfall=view.shortfall,
        )

    def _count_evidence(self, service: Service, evaluation: CheckEvaluation) -> None:
        """Count the evaluation for the current version's bake."""
        try:
            current = self.versions.current(service.name)
        except StoreError:
            return  # uncounted is no health: the bake only lacks one evaluation
        scope = service.rules.version_scope if evaluation.check.groups_by_version else None
        verdict, reason = evaluation_verdict(evaluation.measurements, scope, current)
        view = self._views.setdefault(service.name, _ServiceView())
        view.evidence = record_check(
            view.evidence, current, evaluation.check.name, verdict, reason, evaluation.at
        )

    async def run_batch(self, batch: Batch, now: float) -> list[CheckEvaluation]:
        """One query per role for every member of the batch, then each member judged, stepped
        and reported as if it had queried alone (``run_check``)."""
        if batch.id in self._rejected:
            return await self._run_alone(batch, now)
        started = time.monotonic()
        answers: Mapping[str, QueryResult] | PrometheusError
        try:
            results = await asyncio.gather(
                *(self._query(q, now, batch.interval.total_seconds()) for q in batch.queries)
            )
        except QueryError as exc:
            # Rejected as a batch (a proxy's length limit, say): from now on each check runs
            # alone and says for itself whether its own query is good.
            log.warning(
                "batched query rejected: its checks run alone from now on",
                batch=batch.id,
                checks=len(batch.members),
                error=str(exc),
            )
            self._rejected.add(batch.id)
            return await self._run_alone(batch, now)
        except PrometheusError as exc:
            answers = exc
        else:
            answers = {q.role: r for q, r in zip(batch.queries, results, strict=True)}
        split = None if isinstance(answers, PrometheusError) else batch.split(answers)
        return list(
            await asyncio.gather(
                *(
                    self.run_check(
                        m.service,
                        m.check,
                        now,
                        answers=answers if split is None else split[m.key],
                        started=started,
                    )
                    for m in batch.members
                )
            )
        )

    async def _run_alone(self, batch: Batch, now: float) -> list[CheckEvaluation]:
        return list(
            await asyncio.gather(*(self.run_check(m.service, m.check, now) for m in batch.members))
        )

    async def run_check(
        self,
        service: Service,
        check: CheckSpec,
        now: float,
        *,
        answers: Answers | None = None,
        started: float | None = None,
    ) -> CheckEvaluation:
        """Evaluate one check, step its state, emit what changed. ``answers``: what its
        batch fetched for it, instead of querying."""
        started = time.monotonic() if started is None else started
        key = (service.name, check.name)
        measurements = await self.evaluate(service, check, now, answers=answers)
        duration = time.monotonic() - started
        errored = [m for m in measurements if m.verdict is Verdict.ERROR and not m.labels]
        outcome: Errored | Judged = (
            Errored(errored[0].reason)
            if errored
            else Judged({m.labels: m.verdict for m in measurements})
        )
        policy = check.policy()
        state, changes = step_check(self.check_state(*key), outcome, _dt(now), policy)
        self.states[key] = state
        # Before the changes are acted on: a rollback must never have been started on a
        # firing that a restart would forget.
        self._save_state(key, state, policy, now)
        evaluation = CheckEvaluation(
            service.name, check, now, measurements, state, changes, duration
        )
        self._record(service, evaluation)
        await self._handle_changes(service, check, evaluation)
        await self._hand_over_restored(service, check, evaluation)
        self._count_evidence(service, evaluation)
        return evaluation

    async def evaluate(
        self,
        service: Service,
        check: CheckSpec,
        now: float,
        *,
        answers: Answers | None = None,
        window_cap: timedelta | None = None,
    ) -> list[Measurement]:
        """Query and judge, without touching any state: what ``rollbackd eval`` prints.
        ``answers``: the check's answers (or the failure) its batch already fetched.
        ``window_cap``: no range window longer than this (verification, which queries alone:
        batches are built with the configured windows)."""
        rules = service.rules
        queries = check.queries(rules.version_scope, window_cap=window_cap)
        if isinstance(answers, PrometheusError):
            return [error_measurement(check, queries[0].expr, str(answers))]
        if answers is None:
            deadline = check.interval.total_seconds()
            try:
                fetched = await asyncio.gather(
                    *(self._query(query, now, deadline) for query in queries)
                )
            except PrometheusError as exc:
                return [error_measurement(check, queries[0].expr, str(exc))]
            results = {q.role: answer for q, answer in zip(queries, fetched, strict=True)}
        else:
            results = dict(answers)
        scope = await self._scope(service, check, now)
        measurements = judge(check, results, scope)
        current = self.versions.current(service.name)
        for m in measurements:
            if (
                # A shortened window's value is no baseline for the configured one.
                window_cap is None
                and m.value is not None
                and not math.isnan(m.value)
                and (not rules.version_scope or dict(m.labels).get(rules.version_scope) == current)
            ):
                self._views.setdefault(service.name, _ServiceView()).last_values[check.name] = (
                    m.value
                )
        return measurements

    async def _query(self, query: Query, now: float, deadline: float) -> QueryResult:
        try:
            result = await self.client.aquery(query.expr, at=now, deadline=deadline)
        except PrometheusError as exc:
            self.metrics.queries.labels(_outcome(exc)).inc()
            self.metrics.prometheus_up.set(0 if not isinstance(exc, QueryError) else 1)
            raise
        self.metrics.queries.labels("ok").inc()
        self.metrics.prometheus_up.set(1)
        return result

    async def _scope(self, service: Service, check: CheckSpec, now: float) -> Scope:
        rules = service.rules
        view = self._views.setdefault(service.name, _ServiceView())
        current = self.versions.current(service.name)
        stable = None
        if view.canary:
            # The stable track is the version the canary replaces: the one before it in the
            # history, or else the one other version still running beside it.
            changes = self.store.version_changes(service.name, 1)
            stable = changes[0].from_version if changes else None
            others = [v for v in view.running if v != current]
            if stable is None and len(others) == 1:
                stable = others[0]
        baseline = None
        if check.max_increase is not None and not (view.canary and rules.version_scope):
            baseline = await self._lkg_baseline(service, check, current)
        return Scope(
            version_label=rules.version_scope,
            current_version=current,
            stable_version=stable,
            baseline=baseline,
        )

    async def _lkg_baseline(
        self, service: Service, check: CheckSpec, current: str | None
    ) -> Baseline | None:
        """The last known good version's value: recorded when it baked, or else measured
        once, just before the current version went live."""
        lkg = self.versions.last_known_good(service.name)
        since = self.versions.current_since(service.name)
        if lkg is None or since is None:
            return None
        view = self._views.setdefault(service.name, _ServiceView())
        known = view.baselines.get((check.name, lkg))
        if known is not None:
            return known
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
        view.baselines[(check.name, lkg)] = baseline
        return baseline

    # -- what happened --------------------------------------------------------------

    def _record(self, service: Service, evaluation: CheckEvaluation) -> None:
        m = self.metrics
        check = evaluation.check.name
        m.verdict_counted(service.name, check, evaluation.verdict)
        m.evaluation_duration.labels(getattr(evaluation.check, "type", "")).observe(
            evaluation.duration
        )
        m.last_evaluation_duration.labels(service.name, check).set(evaluation.duration)
        m.check_state.labels(service.name, check).state(evaluation.state.phase.value)
        m.check_blind.labels(service.name, check).set(1 if evaluation.state.blind else 0)

    def firing(self, service: str) -> list[Firing]:
        """Every series of the service's checks that fires now, with its latest
        measurement: what the pipeline decides again while a refusal may lapse. A series
        restored firing after a restart counts once it has been evaluated again."""
        loaded = self.loaded.services.get(service)
        if loaded is None:
            return []
        found: list[tuple[str, Action, SeriesState, Measurement]] = []
        for check in loaded.rules.check:
            state = self.states.get((service, check.name))
            if state is None or not state.firing:
                continue
            measured = self._measured.get((service, check.name), {})
            for labels, series in state.series.items():
                measurement = measured.get(labels)
                if series.phase is Phase.FIRING and measurement is not None:
                    found.append((check.name, check.action, series, measurement))
        if not found:
            return []  # the common case, every few seconds for every service: no store read
        current = self.versions.current(service)
        firings = []
        for name, action, series, measurement in found:
            began = series.pending_since or series.firing_since
            firings.append(
                Firing(
                    service=service,
                    check=name,
                    action=action,
                    measurement=measurement,
                    version=current,
                    breach_started=began.timestamp() if began else measurement_at(series),
                    at=measurement_at(series),
                )
            )
        return firings

    async def _handle_changes(
        self, service: Service, check: CheckSpec, evaluation: CheckEvaluation
    ) -> None:
        by_labels = {m.labels: m for m in evaluation.measurements}
        # The latest measurement of every series, kept while it may be needed: a firing
        # series keeps the one that showed its breach when a gap follows.
        measured = self._measured.setdefault((service.name, check.name), {})
        for labels in list(measured):
            if labels not in evaluation.state.series:
                del measured[labels]
        for labels, m in by_labels.items():
            judged = m.verdict not in (Verdict.NO_DATA, Verdict.ERROR)
            if judged or (labels not in measured and labels in evaluation.state.series):
                measured[labels] = m
        now = evaluation.at
        fired_now: set[Labels] = set()
        for change in evaluation.changes:
            if change.transition is Transition.BLIND:
                self._set_blind((service.name, check.name), True, evaluation)
            elif change.transition is Transition.SIGHTED:
                self._set_blind((service.name, check.name), False, evaluation)
            elif change.transition is Transition.FIRED and change.labels is not None:
                measurement = by_labels.get(change.labels) or evaluation.measurements[0]
                started = change.state.pending_since if change.state else None
                firing = Firing(
                    service=service.name,
                    check=check.name,
                    action=check.action,
                    measurement=measurement,
                    version=self.versions.current(service.name),
                    breach_started=started.timestamp() if started else now,
                    at=now,
                )
                log.warning(
                    "check fired",
                    service=service.name,
                    check=check.name,
                    series=measurement.series,
                    reason=measurement.reason,
                    action=check.action.value,
                )
                fired_now.add(change.labels)
                try:
                    self._emit("check.breach", service.name, now, _measurement_data(firing))
                except StoreError as exc:
                    # Not recorded is no reason not to act: the pipeline decides, and
                    # refuses what it cannot record itself.
                    log.critical("check.breach not recorded", service=service.name, error=str(exc))
                await self._hand_over((service.name, check.name, change.labels), firing)
            elif change.transition is Transition.RECOVERED and change.labels is not None:
                recovered = by_labels.get(change.labels)
                log.info("check recovered", service=service.name, check=check.name)
                self._emit(
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
        await self._hand_over_again(service, check, evaluation, fired_now)

    async def _hand_over(self, key: tuple[str, str, Labels], firing: Firing) -> None:
        if self.on_fire is None:
            return
        if await self.on_fire(firing):
            self._not_handed_over.pop(key, None)
            return
        if key not in self._not_handed_over:
            log.critical(
                "firing not handed over: the state store failed; it is handed over again "
                "on every evaluation while the check fires",
                service=firing.service,
                check=firing.check,
            )
        self._not_handed_over[key] = firing

    async def _hand_over_again(
        self, service: Service, check: CheckSpec, evaluation: CheckEvaluation, skip: set[Labels]
    ) -> None:
        """Firings of this check not yet handed over, again, while their series fires."""
        for key, firing in list(self._not_handed_over.items()):
            if key[:2] != (service.name, check.name) or key[2] in skip:
                continue
            series = evaluation.state.series.get(key[2])
            if series is None or series.phase is not Phase.FIRING:
                del self._not_handed_over[key]  # over: nothing left to act on
                continue
            await self._hand_over(key, replace(firing, at=evaluation.at))

    def _set_blind(self, key: tuple[str, str], blind: bool, evaluation: CheckEvaluation) -> None:
        was_any = bool(self._blind)
        if blind:
            self._blind.add(key)
        else:
            self._blind.discard(key)
        reason = evaluation.measurements[0].reason if evaluation.measurements else ""
        log.warning("check blind" if blind else "check sees again", service=key[0], check=key[1])
        if blind and not was_any:
            self._emit(
                "prometheus.unreachable",
                key[0],
                evaluation.at,
                {"check": key[1], "reason": reason},
            )
        elif not blind and was_any and not self._blind:
            self._emit("prometheus.recovered", key[0], evaluation.at, {"check": key[1]})

    @property
    def blind_checks(self) -> set[tuple[str, str]]:
        return set(self._blind)

    def _emit(self, kind: str, service: str, at: float, data: Mapping[str, Any]) -> None:
        self.bus.publish(kind, at, service, data=dict(data))


def _measurement_data(firing: Firing) -> dict[str, Any]:
    m = firing.measurement
    return {
        "check": firing.check,
        "action": firing.action.value,
        "version": firing.version,
        "series": dict(m.labels),
        "value": m.value,
        "threshold": str(m.threshold) if m.threshold else None,
        "baseline": {"value": m.baseline.value, "source": m.baseline.source}
        if m.baseline
        else None,
        "reason": m.reason,
        "query": m.query,
        "breach_started": firing.breach_started,
    }


def measurement_at(series: SeriesState) -> float:
    """When a series was last evaluated (unix seconds)."""
    at = series.last_evaluated or series.firing_since or series.pending_since
    return at.timestamp() if at else 0.0


def _configured(loaded: LoadedConfig) -> set[tuple[str, str]]:
    return {(s.name, c.name) for s in loaded.services.values() for c in s.rules.check}


def _outcome(exc: PrometheusError) -> str:
    if isinstance(exc, QueryError):
        return "bad_query"
    reason = getattr(exc, "reason", "unavailable")
    return str(reason)


__all__ = ["CheckEvaluation", "Engine", "Firing"]
