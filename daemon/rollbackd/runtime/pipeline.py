"""The one decision pipeline every rollback goes through: a firing check, a mapped
Alertmanager alert, or a person.

submit(trigger)
  -> idempotency: a rollback is keyed by (service, from_version); a second trigger for a
     release whose rollback is pending, running or done is recorded against it, never run
  -> guards (core/guards.py, facts from guard_facts.py), every verdict recorded
  -> refuse | dry-run | wait for approval | execute (execution.py, a task of its own)

Each read-decide-write about one service (submit, reconsider, approve, reject, expiry,
recovery) runs under that service's lock: writes are awaited on the store's writer thread,
and two triggers must not both see "no rollback yet" in between. The lock is never held
across an execution or a verification.

Tenancy: with leases (several daemons on PostgreSQL) the pipeline decides only for the
services this daemon holds, and every rollback state change it makes carries the service's
fence (``Tenancy.fence``), checked by the store in the write's own transaction: a daemon
that lost its lease cannot create, start or finish a rollback. Alone (``SoloTenancy``) it
holds every service and writes unfenced.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from rollbackd.checks.base import Action
from rollbackd.config.loader import Service
from rollbackd.core.guards import Decision, GuardFacts, Outcome, decide, lapses
from rollbackd.core.model import Fence, JSONValue, Mode, Rollback, RollbackDraft, RollbackState
from rollbackd.logs import get_logger
from rollbackd.runtime.announce import Announcer
from rollbackd.runtime.background import Background
from rollbackd.runtime.bus import EventBus
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.execution import Execution
from rollbackd.runtime.firings import Firing
from rollbackd.runtime.guard_facts import guard_facts, joins, overdue, release_of
from rollbackd.runtime.recovery import Recovery
from rollbackd.runtime.service_locks import ServiceLocks
from rollbackd.runtime.tenancy import NotHolder, SoloTenancy, Tenancy
from rollbackd.runtime.triggers import (
    REFUSAL_QUIET,
    Settled,
    Submission,
    Trigger,
    UnknownService,
    service_named,
)
from rollbackd.runtime.verify import Verifier
from rollbackd.store.errors import ConflictError, FencedError, StoreError
from rollbackd.store.interfaces import StateStore
from rollbackd.store.writer import writer_for

log = get_logger("rollbackd.pipeline")

_STATE_OF = {
    Outcome.EXECUTE: RollbackState.RUNNING,
    Outcome.AWAIT_APPROVAL: RollbackState.PENDING,
    Outcome.DRY_RUN: RollbackState.DRY_RUN,
}
"""The state a new rollback is created in, by what the guards decided."""


@dataclass(frozen=True)
class _Case:
    """One trigger being decided, with the facts it was decided on."""

    service: str
    trigger: Trigger
    current: str | None
    release: int
    standing: bool
    fence: Fence | None


class Pipeline:
    def __init__(
        self,
        engine: Engine,
        *,
        bus: EventBus | None = None,
        verifier: Verifier | None = None,
        clock: Callable[[], float] = time.time,
        tenancy: Tenancy | None = None,
    ) -> None:
        self.engine = engine
        self.tenancy: Tenancy = tenancy or SoloTenancy()
        self.store: StateStore = engine.store
        self.writer = writer_for(self.store)
        self.bus = bus or engine.bus
        self.verifier = verifier or Verifier(engine, clock=clock)
        self.clock = clock
        self._locks = ServiceLocks()
        self._background = Background()
        self._settled = Settled()
        # The parts read the time through ``_now``: tests replace ``pipeline.clock``.
        self.announce = Announcer(self.store, self.bus, self._now)
        self.execution = Execution(engine, self.announce, self.verifier, self._now)
        self.recovery = Recovery(
            engine, self.execution, self._locks, self._background, self._now, self.tenancy
        )

    def _now(self) -> float:
        return self.clock()

    # -- entry points ---------------------------------------------------------------

    async def on_fire(self, firing: Firing) -> bool:
        """The engine's hook: a check fired. False when the decision could not be recorded
        (the state store failed): the engine hands the firing over again later."""
        if firing.action is Action.NOTIFY:
            return True  # the engine published check.breach; people are told, no rollback
        submission = await self.submit(Trigger.from_firing(firing))
        return submission.outcome != "unrecorded"

    async def submit(self, trigger: Trigger) -> Submission:
        service = service_named(self.engine, trigger.service)
        async with self._locks.hold(trigger.service):
            try:
                fence = self.tenancy.fence(trigger.service)
                return await self._decide(service, trigger, fence)
            except (NotHolder, FencedError) as exc:
                # Another daemon holds the service (or took it just now): it decides.
                log.info("not deciding: not the holder", service=trigger.service, why=str(exc))
                return Submission("not_holder", None, None, str(exc))
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
        async with self._locks.hold(rollback.service):
            fence = self._fence_for_person(rollback.service)
            now = self.clock()
            current = self._require(rollback_id)
            if current.state is RollbackState.PENDING:
                await self._check_approvable(current, who, now, fence)
            running = await self.writer.set_rollback_state(
                rollback_id,
                RollbackState.RUNNING,
                now,
                expected=[RollbackState.PENDING],
                decided_by=who,
                fence=fence,
            )
        self._background.spawn(self.execution.run(running, fence))
        return running

    def _fence_for_person(self, service: str) -> Fence | None:
        """The fence for a person's decision about ``service``; ConflictError (the API's
        409, with why) when another daemon holds it and must decide."""
        try:
            return self.tenancy.fence(service)
        except NotHolder as exc:
            raise ConflictError(f"{exc}: ask the daemon that holds it") from exc

    async def _check_approvable(
        self, pending: Rollback, who: str, now: float, fence: Fence | None
    ) -> None:
        """ConflictError unless the pending rollback may run now; one past its deadline
        or superseded is expired on the way (the sweep runs every few seconds: an approval
        in between must not run what nobody decided on in time)."""
        over = overdue(self.engine, pending, now)
        if over is not None:
            expired = await self._expire(pending, now, fence, superseded=over.superseded)
            if over.superseded is None:
                state = expired.state if expired is not None else "decided meanwhile"
                raise ConflictError(f"rollback {pending.id} is {state}, not pending")
            raise ConflictError(f"rollback {pending.id} is superseded, not run: {over.superseded}")
        service = service_named(self.engine, pending.service)
        trigger = Trigger(
            service=pending.service,
            source="approval",
            reason=pending.reason,
            at=now,
            automatic=False,
            to_version=pending.to_version,
            requested_by=who,
        )
        facts = guard_facts(
            self.engine, service, trigger, pending.from_version, deciding=pending.id
        )
        decision = decide(facts)
        if decision.outcome is Outcome.REFUSE:
            raise ConflictError(
                f"rollback {pending.id} stays pending, not run now: {decision.reason}"
            )

    async def reject(self, rollback_id: int, who: str, reason: str = "") -> Rollback:
        rollback = self._require(rollback_id)
        async with self._locks.hold(rollback.service):
            rejected = await self.writer.set_rollback_state(
                rollback_id,
                RollbackState.REJECTED,
                self.clock(),
                expected=[RollbackState.PENDING],
                decided_by=who,
                outcome=f"rejected by {who}" + (f": {reason}" if reason else ""),
                fence=self._fence_for_person(rollback.service),
            )
            await self.announce.rollback_event(
                "rollback.rejected", rejected, {"by": who, "reason": reason}
            )
        return rejected

    async def expire_pending(self) -> list[Rollback]:
        """Pending approvals past their expiry, or whose release was replaced meanwhile
        (superseded), become expired; nothing runs."""
        now = self.clock()
        expired = []
        for pending in self.store.rollbacks(states=[RollbackState.PENDING], limit=1000):
            if not self.tenancy.may_act(pending.service):
                continue  # another daemon holds it: it expires its own
            if overdue(self.engine, pending, now) is None:
                continue  # the common case, without taking the lock
            async with self._locks.hold(pending.service):
                # Again under the lock: an approval may have decided it meanwhile.
                current = self.store.rollback(pending.id)
                if current is None or current.state is not RollbackState.PENDING:
                    continue
                over = overdue(self.engine, current, now)
                if over is None:
                    continue
                try:
                    fence = self.tenancy.fence(current.service)
                    done = await self._expire(current, now, fence, superseded=over.superseded)
                except (NotHolder, FencedError):
                    continue  # the lease went meanwhile: its new holder expires it
            if done is not None:
                expired.append(done)
        return expired

    async def housekeeping(self) -> None:
        """The periodic sweep: approvals that expired or were superseded, then every
        standing trigger whose refusal may have lapsed."""
        await self.expire_pending()
        await self.reconsider()

    async def _expire(
        self, rollback: Rollback, now: float, fence: Fence | None, *, superseded: str | None = None
    ) -> Rollback | None:
        """Mark one pending rollback expired; None if it was decided meanwhile. The caller
        holds the service's lock."""
        try:
            done = await self.writer.set_rollback_state(
                rollback.id,
                RollbackState.EXPIRED,
                now,
                expected=[RollbackState.PENDING],
                outcome="no decision before the approval timeout"
                if superseded is None
                else f"superseded: {superseded}",
                fence=fence,
            )
        except ConflictError:
            return None
        extra: dict[str, JSONValue] = {}
        if superseded is not None:
            extra = {"superseded": True, "why": superseded}
            log.warning("pending rollback superseded", rollback=rollback.id, why=superseded)
        await self.announce.rollback_event("rollback.expired", done, extra)
        return done

    async def recover(self) -> list[Rollback]:
        """At start-up: verify (never re-run) what a crash or a stop left in flight."""
        return await self.recovery.recover()

    async def interrupt_all(self, why: str) -> None:
        """On a stop: cut the executions in flight short, for the next start to verify."""
        await self.recovery.interrupt_all(why)

    async def wait_idle(self) -> None:
        """Await every execution in flight (tests, and a clean stop)."""
        await self._background.wait_idle()

    # -- deciding -------------------------------------------------------------------

    async def _decide(
        self, service: Service, trigger: Trigger, fence: Fence | None, *, standing: bool = False
    ) -> Submission:
        """Decide one trigger; the caller holds the service's lock. ``standing``: a trigger
        that still fires, decided again by ``reconsider``: it acts only when the decision
        creates a rollback, and otherwise records and announces nothing (it was recorded
        when it first fired)."""
        name = service.name
        # Every fact is read before the first write, with no await in between.
        current = self.engine.versions.current(name)
        release = release_of(self.store, name, current, trigger)
        existing = self.store.latest_rollback(name, current, release)
        if existing is not None and joins(existing, trigger, self._mode()):
            return await self._join(existing, trigger, current, standing=standing)
        facts = guard_facts(self.engine, service, trigger, current)
        decision = decide(facts)
        case = _Case(name, trigger, current, release, standing, fence)
        if decision.outcome is Outcome.REFUSE:
            return await self._refuse(case, decision)
        return await self._create(case, facts, decision)

    async def _join(
        self, existing: Rollback, trigger: Trigger, current: str | None, *, standing: bool
    ) -> Submission:
        if not standing:
            await self.writer.add_trigger(
                existing.id, trigger.at, trigger.source, trigger.as_json()
            )
            log.info(
                "trigger joined an existing rollback",
                rollback=existing.id,
                service=existing.service,
            )
        return Submission(
            "joined",
            existing,
            None,
            f"{f'release {current}' if current else 'the service'} already has rollback "
            f"{existing.id} ({existing.state.value})",
        )

    async def _refuse(self, case: _Case, decision: Decision) -> Submission:
        if not lapses(decision):
            self._settled.settle(case.service, case.release, case.trigger)  # "never"
        if not case.standing:
            failed = tuple(g.guard for g in decision.guards if not g.passed)
            key = (case.service, case.current, case.release, failed)
            await self.announce.refusal(key, case.service, case.trigger, decision)
        if decision.freeze:
            await self.announce.freeze(case.service, decision.reason, case.trigger.at)
        return Submission("refused", None, decision, decision.reason)

    async def _create(self, case: _Case, facts: GuardFacts, decision: Decision) -> Submission:
        name, trigger = case.service, case.trigger
        state = _STATE_OF[decision.outcome]
        guards = _guards_json(decision)
        try:
            draft = self._draft(case, facts, state, guards)
            rollback = await self.writer.create_rollback(draft, fence=case.fence)
        except ConflictError as exc:  # the database's own guard: one per release
            existing = self.store.latest_rollback(name, case.current, case.release)
            return Submission("joined", existing, decision, str(exc))
        if case.standing:
            log.info(
                "a trigger that still fires was decided again: its refusal lapsed",
                service=name,
                rollback=rollback.id,
                trigger=trigger.reason,
            )
        if state is RollbackState.DRY_RUN:
            would = f"roll back {name} {case.current} -> {facts.target}"
            await self.announce.rollback_event(
                "rollback.pending", rollback, {"dry_run": True, "guards": guards, "would": would}
            )
            return Submission("dry_run", rollback, decision, "dry-run: recorded, not executed")
        if state is RollbackState.PENDING:
            await self.announce.rollback_event(
                "rollback.pending", rollback, {"guards": guards, "expires_at": rollback.expires_at}
            )
            return Submission("pending_approval", rollback, decision, "waiting for approval")
        self._background.spawn(self.execution.run(rollback, case.fence))
        return Submission("executing", rollback, decision, decision.reason)

    def _draft(
        self,
        case: _Case,
        facts: GuardFacts,
        state: RollbackState,
        guards: list[dict[str, JSONValue]],
    ) -> RollbackDraft:
        trigger, now = case.trigger, case.trigger.at
        approval = self.engine.loaded.config.daemon.approval_timeout.total_seconds()
        return RollbackDraft(
            service=case.service,
            from_version=case.current,
            release_id=case.release,
            to_version=facts.target,
            state=state,
            source=trigger.source,
            automatic=trigger.automatic,
            reason=trigger.reason,
            mode=facts.mode.value,
            trigger=trigger.as_json(),
            guards=guards,
            at=now,
            expires_at=now + approval if state is RollbackState.PENDING else None,
            outcome="dry-run: would roll back" if state is RollbackState.DRY_RUN else "",
        )

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
            if not self.tenancy.may_act(service.name):
                continue  # another daemon holds it: it decides again
            triggers = self._standing(service, at)
            if not triggers:
                continue
            async with self._locks.hold(service.name):
                try:
                    fence = self.tenancy.fence(service.name)
                    submission = await self._reconsider_service(service, triggers, fence)
                except (NotHolder, FencedError):
                    continue  # the lease went meanwhile: its new holder decides
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

    async def _reconsider_service(
        self, service: Service, triggers: list[Trigger], fence: Fence | None
    ) -> Submission | None:
        """The caller holds the service's lock."""
        name = service.name
        current = self.engine.versions.current(name)
        # Per release: whether its latest rollback takes every automatic trigger (what it
        # became still stands), looked up once per pass, not once per trigger.
        joined: dict[int, bool] = {}
        # The latest breach first: the guards that differ between triggers only judge
        # when the breach began, and a later one is the likelier to be this release's.
        triggers.sort(key=lambda t: -math.inf if t.breach_started is None else t.breach_started)
        for trigger in reversed(triggers):
            release = release_of(self.store, name, current, trigger)
            if self._settled.is_settled(name, release, trigger):
                continue
            if release not in joined:
                existing = self.store.latest_rollback(name, current, release)
                joined[release] = existing is not None and joins(existing, trigger, self._mode())
            if joined[release]:
                continue
            submission = await self._decide(service, trigger, fence, standing=True)
            if submission.outcome != "refused":
                return submission
            if submission.decision is not None and lapses(submission.decision):
                return None  # the service refuses for now: the others would be refused alike
        return None

    # -- helpers --------------------------------------------------------------------

    def _mode(self) -> Mode:
        return self.engine.loaded.config.daemon.mode

    def _require(self, rollback_id: int) -> Rollback:
        rollback = self.store.rollback(rollback_id)
        if rollback is None:
            raise LookupError(f"no rollback {rollback_id}")
        return rollback


def _guards_json(decision: Decision) -> list[dict[str, JSONValue]]:
    return [dict(g.as_json()) for g in decision.guards]


__all__ = [
    "REFUSAL_QUIET",
    "Mode",
    "Pipeline",
    "Submission",
    "Trigger",
    "UnknownService",
]
