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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from rollbackd.bus import EventBus
from rollbackd.checks.base import Action
from rollbackd.config import Mode
from rollbackd.engine import Engine, Firing
from rollbackd.executors.base import Executor, ExecutorSpec, RollbackContext, StepResult
from rollbackd.guards import Decision, GuardFacts, Outcome, decide
from rollbackd.loader import Service
from rollbackd.logs import get_logger
from rollbackd.store import (
    ConflictError,
    JSONValue,
    Rollback,
    RollbackDraft,
    RollbackState,
    Store,
    StoreError,
)
from rollbackd.verify import Verifier, VerifyResult

log = get_logger("rollbackd.pipeline")

REFUSAL_QUIET = 300.0
"""Seconds during which the same refusal (service, release, failed guards) is not announced
again. An alert storm against a paused service is one ``rollback.refused`` event and one
warning, not 10,000 of each offered to every notifier; each alert's own record still says
it was refused."""
REFUSAL_LOG_EVERY = 1000
"""A repeated refusal is logged (at info) on every this many repeats."""


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

    @classmethod
    def from_firing(cls, firing: Firing) -> Trigger:
        m = firing.measurement
        return cls(
            service=firing.service,
            source="check",
            reason=f"check {firing.check}: {m.reason}",
            at=firing.at,
            breach_started=firing.breach_started,
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
            running = self.store.set_rollback_state(
                rollback_id,
                RollbackState.RUNNING,
                now,
                expected=[RollbackState.PENDING],
                decided_by=who,
            )
        self._spawn(self._execute(running))
        return running

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
        """Pending approvals past their expiry become expired; nothing runs."""
        now = self.clock()
        expired = []
        for rollback in self.store.rollbacks(states=[RollbackState.PENDING], limit=1000):
            if _expired(rollback, now):
                done = self._expire(rollback, now)
                if done is not None:
                    expired.append(done)
        return expired

    def _expire(self, rollback: Rollback, now: float) -> Rollback | None:
        """Mark one pending rollback expired; None if it was decided meanwhile."""
        try:
            done = self.store.set_rollback_state(
                rollback.id,
                RollbackState.EXPIRED,
                now,
                expected=[RollbackState.PENDING],
                outcome="no decision before the approval timeout",
            )
        except ConflictError:
            return None
        self._publish("rollback.expired", done, {})
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
        """Stop every execution in flight (their process groups are killed) and mark their
        rollbacks interrupted: on a stop, never leave one looking as if it still ran."""
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
            self._interrupted(rollback, why)

    async def wait_idle(self) -> None:
        """Await every execution in flight (tests, and a clean stop)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- deciding -------------------------------------------------------------------

    def _decide(self, service: Service, trigger: Trigger) -> Submission:
        now = trigger.at
        name = service.name
        current = self.engine.versions.current(name)
        release = self._release_id(name, current)
        existing = self.store.latest_rollback(name, current, release)
        if existing is not None and (
            existing.state in _JOINABLE
            and (
                trigger.automatic
                or existing.state.live
                or existing.state is RollbackState.SUCCEEDED
            )
        ):
            self.store.add_trigger(existing.id, now, trigger.source, self._trigger_json(trigger))
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
                "joined", self.store.latest_rollback(name, current), decision, str(exc)
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

    def _release_id(self, service: str, current: str | None) -> int:
        """The version change that made ``current`` live: the release a rollback undoes.
        The same version deployed again later is another release."""
        changes = self.store.version_changes(service, 1)
        if changes and current is not None and changes[0].to_version == current:
            return changes[0].id
        return 0

    def _facts(self, service: Service, trigger: Trigger, current: str | None) -> GuardFacts:
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
        live = self.store.rollbacks(
            service=name,
            states=[RollbackState.PENDING, RollbackState.RUNNING, RollbackState.VERIFYING],
            limit=1,
        )
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
                result = await self._verify(rollback, service)
                if result.ok:
                    self._publish("canary.aborted", rollback, {"step": aborted.summary})
                    self._finish(
                        rollback, RollbackState.SUCCEEDED, f"canary aborted; {result.reason}"
                    )
                    return
                log.warning("canary abort did not verify: full rollback", rollback=rollback.id)
            context = RollbackContext(**{**context.__dict__, "canary": False})
        done = await self._chain(rollback, "rollback", service.rules.rollback, context)
        if done is None:
            reason = "every executor of the rollback chain failed"
            self._finish(rollback, RollbackState.FAILED, reason)
            self._freeze(rollback.service, f"rollback {rollback.id} failed: {reason}", self.clock())
            return
        await self._verify_and_finish(rollback, service)

    async def _verify_and_finish(self, rollback: Rollback, service: Service) -> None:
        result = await self._verify(rollback, service)
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

    async def _verify(self, rollback: Rollback, service: Service) -> VerifyResult:
        now = self.clock()
        self.store.set_rollback_state(rollback.id, RollbackState.VERIFYING, now)
        step = self.store.start_step(rollback.id, "verify", "verify", now)
        try:
            result = await self.verifier.verify(service, rollback.to_version)
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
