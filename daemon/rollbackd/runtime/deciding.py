"""Deciding one trigger, under its service's lock: the decision path of the pipeline.

  -> a firing judged for a version no longer current: about its own release, not the
     current one; it joins that release's rollback, or is dropped (logged, no event)
  -> idempotency: a rollback is keyed by (service, from_version, release); a second trigger
     for a release whose rollback is pending, running or done is recorded against it
  -> guards (core/guards.py, facts from guard_facts.py), every verdict recorded
  -> refuse | dry-run | wait for approval | execute (execution.py, a task of its own)

Every fact is read before the first write, with no await in between; the caller holds the
service's lock, so two triggers cannot both see "no rollback yet".
"""

from __future__ import annotations

from dataclasses import dataclass

from rollbackd.config.loader import Service
from rollbackd.core.guards import Decision, GuardFacts, Outcome, decide, lapses
from rollbackd.core.model import Fence, JSONValue, Mode, Rollback, RollbackDraft, RollbackState
from rollbackd.logs import get_logger
from rollbackd.runtime.announce import Announcer
from rollbackd.runtime.background import Background
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.execution import Execution
from rollbackd.runtime.guard_facts import guard_facts, joins, release_of, release_of_version
from rollbackd.runtime.triggers import Settled, Submission, Trigger
from rollbackd.store.errors import ConflictError
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


class Decider:
    """Decides triggers and records what it decided; the pipeline takes the lock and the
    fence, and turns store failures into answers."""

    def __init__(
        self,
        engine: Engine,
        announce: Announcer,
        execution: Execution,
        background: Background,
        settled: Settled,
    ) -> None:
        self.engine = engine
        self.store: StateStore = engine.store
        self.writer = writer_for(self.store)
        self.announce = announce
        self.execution = execution
        self._background = background
        self._settled = settled

    def mode(self) -> Mode:
        return self.engine.loaded.config.daemon.mode

    async def decide(
        self, service: Service, trigger: Trigger, fence: Fence | None, *, standing: bool = False
    ) -> Submission:
        """Decide one trigger; the caller holds the service's lock. ``standing``: a trigger
        that still fires, decided again by ``reconsider``: it acts only when the decision
        creates a rollback, and otherwise records and announces nothing (it was recorded
        when it first fired)."""
        name = service.name
        # Every fact is read before the first write, with no await in between.
        current = self.engine.versions.current(name)
        if trigger.stale(current):
            return await self._stale(trigger, current, standing=standing)
        release = release_of(self.store, name, current, trigger)
        existing = self.store.latest_rollback(name, current, release)
        if existing is not None and joins(existing, trigger, self.mode()):
            return await self._join(existing, trigger, current, standing=standing)
        facts = guard_facts(self.engine, service, trigger, current)
        decision = decide(facts)
        case = _Case(name, trigger, current, release, standing, fence)
        if decision.outcome is Outcome.REFUSE:
            return await self._refuse(case, decision)
        return await self._create(case, facts, decision)

    async def _stale(self, trigger: Trigger, current: str | None, *, standing: bool) -> Submission:
        """A firing judged for a version that another replaced before it was decided (a
        takeover's first evaluation before its first version poll, or a poll that ended
        meanwhile). It is about its own version's release, never the current one: as the
        engine forgets an old version's series at a version change, the pipeline does not
        decide the old version's firing against the new release. It joins its release's
        rollback if there is one, else it is dropped: nothing is left to roll back."""
        name, version = trigger.service, trigger.judged_for
        release = release_of_version(self.store, name, version)
        existing = self.store.latest_rollback(name, version, release)
        if existing is not None and joins(existing, trigger, self.mode()):
            return await self._join(existing, trigger, version, standing=standing)
        why = f"judged for {version}, which {current} replaced before it was decided"
        if not standing:
            log.info("firing dropped: its version is no longer current", service=name, why=why)
        return Submission("ignored", None, None, why)

    async def _join(
        self, existing: Rollback, trigger: Trigger, version: str | None, *, standing: bool
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
            f"{f'release {version}' if version else 'the service'} already has rollback "
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


def _guards_json(decision: Decision) -> list[dict[str, JSONValue]]:
    return [dict(g.as_json()) for g in decision.guards]


__all__ = ["Decider"]
