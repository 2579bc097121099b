"""Pending approvals: approved (decided again against the present), rejected, or expired —
past their deadline, or superseded when their release was replaced meanwhile.

Each runs under the service's lock. A person's decision needs this daemon to hold the
service: ``NotHolder`` propagates (``Control`` hands the request to the holder). The sweep
(``expire_pending``) expires only the approvals of services this daemon holds.
"""

from __future__ import annotations

from collections.abc import Callable

from rollbackd.core.guards import Outcome, decide
from rollbackd.core.model import Fence, JSONValue, Rollback, RollbackState
from rollbackd.logs import get_logger
from rollbackd.runtime.announce import Announcer
from rollbackd.runtime.background import Background
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.execution import Execution
from rollbackd.runtime.guard_facts import guard_facts, overdue
from rollbackd.runtime.service_locks import ServiceLocks
from rollbackd.runtime.tenancy import NotHolder, Tenancy
from rollbackd.runtime.triggers import Trigger, service_named
from rollbackd.store.errors import ConflictError, FencedError
from rollbackd.store.interfaces import StateStore
from rollbackd.store.writer import writer_for

log = get_logger("rollbackd.pipeline")


class Approvals:
    def __init__(
        self,
        engine: Engine,
        *,
        announce: Announcer,
        execution: Execution,
        background: Background,
        locks: ServiceLocks,
        tenancy: Tenancy,
        clock: Callable[[], float],
    ) -> None:
        """``clock``: the pipeline's (tests replace ``pipeline.clock``)."""
        self.engine = engine
        self.store: StateStore = engine.store
        self.writer = writer_for(self.store)
        self.announce = announce
        self.execution = execution
        self.tenancy = tenancy
        self._background = background
        self._locks = locks
        self._clock = clock

    async def approve(self, rollback_id: int, who: str) -> Rollback:
        """Run a pending rollback a person approved — decided against the present: its
        release must still be live (else it is superseded: expired, never run) and the
        guards must still pass as for a person's request (another rollback in flight, say,
        refuses it for now: it stays pending)."""
        rollback = self._require(rollback_id)
        async with self._locks.hold(rollback.service):
            fence = self._fence_for_person(rollback.service)
            now = self._clock()
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

    async def reject(self, rollback_id: int, who: str, reason: str = "") -> Rollback:
        rollback = self._require(rollback_id)
        async with self._locks.hold(rollback.service):
            rejected = await self.writer.set_rollback_state(
                rollback_id,
                RollbackState.REJECTED,
                self._clock(),
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
        now = self._clock()
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

    def _fence_for_person(self, service: str) -> Fence | None:
        """The fence for a person's decision about ``service``; NotHolder when another
        daemon holds it and must decide (``Control`` hands the request to it)."""
        return self.tenancy.fence(service)

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

    def _require(self, rollback_id: int) -> Rollback:
        rollback = self.store.rollback(rollback_id)
        if rollback is None:
            raise LookupError(f"no rollback {rollback_id}")
        return rollback


__all__ = ["Approvals"]
