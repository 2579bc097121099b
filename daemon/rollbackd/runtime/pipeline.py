"""The one decision pipeline every rollback goes through: a firing check, a mapped
Alertmanager alert, or a person. ``Pipeline`` is the entry point; its parts each have one
job:

- ``deciding.py``: one trigger decided (a stale firing, idempotency, guards, the outcome);
- ``approvals.py``: pending approvals approved, rejected, expired or superseded;
- ``reconsider.py``: standing triggers decided again while a refusal may lapse;
- ``execution.py`` / ``recovery.py``: running a decided rollback; what a crash left.

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

import time
from collections.abc import Callable

from rollbackd.checks.base import Action
from rollbackd.core.model import Mode, Rollback
from rollbackd.logs import get_logger
from rollbackd.runtime.announce import Announcer
from rollbackd.runtime.approvals import Approvals
from rollbackd.runtime.background import Background
from rollbackd.runtime.bus import EventBus
from rollbackd.runtime.deciding import Decider
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.execution import Execution
from rollbackd.runtime.firings import Firing
from rollbackd.runtime.reconsider import Reconsider
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
from rollbackd.store.errors import FencedError, StoreError
from rollbackd.store.interfaces import StateStore
from rollbackd.store.writer import writer_for

log = get_logger("rollbackd.pipeline")


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
        settled = Settled()
        # The parts read the time through ``_now``: tests replace ``pipeline.clock``.
        self.announce = Announcer(self.store, self.bus, self._now)
        self.execution = Execution(engine, self.announce, self.verifier, self._now)
        self.recovery = Recovery(
            engine, self.execution, self._locks, self._background, self._now, self.tenancy
        )
        self.decider = Decider(engine, self.announce, self.execution, self._background, settled)
        self.approvals = Approvals(
            engine,
            announce=self.announce,
            execution=self.execution,
            background=self._background,
            locks=self._locks,
            tenancy=self.tenancy,
            clock=self._now,
        )
        self.reconsidering = Reconsider(
            engine,
            self.decider,
            settled=settled,
            locks=self._locks,
            tenancy=self.tenancy,
            clock=self._now,
        )

    def _now(self) -> float:
        return self.clock()

    # -- deciding -------------------------------------------------------------------

    async def on_fire(self, firing: Firing) -> bool:
        """The engine's hook: a check fired. False when the decision could not be recorded
        (the state store failed, or this daemon's lease lapsed while it could not reach
        the store): the engine hands the firing over again later."""
        if firing.action is Action.NOTIFY:
            return True  # the engine published check.breach; people are told, no rollback
        service = self.engine.loaded.services.get(firing.service)
        submission = await self.submit(Trigger.from_firing(firing, service))
        return submission.outcome not in ("unrecorded", "not_holder")

    async def submit(self, trigger: Trigger) -> Submission:
        service = service_named(self.engine, trigger.service)
        async with self._locks.hold(trigger.service):
            try:
                fence = self.tenancy.fence(trigger.service)
                return await self.decider.decide(service, trigger, fence)
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

    async def reconsider(self, now: float | None = None) -> list[Submission]:
        """Decide again every trigger that still fires and was refused only by guards that
        may lapse, or whose release's dry run or approval no longer stands
        (``reconsider.py``). Silent unless it creates a rollback."""
        return await self.reconsidering.reconsider(now)

    async def housekeeping(self) -> None:
        """The periodic sweep: approvals that expired or were superseded, then every
        standing trigger whose refusal may have lapsed."""
        await self.expire_pending()
        await self.reconsider()

    # -- approvals ------------------------------------------------------------------

    async def approve(self, rollback_id: int, who: str) -> Rollback:
        """Run a pending rollback a person approved, decided against the present
        (``approvals.py``); NotHolder when another daemon holds the service."""
        return await self.approvals.approve(rollback_id, who)

    async def reject(self, rollback_id: int, who: str, reason: str = "") -> Rollback:
        return await self.approvals.reject(rollback_id, who, reason)

    async def expire_pending(self) -> list[Rollback]:
        """Pending approvals past their expiry, or whose release was replaced meanwhile
        (superseded), become expired; nothing runs."""
        return await self.approvals.expire_pending()

    # -- what runs --------------------------------------------------------------------

    async def recover(self) -> list[Rollback]:
        """At start-up: verify (never re-run) what a crash or a stop left in flight."""
        return await self.recovery.recover()

    async def interrupt_all(self, why: str) -> None:
        """On a stop: cut the executions in flight short, for the next start to verify."""
        await self.recovery.interrupt_all(why)

    async def wait_idle(self) -> None:
        """Await every execution in flight (tests, and a clean stop)."""
        await self._background.wait_idle()


__all__ = [
    "REFUSAL_QUIET",
    "Mode",
    "Pipeline",
    "Submission",
    "Trigger",
    "UnknownService",
]
