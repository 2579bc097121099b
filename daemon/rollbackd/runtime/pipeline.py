"""The one decision pipeline every rollback goes through: a firing check, a mapped
Alertmanager alert, or a person.

submit(trigger)
  -> idempotency: a rollback is keyed by (service, from_version); a second trigger for a
     release whose rollback is pending, running or done is recorded against it, never run
  -> guards (guards.py), every verdict recorded
  -> refuse | dry-run | wait for approval | execute
execute
  -> canary in progress? its abort executors first, then verification
  -> else, or when that fails: the [[rollback]] chain, each executor in turn until one
     succeeds, then verification
  -> succeeded, or failed: verify.failed / rollback.failed freeze the service and page

Every step is written to the store before it runs and after it ends, so a crash leaves a
complete record and ``recover()`` never re-runs an executor blindly.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from rollbackd.checks.base import Action
from rollbackd.config.loader import Service
from rollbackd.core.alert_text import alert_reason
from rollbackd.core.guards import Decision, GuardFacts, Outcome, decide, lapses
from rollbackd.core.model import (
    JSONValue,
    Mode,
    Rollback,
    RollbackDraft,
    RollbackState,
    StoredAlert,
)
from rollbackd.executors.base import Executor, ExecutorSpec, RollbackContext, StepResult
from rollbackd.runtime.bus import EventBus
from rollbackd.runtime.engine import Engine, Firing
from rollbackd.runtime.logs import get_logger
from rollbackd.runtime.verify import Verifier, VerifyResult
from rollbackd.store.errors import ConflictError, StoreError
from rollbackd.store.sqlite import Store

log = get_logger("rollbackd.runtime.pipeline")

REFUSAL_QUIET = 300.0
"""Seconds during which the same refusal (service, release, failed guards) is not announced
again. An alert storm against a paused service is one ``rollback.refused`` event and one
warning, not 10,000 of each offered to every notifier; each alert's own record still says
it was refused."""
REFUSAL_LOG_EVERY = 1000
"""A repeated refusal is logged (at info) on every this many repeats."""
SETTLED_LIMIT = 10_000
"""Settled standing triggers remembered per service."""


class _Refusals:
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


_JOINABLE = (
    RollbackState.PENDING,
    RollbackState.RUNNING,
    RollbackState.VERIFYING,
    RollbackState.SUCCEEDED,
    RollbackState.FAILED,
    RollbackState.INTERRUPTED,
    RollbackState.DRY_RUN,
    RollbackState.REJECTED,
)
"""An automatic trigger for a release with a rollback in one of these states joins it: it
never executes a second time, and a rejected release is not asked about again. A person may
start a new one after failed, interrupted, rejected or expired; an expired approval is asked
again on the next automatic trigger."""


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

    @classmethod
    def from_firing(cls, firing: Firing) -> Trigger:
        m = firing.measurement
        return cls(
            service=firing.service,
            source="check",
            reason=f"check {firing.check}: {m.reason}",
            at=firing.at,
            breach_started=firing.breach_started,
            key=("check", firing.check, m.labels),
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
                "version": firing.version,
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


@dataclass(frozen=True)
class Submission:
    """What the pipeline did with a trigger."""

    outcome: str
    """``executing``, ``pending_approval``, ``dry_run``, ``refused``, ``joined``, ``ignored``."""
    rollback: Rollback | None
    decision: Decision | None
    reason: str


class UnknownService(LookupError):
    pass


class Pipeline:
    def __init__(
        self,
        engine: Engine,
        *,
        bus: EventBus | None = None,
        verifier: Verifier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.store: Store = engine.store
        self.bus = bus or engine.bus
        self.verifier = verifier or Verifier(engine, clock=clock)
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusals = _Refusals()
        self._settled: dict[str, dict[tuple[int, tuple[object, ...]], None]] = {}
        """Per service, (release, trigger key) refused for good, by a guard that cannot
        lapse. Memory only: after a restart each standing trigger is decided once more,
        silently."""

    # -- entry points ---------------------------------------------------------------

    async def on_fire(self, firing: Firing) -> bool:
        """The engine's hook: a check fired. False when the decision could not be recorded
        (the state store failed): the engine hands the firing over again later."""
        if firing.action is Action.NOTIFY:
            return True  # the engine published check.breach; people are told, no rollback
        submission = await self.submit(Trigger.from_firing(firing))
        return submission.outcome != "unrecorded"

    async def submit(self, trigger: Trigger) -> Submission:
        service = self._service(trigger.service)
        async with self._lock(trigger.service):
            try:
                return self._decide(service, trigger)
            except StoreError as exc:
                # Never act on what cannot be recorded: without the record, idempotency,
                # cooldown and the audit trail are gone.
                log.critical(
                    "state store failed: NOT rolling back, the decision cannot be recorded",
                    service=trigger.service,
                    trigger=trigger.reason,
                    error=str(exc),
                )
                return Submission("unrecorded", None, None, f"state store failed: {exc}")

    async def approve(self, rollback_id: int, who: str) -> Rollback:
        """Run a pending rollback a person approved — decided against the present: its
        release must still be live (else it is superseded: expired, never run) and the
        guards must still pass as for a person's request (another rollback in flight, say,
        refuses it for now: it stays pending)."""
        rollback = self._require(rollback_id)
        async with self._lock(rollback.service):
            now = self.clock()
            current = self._require(rollback_id)
            if current.state is RollbackState.PENDING and _expired(current, now):
                # The sweep runs every few seconds; an approval past the deadline in
                # between must not run what nobody decided on in time.
                expired = self._expire(current, now)
                state = expired.state if expired is not None else "decided meanwhile"
                raise ConflictError(f"rollback {rollback_id} is {state}, not pending")
            if current.state is RollbackState.PENDING:
                replaced = self._replaced(current)
                if replaced is not None:
                    self._expire(current, now, superseded=replaced)
                    raise ConflictError(
                        f"rollback {rollback_id} is superseded, not run: {replaced}"
                    )
                service = self._service(current.service)
                decision = decide(
                    self._facts(
                        service,
                        Trigger(
                            service=current.service,
                            source="approval",
                            reason=current.reason,
                            at=now,
                            automatic=False,
                            to_version=current.to_version,
                            requested_by=who,
                        ),
                        current.from_version,
                        deciding=current.id,
                    )
                )
                if decision.outcome is Outcome.REFUSE:
                    raise ConflictError(
                        f"rollback {rollback_id} stays pending, not run now: {decision.reason}"
                    )
            running = self.store.set_rollback_state(
                rollback_id,
                RollbackState.RUNNING,
                now,
                expected=[RollbackState.PENDING],
                decided_by=who,
            )
        self._spawn(self._execute(running))
        return running

    def _replaced(self, rollback: Rollback) -> str | None:
        """Why a pending rollback's release is no longer live, or None while it is."""
        service = rollback.service
        current = self.engine.versions.current(service)
        if rollback.from_version is None and current is None:
            return None  # an unversioned service: nothing can replace its episode
        if current != rollback.from_version:
            return f"{current} replaced {rollback.from_version} since it was decided"
        if rollback.release_id and self._release_id(service, current) != rollback.release_id:
            return f"{current} was deployed again since it was decided (another release)"
        return None

    async def reject(self, rollback_id: int, who: str, reason: str = "") -> Rollback:
        rollback = self._require(rollback_id)
        async with self._lock(rollback.service):
            rejected = self.store.set_rollback_state(
                rollback_id,
                RollbackState.REJECTED,
                self.clock(),
                expected=[RollbackState.PENDING],
                decided_by=who,
                outcome=f"rejected by {who}" + (f": {reason}" if reason else ""),
            )
        self._publish("rollback.rejected", rejected, {"by": who, "reason": reason})
        return rejected

    async def expire_pending(self) -> list[Rollback]:
        """Pending approvals past their expiry, or whose release was replaced meanwhile
        (superseded), become expired; nothing runs."""
        now = self.clock()
        expired = []
        for rollback in self.store.rollbacks(states=[RollbackState.PENDING], limit=1000):
            replaced = None if _expired(rollback, now) else self._replaced(rollback)
            if _expired(rollback, now) or replaced is not None:
                async with self._lock(rollback.service):
                    done = self._expire(rollback, now, superseded=replaced)
                if done is not None:
                    expired.append(done)
        return expired

    async def housekeeping(self) -> None:
        """The periodic sweep: approvals that expired or were superseded, then every
        standing trigger whose refusal may have lapsed."""
        await self.expire_pending()
        await self.reconsider()

    def _expire(
        self, rollback: Rollback, now: float, *, superseded: str | None = None
    ) -> Rollback | None:
        """Mark one pending rollback expired; None if it was decided meanwhile."""
        try:
            done = self.store.set_rollback_state(
                rollback.id,
                RollbackState.EXPIRED,
                now,
                expected=[RollbackState.PENDING],
                outcome="no decision before the approval timeout"
                if superseded is None
                else f"superseded: {superseded}",
            )
        except ConflictError:
            return None
        extra: dict[str, JSONValue] = {}
        if superseded is not None:
            extra = {"superseded": True, "why": superseded}
            log.warning("pending rollback superseded", rollback=rollback.id, why=superseded)
        self._publish("rollback.expired", done, extra)
        return done

    async def recover(self) -> list[Rollback]:
        """At start-up: rollbacks found running or verifying were interrupted by a crash or
        a stop. None is ever re-executed. Each is verified in the background: if the service
        comes to read the target version within ``version_timeout`` and its checks hold, the
        rollback took effect and succeeded; otherwise it is marked interrupted, the service
        is frozen and people are told, since a person must decide."""
        handled = []
        for rollback in self.store.rollbacks(
            states=[RollbackState.RUNNING, RollbackState.VERIFYING], limit=1000
        ):
            now = self.clock()
            for step in self.store.steps(rollback.id):
                if step.finished_at is None:
                    self.store.finish_step(
                        step.id, now, False, "interrupted: the daemon stopped while this ran"
                    )
            service = self.engine.loaded.services.get(rollback.service)
            if (
                service is None
                or not rollback.to_version
                or not service.rules.service.version_query
            ):
                handled.append(self._interrupted(rollback, "whether it took effect cannot be told"))
                continue
            verifying = self.store.set_rollback_state(
                rollback.id,
                RollbackState.VERIFYING,
                now,
                outcome="found in flight after a restart: verifying, never re-run",
            )
            log.warning("rollback found in flight at start: verifying", rollback=rollback.id)
            self._spawn(self._recover_one(verifying, service))
            handled.append(verifying)
        return handled

    async def _recover_one(self, rollback: Rollback, service: Service) -> None:
        result = await self._verify(rollback, service)
        if result.ok:
            self._finish(rollback, RollbackState.SUCCEEDED, f"after a restart: {result.reason}")
        elif not result.reached_version:
            self._interrupted(rollback, result.reason)
        else:
            await self._verify_failed(rollback, result)

    def _interrupted(self, rollback: Rollback, why: str) -> Rollback:
        now = self.clock()
        reason = (
            f"interrupted: the daemon stopped while it ran; {why}; not re-run, a person must decide"
        )
        interrupted = self.store.set_rollback_state(
            rollback.id, RollbackState.INTERRUPTED, now, outcome=reason
        )
        self._publish("rollback.failed", interrupted, {"interrupted": True, "reason": reason})
        self._freeze(rollback.service, f"rollback {rollback.id} was interrupted", now)
        return interrupted

    async def interrupt_all(self, why: str) -> None:
        """Stop every execution in flight (their process groups are killed) on a stop.
        Their rollbacks stay running or verifying, with the cut-short steps recorded as
        interrupted: the next start recovers them as after a crash — verified, never
        re-run — since whether the switch took effect is only known then."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for rollback in self.store.rollbacks(
            states=[RollbackState.RUNNING, RollbackState.VERIFYING], limit=1000
        ):
            now = self.clock()
            for step in self.store.steps(rollback.id):
                if step.finished_at is None:
                    self.store.finish_step(step.id, now, False, f"interrupted: {why}")
            self.store.set_rollback_state(
                rollback.id,
                rollback.state,
                now,
                outcome=f"stopped: {why}; verified at the next start, never re-run",
            )
            log.warning(
                "rollback cut short by a stop: verified at the next start", rollback=rollback.id
            )

    async def wait_idle(self) -> None:
        """Await every execution in flight (tests, and a clean stop)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- deciding -------------------------------------------------------------------

    def _decide(self, service: Service, trigger: Trigger, *, standing: bool = False) -> Submission:
        """Decide one trigger. ``standing``: a trigger that still fires, decided again by
        ``reconsider``: it acts only when the decision creates a rollback, and otherwise
        records and announces nothing (it was recorded when it first fired)."""
        now = trigger.at
        name = service.name
        current = self.engine.versions.current(name)
        release = self._release_of(name, current, trigger)
        existing = self.store.latest_rollback(name, current, release)
        if existing is not None and self._joins(existing, trigger):
            if not standing:
                self.store.add_trigger(
                    existing.id, now, trigger.source, self._trigger_json(trigger)
                )
                log.info("trigger joined an existing rollback", rollback=existing.id, service=name)
            return Submission(
                "joined",
                existing,
                None,
                f"{f'release {current}' if current else 'the service'} already has rollback "
                f"{existing.id} ({existing.state.value})",
            )
        facts = self._facts(service, trigger, current)
        decision = decide(facts)
        guards: list[dict[str, JSONValue]] = [dict(g.as_json()) for g in decision.guards]
        if decision.outcome is Outcome.REFUSE:
            if not lapses(decision):
                self._settle(name, release, trigger)  # "never", not "not now"
            if standing:
                if decision.freeze:
                    self._freeze(name, decision.reason, now)
                return Submission("refused", None, decision, decision.reason)
            failed = tuple(g.guard for g in decision.guards if not g.passed)
            repeats = self._refusals.repeat((name, current, release, failed), now)
            if repeats is None:
                self.bus.publish(
                    "rollback.refused",
                    now,
                    name,
                    data={
                        "reason": decision.reason,
                        "guards": guards,
                        "lapses": lapses(decision),
                        "trigger": self._trigger_json(trigger),
                    },
                )
                log.warning("rollback refused", service=name, reason=decision.reason)
            elif repeats % REFUSAL_LOG_EVERY == 0:
                log.info(
                    "rollback refused again", service=name, reason=decision.reason, times=repeats
                )
            if decision.freeze:
                self._freeze(name, decision.reason, now)
            return Submission("refused", None, decision, decision.reason)
        state = {
            Outcome.EXECUTE: RollbackState.RUNNING,
            Outcome.AWAIT_APPROVAL: RollbackState.PENDING,
            Outcome.DRY_RUN: RollbackState.DRY_RUN,
        }[decision.outcome]
        approval = self.engine.loaded.config.daemon.approval_timeout.total_seconds()
        try:
            rollback = self.store.create_rollback(
                RollbackDraft(
                    service=name,
                    from_version=current,
                    release_id=release,
                    to_version=facts.target,
                    state=state,
                    source=trigger.source,
                    automatic=trigger.automatic,
                    reason=trigger.reason,
                    mode=facts.mode.value,
                    trigger=self._trigger_json(trigger),
                    guards=guards,
                    at=now,
                    expires_at=now + approval if state is RollbackState.PENDING else None,
                    outcome="dry-run: would roll back" if state is RollbackState.DRY_RUN else "",
                )
            )
        except ConflictError as exc:
            return Submission(
                "joined", self.store.latest_rollback(name, current, release), decision, str(exc)
            )
        if standing:
            log.info(
                "a trigger that still fires was decided again: its refusal lapsed",
                service=name,
                rollback=rollback.id,
                trigger=trigger.reason,
            )
        if state is RollbackState.DRY_RUN:
            self._publish(
                "rollback.pending",
                rollback,
                {
                    "dry_run": True,
                    "guards": guards,
                    "would": f"roll back {name} {current} -> {facts.target}",
                },
            )
            return Submission("dry_run", rollback, decision, "dry-run: recorded, not executed")
        if state is RollbackState.PENDING:
            self._publish(
                "rollback.pending", rollback, {"guards": guards, "expires_at": rollback.expires_at}
            )
            return Submission("pending_approval", rollback, decision, "waiting for approval")
        self._spawn(self._execute(rollback))
        return Submission("executing", rollback, decision, decision.reason)

    def _joins(self, existing: Rollback, trigger: Trigger) -> bool:
        """Whether a trigger joins the release's latest rollback instead of a new decision.

        An automatic trigger joins whatever the release's rollback became — it never runs a
        second time, and a rejection is not asked about again — except a dry run once the
        mode is no longer dry-run (it ran nothing, so the release is decided for real), and an
        expired approval (asked again). A person starts a new one unless it is live or
        succeeded."""
        if existing.state not in _JOINABLE:
            return False
        if existing.state is RollbackState.DRY_RUN:
            return self.engine.loaded.config.daemon.mode is Mode.DRY_RUN and trigger.automatic
        return trigger.automatic or existing.state.live or existing.state is RollbackState.SUCCEEDED

    def _release_id(self, service: str, current: str | None) -> int:
        """The version change that made ``current`` live: the release a rollback undoes.
        The same version deployed again later is another release."""
        changes = self.store.version_changes(service, 1)
        if changes and current is not None and changes[0].to_version == current:
            return changes[0].id
        return 0

    def _release_of(self, service: str, current: str | None, trigger: Trigger) -> int:
        """What a rollback undoes. With a known version, its release. Without one (no
        version_query, no release recorded), the firing episode: a trigger whose breach
        began before the service's latest rollback ended belongs to that rollback's
        episode; a later breach (or a person) opens a new one, keyed by a negative number
        so it never collides with a release."""
        if current is not None:
            return self._release_id(service, current)
        latest = next(
            (r for r in self.store.rollbacks(service=service, limit=50) if r.from_version is None),
            None,
        )
        if latest is None:
            return 0
        if latest.state.live:
            return latest.release_id
        ended = latest.finished_at if latest.finished_at is not None else latest.updated_at
        if (
            trigger.automatic
            and trigger.breach_started is not None
            and trigger.breach_started < ended
        ):
            return latest.release_id
        return -latest.id

    def _settle(self, service: str, release: int, trigger: Trigger) -> None:
        if trigger.key:
            settled = self._settled.setdefault(service, {})
            if len(settled) >= SETTLED_LIMIT:
                settled.clear()  # bounded; at worst a standing trigger is decided once more
            settled[(release, trigger.key)] = None

    def _is_settled(self, service: str, release: int, trigger: Trigger) -> bool:
        return (release, trigger.key) in self._settled.get(service, {})

    # -- deciding again: "not now" is not "never" ------------------------------------

    async def reconsider(self, now: float | None = None) -> list[Submission]:
        """Decide again every trigger that still fires and was refused only by guards that
        may lapse (cooldown, pause, freeze, a rollback in flight, max_rollbacks), or whose
        release's dry run or approval no longer stands (mode changed, approval expired).
        Runs every few seconds and after a restart, when check states come back firing.
        Silent unless it creates a rollback."""
        at = self.clock() if now is None else now
        done: list[Submission] = []
        for service in list(self.engine.loaded.services.values()):
            triggers = self._standing(service, at)
            if not triggers:
                continue
            async with self._lock(service.name):
                try:
                    submission = self._reconsider_service(service, triggers)
                except StoreError as exc:
                    log.critical(
                        "state store failed: a standing trigger is decided again later",
                        service=service.name,
                        error=str(exc),
                    )
                    continue
            if submission is not None:
                done.append(submission)
        return done

    def _standing(self, service: Service, at: float) -> list[Trigger]:
        """The service's automatic triggers that fire now: its rollback checks' firing
        series, and its mapped alerts still firing."""
        triggers = [
            Trigger.from_firing(replace(firing, at=at))
            for firing in self.engine.firing(service.name)
            if firing.action is Action.ROLLBACK
        ]
        if service.rules.alert:
            triggers.extend(
                Trigger.from_alert(alert, at) for alert in self.store.firing_alerts(service.name)
            )
        return triggers

    def _reconsider_service(self, service: Service, triggers: list[Trigger]) -> Submission | None:
        name = service.name
        current = self.engine.versions.current(name)
        # Per release: whether its latest rollback takes every automatic trigger (what it
        # became still stands), looked up once per pass, not once per trigger.
        joins: dict[int, bool] = {}
        # The latest breach first: the guards that differ between triggers only judge
        # when the breach began, and a later one is the likelier to be this release's.
        triggers.sort(key=lambda t: -math.inf if t.breach_started is None else t.breach_started)
        for trigger in reversed(triggers):
            release = self._release_of(name, current, trigger)
            if self._is_settled(name, release, trigger):
                continue
            if release not in joins:
                existing = self.store.latest_rollback(name, current, release)
                joins[release] = existing is not None and self._joins(existing, trigger)
            if joins[release]:
                continue
            submission = self._decide(service, trigger, standing=True)
            if submission.outcome != "refused":
                return submission
            if submission.decision is not None and lapses(submission.decision):
                return None  # the service refuses for now: the others would be refused alike
        return None

    def _facts(
        self,
        service: Service,
        trigger: Trigger,
        current: str | None,
        *,
        deciding: int | None = None,
    ) -> GuardFacts:
        """``deciding``: the rollback being decided (an approval), not counted in flight."""
        name = service.name
        guards = self.engine.loaded.config.guards
        state = self.store.service_state(name)
        paused = self.store.paused()
        window_start = trigger.at - guards.window.total_seconds()
        executed = [
            r
            for r in self.store.rollbacks(service=name, since=window_start, limit=1000)
            if r.state.executed and r.automatic
        ]
        live = [
            r
            for r in self.store.rollbacks(
                service=name,
                states=[RollbackState.PENDING, RollbackState.RUNNING, RollbackState.VERIFYING],
                limit=2,
            )
            if r.id != deciding
        ]
        latest_auto = next(
            (
                r
                for r in self.store.rollbacks(service=name, limit=50)
                if r.automatic and r.state.executed
            ),
            None,
        )
        target: str | None
        if trigger.to_version:
            target, target_source = trigger.to_version, "--to"
        else:
            target = self.engine.versions.last_known_good(name)
            target_source = (
                "last known good" if target else "no version has baked into a last known good yet"
            )
        chain = list(service.rules.rollback)
        return GuardFacts(
            now=trigger.at,
            automatic=trigger.automatic,
            mode=self.engine.loaded.config.daemon.mode,
            paused=name in paused or "*" in paused,
            frozen=bool(state and state.frozen),
            frozen_reason=state.frozen_reason if state else None,
            current_version=current,
            current_since=self.engine.versions.current_since(name),
            breach_started=trigger.breach_started,
            version_lag=min(
                (c.interval for c in service.rules.check), default=timedelta(seconds=15)
            ),
            rollback_window=service.rules.service.rollback_window,
            cooldown=guards.cooldown,
            last_rollback_at=(latest_auto.started_at or latest_auto.created_at)
            if latest_auto
            else None,
            rollbacks_in_window=len(executed),
            max_rollbacks=guards.max_rollbacks,
            window=guards.window,
            target=target,
            target_source=target_source,
            chain_needs_target=any(spec.needs_target() for spec in chain),
            canary_abort=service.rules.canary is not None and self.engine.canary_active(name),
            in_flight=live[0].id if live else None,
        )

    # -- executing ------------------------------------------------------------------

    async def _execute(self, rollback: Rollback) -> None:
        try:
            await self._execute_recorded(rollback)
        except StoreError as exc:
            # A step whose start cannot be recorded must not run; stop here, loudly. The
            # record shows the last step that could be written; a restart's recovery
            # verifies or interrupts whatever is left running.
            log.critical(
                "state store failed during a rollback: stopping it, nothing further runs",
                rollback=rollback.id,
                service=rollback.service,
                error=str(exc),
            )

    async def _execute_recorded(self, rollback: Rollback) -> None:
        service = self._service(rollback.service)
        now = self.clock()
        if rollback.state is not RollbackState.RUNNING:
            rollback = self.store.set_rollback_state(rollback.id, RollbackState.RUNNING, now)
        if rollback.from_version:
            self.engine.versions.mark_bad(
                rollback.service, rollback.from_version, f"rolled back by rollback {rollback.id}"
            )
        canary = self.engine.canary_active(rollback.service) and service.rules.canary is not None
        self._publish("rollback.started", rollback, {"canary": canary})
        context = RollbackContext(
            service=rollback.service,
            from_version=rollback.from_version,
            to_version=rollback.to_version,
            reason=rollback.reason,
            rollback_id=f"rb-{rollback.id}",
            canary=canary,
        )
        if canary and service.rules.canary is not None:
            self.store.set_rollback_state(rollback.id, RollbackState.RUNNING, now, canary=True)
            aborted = await self._chain(
                rollback, "canary_abort", service.rules.canary.abort, context
            )
            if aborted is not None:
                # Judged from the switch on: what the canary did before it says nothing.
                result = await self._verify(rollback, service, since=self.clock())
                if result.ok:
                    self._publish("canary.aborted", rollback, {"step": aborted.summary})
                    self._finish(
                        rollback, RollbackState.SUCCEEDED, f"canary aborted; {result.reason}"
                    )
                    return
                log.warning("canary abort did not verify: full rollback", rollback=rollback.id)
            context = RollbackContext(**{**context.__dict__, "canary": False})
            if rollback.to_version is None and any(
                spec.needs_target() for spec in service.rules.rollback
            ):
                reason = (
                    "the canary abort did not take effect, and the fallback chain needs a "
                    "target version that no version has baked into"
                )
                self._finish(rollback, RollbackState.FAILED, reason)
                self._freeze(rollback.service, f"rollback {rollback.id} failed: {reason}", now)
                return
        done = await self._chain(rollback, "rollback", service.rules.rollback, context)
        if done is None:
            reason = "every executor of the rollback chain failed"
            self._finish(rollback, RollbackState.FAILED, reason)
            self._freeze(rollback.service, f"rollback {rollback.id} failed: {reason}", self.clock())
            return
        await self._verify_and_finish(rollback, service, since=self.clock())

    async def _verify_and_finish(self, rollback: Rollback, service: Service, since: float) -> None:
        result = await self._verify(rollback, service, since=since)
        if result.ok:
            self._finish(rollback, RollbackState.SUCCEEDED, result.reason)
            return
        await self._verify_failed(rollback, result)

    async def _verify_failed(self, rollback: Rollback, result: VerifyResult) -> None:
        now = self.clock()
        failed = self.store.set_rollback_state(
            rollback.id, RollbackState.FAILED, now, outcome=f"verification failed: {result.reason}"
        )
        self._publish("verify.failed", failed, {"reason": result.reason})
        self._freeze(
            rollback.service, f"rollback {rollback.id} did not verify: {result.reason}", now
        )

    async def _verify(
        self, rollback: Rollback, service: Service, *, since: float | None = None
    ) -> VerifyResult:
        """``since``: when the executor switched the service; None after a restart, where
        it is unknown (judged from now on)."""
        now = self.clock()
        self.store.set_rollback_state(rollback.id, RollbackState.VERIFYING, now)
        step = self.store.start_step(rollback.id, "verify", "verify", now)
        try:
            result = await self.verifier.verify(service, rollback.to_version, since=since)
        except Exception as exc:  # a bug in verification must still leave a record
            log.exception("verification crashed", rollback=rollback.id)
            result = VerifyResult(False, f"verification crashed: {exc!r}")
        self.store.finish_step(step, self.clock(), result.ok, result.reason)
        return result

    async def _chain(
        self,
        rollback: Rollback,
        kind: str,
        specs: list[Any],
        context: RollbackContext,
    ) -> StepResult | None:
        """Each executor in turn until one succeeds; None when all failed."""
        for spec in specs:
            executor = _runner(spec)
            step = self.store.start_step(rollback.id, kind, executor.describe(), self.clock())
            log.info(
                "executor starting", rollback=rollback.id, kind=kind, executor=executor.describe()
            )
            try:
                result = await executor.run(context)
            except Exception as exc:  # an executor bug is a failed step, not a crash
                log.exception("executor crashed", rollback=rollback.id)
                result = StepResult(ok=False, summary=f"executor crashed: {exc!r}")
            self.store.finish_step(
                step,
                self.clock(),
                result.ok,
                result.summary,
                result.stdout_tail,
                result.stderr_tail,
                list(result.command),
            )
            log.info(
                "executor finished", rollback=rollback.id, ok=result.ok, summary=result.summary
            )
            if result.ok:
                return result
        return None

    # -- helpers --------------------------------------------------------------------

    def _finish(self, rollback: Rollback, state: RollbackState, outcome: str) -> None:
        done = self.store.set_rollback_state(rollback.id, state, self.clock(), outcome=outcome)
        kind = "rollback.succeeded" if state is RollbackState.SUCCEEDED else "rollback.failed"
        self._publish(kind, done, {"outcome": outcome})

    def _freeze(self, service: str, reason: str, now: float) -> None:
        """Freeze and page, once: a service already frozen keeps its first reason, and
        a storm of refused triggers does not page again."""
        state = self.store.service_state(service)
        if state is not None and state.frozen:
            return
        self.store.set_frozen(service, True, reason)
        self.bus.publish("service.frozen", now, service, data={"reason": reason})

    def _publish(self, kind: str, rollback: Rollback, extra: dict[str, JSONValue]) -> None:
        data: dict[str, JSONValue] = {
            "rollback_id": rollback.id,
            "from_version": rollback.from_version,
            "to_version": rollback.to_version,
            "reason": rollback.reason,
            "source": rollback.source,
            "trigger": dict(rollback.trigger),
            "guards": [dict(g) for g in rollback.guards],
            **extra,
        }
        self.bus.publish(kind, self.clock(), rollback.service, rollback_id=rollback.id, data=data)

    def _trigger_json(self, trigger: Trigger) -> dict[str, JSONValue]:
        return {
            "source": trigger.source,
            "reason": trigger.reason,
            "at": trigger.at,
            "breach_started": trigger.breach_started,
            "requested_by": trigger.requested_by,
            **trigger.detail,
        }

    def _service(self, name: str) -> Service:
        service = self.engine.loaded.services.get(name)
        if service is None:
            raise UnknownService(f"unknown service {name!r}")
        return service

    def _require(self, rollback_id: int) -> Rollback:
        rollback = self.store.rollback(rollback_id)
        if rollback is None:
            raise LookupError(f"no rollback {rollback_id}")
        return rollback

    def _lock(self, service: str) -> asyncio.Lock:
        return self._locks.setdefault(service, asyncio.Lock())

    def _spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _expired(rollback: Rollback, now: float) -> bool:
    """A pending approval past its deadline."""
    return rollback.expires_at is not None and rollback.expires_at <= now


def _runner(spec: ExecutorSpec) -> Executor[Any]:
    runner = getattr(spec, "runner", None)
    if runner is None:
        raise TypeError(f"{type(spec).__name__} has no runner")
    result: Executor[Any] = runner()
    return result


__all__ = ["Mode", "Pipeline", "Submission", "Trigger", "UnknownService"]
