"""The evaluation engine: one tick of one check, or of everything, callable from a test.

For each check it runs the queries, judges the answers (``checks/judge.py``), steps the
state machine (``core/check_state.py``), and turns transitions into events. For each
service it reads the running version and whether a canary is in progress
(``version_watch.py``), and bakes healthy versions into the last known good
(``baking.py``). Check states are kept in the store by ``check_state_keeper.py``, baselines
by ``baselines.py``.

It never rolls anything back, nor knows what does: an evaluation returns the firings it
found (``CheckEvaluation.fired``), and the runtime layer (``runner.py``) hands them to the
rollback pipeline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from rollbackd.checks.base import CheckSpec, Query, Span
from rollbackd.checks.batching import Batch, Plan, plan
from rollbackd.checks.judge import Measurement, Scope, error_measurement, judge
from rollbackd.config.loader import LoadedConfig, Service
from rollbackd.core.check_state import CheckState, Errored, Judged, Phase, Policy, step_check
from rollbackd.core.samples import QueryResult, Verdict
from rollbackd.logs import get_logger
from rollbackd.prometheus import PrometheusClient, PrometheusError, QueryError
from rollbackd.runtime.bake_evidence import BakeStatus, Requirement
from rollbackd.runtime.baking import Baking
from rollbackd.runtime.baselines import Baselines
from rollbackd.runtime.bus import EventBus
from rollbackd.runtime.check_state_keeper import CheckStateKeeper, Key, configured
from rollbackd.runtime.firings import CheckEvaluation, Firing
from rollbackd.runtime.metrics import Metrics
from rollbackd.runtime.transitions import Transitions
from rollbackd.runtime.version_watch import VersionWatch, query_outcome
from rollbackd.runtime.versions import VersionObservation, VersionTracker
from rollbackd.store.interfaces import StateStore

log = get_logger("rollbackd.engine")

QUERY_BATCHING = True
"""Whether engines batch checks of one shape into one query per interval (``batching.py``)
unless told otherwise; the benchmark switches it to compare."""

Answers = Mapping[str, QueryResult] | PrometheusError
"""A check's query answers by role, fetched by its batch, or why the batch's query failed."""


def _dt(at: float) -> datetime:
    return datetime.fromtimestamp(at, tz=UTC)


class Engine:
    def __init__(
        self,
        loaded: LoadedConfig,
        client: PrometheusClient,
        store: StateStore,
        *,
        metrics: Metrics | None = None,
        bus: EventBus | None = None,
        query_batching: bool | None = None,
    ) -> None:
        self.loaded = loaded
        self.bus = bus or EventBus(store)
        self.store = store
        self.metrics = metrics or Metrics()
        self.versions = VersionTracker(store)
        self.watch = VersionWatch(client, store, self.versions, self.metrics, self.bus)
        self.baselines = Baselines(client, store, self.versions)
        self.baking = Baking(store, self.versions, self.bus, self.baselines)
        self.keeper = CheckStateKeeper(store)
        self._client = client
        self.states: dict[Key, CheckState] = self.keeper.restore(loaded)
        self._evidence: dict[Key, str] = {}
        """A sequential check's last evaluation in words, for ``status``."""
        self.transitions = Transitions(self.bus, self.versions, self.keeper)
        self.transitions.blind = {key for key, state in self.states.items() if state.blind}
        self.query_batching = QUERY_BATCHING if query_batching is None else query_batching
        self._plan: Plan | None = None
        self._rejected: set[str] = set()
        """Batches whose query Prometheus (or a proxy) refused: their checks run alone."""

    @property
    def client(self) -> PrometheusClient:
        return self._client

    @client.setter
    def client(self, client: PrometheusClient) -> None:
        """A reload that changed ``[prometheus]``: every reader queries the new one."""
        self._client = client
        self.watch.client = client
        self.baselines.client = client

    # -- configuration ------------------------------------------------------------

    def replace_config(self, loaded: LoadedConfig) -> None:
        """Take a reloaded config. Every check that still exists by (service, name) keeps
        its state, even if its definition changed: as Prometheus keeps an alert's state
        across a reload by rule name, a breach under way must neither be forgotten nor,
        restarted, dated after a release it predates. Removed checks are forgotten, here
        and in the store."""
        self.loaded = loaded
        wanted = configured(loaded)
        self.states = {key: state for key, state in self.states.items() if key in wanted}
        self._evidence = {key: words for key, words in self._evidence.items() if key in wanted}
        self.transitions.blind &= wanted
        self.keeper.keep_only(wanted)
        self._plan = None

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
        return self.watch.canary_active(service)

    def take_over(self, services: Collection[str]) -> None:
        """Services this daemon just took from another: judge on from the check states
        and the version their previous holder recorded, not from what this daemon
        remembered of them (from its start, or from when it held them before)."""
        for name in services:
            self.versions.forget(name)
        restored = self.keeper.restore_services(self.loaded, services)
        for key in [k for k in self.states if k[0] in services]:
            del self.states[key]
            self.transitions.blind.discard(key)
        self.states.update(restored)
        self.transitions.blind.update(k for k, state in restored.items() if state.blind)

    def check_state(self, service: str, check: str) -> CheckState:
        return self.states.get((service, check)) or CheckState(series={})

    @property
    def blind_checks(self) -> set[Key]:
        return set(self.transitions.blind)

    def firing(self, service: str) -> list[Firing]:
        """Every series of the service's checks that fires now, with its latest
        measurement: what the pipeline decides again while a refusal may lapse. A series
        restored firing after a restart counts once it has been evaluated again."""
        loaded = self.loaded.services.get(service)
        return [] if loaded is None else self.transitions.firing(loaded, self.states)

    # -- one tick -----------------------------------------------------------------

    async def tick(self, now: float | None = None) -> list[CheckEvaluation]:
        """Every service's version, then every check, then baking, once; the firings are
        in the evaluations, not handed over (``Runner.tick`` hands them over). Tests and
        ``eval`` call this; the daemon schedules the same steps per service, batch and
        check."""
        at = time.time() if now is None else now
        await self.observe_all(at)
        evaluations = await self.run_all(at)
        await self.bake_all(at)
        return evaluations

    async def observe_all(self, now: float) -> None:
        for service in list(self.loaded.services.values()):
            await self.observe_service(service, now)

    async def run_all(self, now: float) -> list[CheckEvaluation]:
        """Every check once, batched as planned, in the order of the config (as a test or
        a table reads them)."""
        current = self.plan
        batched, alone = await asyncio.gather(
            asyncio.gather(*(self.run_batch(batch, now) for batch in current.batches.values())),
            asyncio.gather(*(self.run_check(s, check, now) for s, check in current.singles)),
        )
        done = {(e.service, e.check.name): e for e in [*alone, *(e for b in batched for e in b)]}
        return [
            done[(service.name, check.name)]
            for service in self.loaded.services.values()
            for check in service.rules.check
            if (service.name, check.name) in done
        ]

    async def bake_all(self, now: float) -> None:
        for service in list(self.loaded.services.values()):
            await self.bake(service, now)

    # -- versions -------------------------------------------------------------------

    async def observe_service(self, service: Service, now: float) -> None:
        """Read the running version and whether a canary is in progress."""
        seen = await self.watch.observe_version(service, now)
        if seen is not None and seen.changed and seen.current is not None:
            # Before anything else runs: what belongs to the version replaced must not be
            # seen beside the new one (a firing old series would stand for the new release).
            self.baselines.version_changed(service.name)
            await self._forget_other_versions(service, seen.current)
            await self.watch.announce_discovered(service.name, seen, now)
        await self.watch.observe_canary(service, now)

    async def record_release(
        self, service: str, version: str, now: float, meta: Mapping[str, str], *, known_good: bool
    ) -> VersionObservation:
        """A release recorded through the API (by CI); ValueError for an invalid version.
        With ``known_good`` the version bakes at once, if it is current and not bad."""
        return await self.watch.record_release(service, version, now, meta, known_good=known_good)

    async def read_running_version(self, service: Service, now: float) -> str | None:
        """The version version_query answers now, recorded nowhere (verification); None
        without version_query, or when it could not tell."""
        return await self.watch.read_running(service, now)

    async def _forget_other_versions(self, service: Service, current: str) -> None:
        """Version-scoped checks judge only the running version's series. The series of the
        version just replaced vanish from judging; without this a firing one would stay
        firing forever (no data never recovers a series) and block baking. Checks that are not
        version-scoped keep their state: a breach that started before a release must not
        look like one the release caused."""
        label = service.rules.version_scope
        if label is None:
            return
        forgotten: list[tuple[Key, Policy]] = []
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
            forgotten.append((key, check.policy()))
        # Saved too, once every state is replaced: restored after a restart, the old
        # version's series would be pending or firing for good, as the version is then no
        # change to react to.
        for key, policy in forgotten:
            await self.keeper.save(key, self.states[key], policy, time.time())

    # -- baking -----------------------------------------------------------------------

    async def bake(self, service: Service, now: float) -> str | None:
        """Advance the current version's bake (``baking.py``); the version when it has
        just baked, else None."""
        firing = [
            c.name
            for c in service.rules.check
            if self.check_state(service.name, c.name).phase is Phase.FIRING
        ]
        return await self.baking.bake(
            self.loaded,
            service,
            now,
            firing_checks=firing,
            version_read=self.watch.version_read(service.name),
        )

    def bake_requirement(self, service: Service) -> Requirement:
        """The evidence the service's versions need to bake."""
        return self.baking.requirement(self.loaded, service)

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
        return self.baking.status(
            self.loaded, service, version, baked_at, bad_reason, healthy_since, now
        )

    # -- checks -----------------------------------------------------------------------

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
        """Evaluate one check, step its state, emit what changed; the firings are in the
        evaluation. ``answers``: what its batch fetched for it, instead of querying."""
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
        if check.counts_since_release and measurements:
            self._evidence[key] = measurements[0].reason
        # Before the changes are acted on: a rollback must never have been started on a
        # firing that a restart would forget.
        await self.keeper.save(key, state, policy, now)
        evaluation = CheckEvaluation(
            service.name, check, now, measurements, state, changes, duration
        )
        self._record(service, evaluation)
        fired = await self.transitions.report(service, check, evaluation)
        self.baking.count(
            service, check.name, measurements, now, groups_by_version=check.groups_by_version
        )
        return replace(evaluation, fired=fired)

    async def evaluate(
        self,
        service: Service,
        check: CheckSpec,
        now: float,
        *,
        answers: Answers | None = None,
        window_cap: timedelta | None = None,
        version: str | None = None,
        since: float | None = None,
    ) -> list[Measurement]:
        """Query and judge, without touching any state: what ``rollbackd eval`` prints.
        ``answers``: the check's answers (or the failure) its batch already fetched.
        ``window_cap``: no range window longer than this (verification, which queries alone:
        batches are built with the configured windows). ``version``: judged as the running
        version instead of the one tracked (verification reads it afresh). ``since``: when
        that version went live, for checks counting since the release, instead of the time
        tracked (``rollbackd eval``, which tracks nothing)."""
        rules = service.rules
        current = self.versions.current(service.name) if version is None else version
        scope = await self._scope(service, check, now, current)
        if check.counts_since_release:
            # Counted since the version went live: the queries are this evaluation's own.
            span = (
                Span.since_release(since, now)
                if since is not None
                else self.baselines.span(service.name, current, now, window_cap)
            )
            scope = replace(scope, span=span)
            if span is None:
                return judge(check, {}, scope)
            queries = check.queries_since(span, rules.version_scope)
        else:
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
        measurements = judge(check, results, scope)
        if window_cap is None:  # a shortened window's value is no baseline for the configured one
            self.baselines.note(service, check, measurements, current)
        return measurements

    async def _scope(
        self, service: Service, check: CheckSpec, now: float, current: str | None = None
    ) -> Scope:
        """What the check is judged against; ``current``: the running version (default:
        the one tracked)."""
        name = service.name
        return await self.baselines.scope(
            service,
            check,
            self.versions.current(name) if current is None else current,
            canary=self.watch.canary_active(name),
            running=self.watch.running(name),
        )

    async def _query(self, query: Query, now: float, deadline: float) -> QueryResult:
        try:
            result = await self.client.aquery(query.expr, at=now, deadline=deadline)
        except PrometheusError as exc:
            self.metrics.queries.labels(query_outcome(exc)).inc()
            self.metrics.prometheus_up.set(0 if not isinstance(exc, QueryError) else 1)
            raise
        self.metrics.queries.labels("ok").inc()
        self.metrics.prometheus_up.set(1)
        return result

    def evidence(self, service: str, check: str) -> str | None:
        """A sequential check's evidence at its last evaluation here, in words."""
        return self._evidence.get((service, check))

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


__all__ = ["CheckEvaluation", "Engine", "Firing"]
