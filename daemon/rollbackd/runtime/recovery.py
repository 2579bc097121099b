"""Rollbacks a crash or a stop left in flight: never re-executed.

At start-up (``recover``) each one found running or verifying is verified in the
background: if the service comes to read the target version and its checks hold, it took
effect and succeeded; otherwise it is interrupted, the service frozen and people told. On a
stop (``interrupt_all``) the executions in flight are cut short and left for the next
start to verify the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from rollbackd.config.loader import Service
from rollbackd.core.model import Rollback, RollbackState
from rollbackd.logs import get_logger
from rollbackd.runtime.announce import Announcer
from rollbackd.runtime.background import Background
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.execution import Execution
from rollbackd.runtime.service_locks import ServiceLocks

log = get_logger("rollbackd.pipeline")

_IN_FLIGHT = [RollbackState.RUNNING, RollbackState.VERIFYING]


class Recovery:
    def __init__(
        self,
        engine: Engine,
        execution: Execution,
        locks: ServiceLocks,
        background: Background,
        clock: Callable[[], float],
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.execution = execution
        self.announce: Announcer = execution.announce
        self.writer = execution.writer
        self.locks = locks
        self.background = background
        self.clock = clock

    async def recover(self) -> list[Rollback]:
        """At start-up: rollbacks found running or verifying were interrupted by a crash or
        a stop. None is ever re-executed. Each is verified in the background: if the service
        comes to read the target version within ``version_timeout`` and its checks hold, the
        rollback took effect and succeeded; otherwise it is marked interrupted, the service
        is frozen and people are told, since a person must decide."""
        handled = []
        for found in self.store.rollbacks(states=_IN_FLIGHT, limit=1000):
            async with self.locks.hold(found.service):
                rollback = self.store.rollback(found.id)
                if rollback is None or rollback.state not in _IN_FLIGHT:
                    continue  # decided meanwhile
                handled.append(await self._recover(rollback))
        return handled

    async def _recover(self, rollback: Rollback) -> Rollback:
        """Close its cut-short steps, then interrupt it or verify it in the background."""
        now = self.clock()
        await self._close_steps(rollback, now, "interrupted: the daemon stopped while this ran")
        service = self.engine.loaded.services.get(rollback.service)
        if service is None or not rollback.to_version or not service.rules.service.version_query:
            return await self._interrupted(rollback, "whether it took effect cannot be told")
        verifying = await self.writer.set_rollback_state(
            rollback.id,
            RollbackState.VERIFYING,
            now,
            outcome="found in flight after a restart: verifying, never re-run",
        )
        log.warning("rollback found in flight at start: verifying", rollback=rollback.id)
        self.background.spawn(self._verify_recovered(verifying, service))
        return verifying

    async def _verify_recovered(self, rollback: Rollback, service: Service) -> None:
        result = await self.execution.verify(rollback, service)
        if result.ok:
            await self.announce.finish(
                rollback, RollbackState.SUCCEEDED, f"after a restart: {result.reason}"
            )
        elif not result.reached_version:
            await self._interrupted(rollback, result.reason)
        else:
            await self.execution.verify_failed(rollback, result)

    async def _interrupted(self, rollback: Rollback, why: str) -> Rollback:
        now = self.clock()
        reason = (
            f"interrupted: the daemon stopped while it ran; {why}; not re-run, a person must decide"
        )
        interrupted = await self.writer.set_rollback_state(
            rollback.id, RollbackState.INTERRUPTED, now, outcome=reason
        )
        await self.announce.rollback_event(
            "rollback.failed", interrupted, {"interrupted": True, "reason": reason}
        )
        await self.announce.freeze(rollback.service, f"rollback {rollback.id} was interrupted", now)
        return interrupted

    async def interrupt_all(self, why: str) -> None:
        """Stop every execution in flight (their process groups are killed) on a stop.
        Their rollbacks stay running or verifying, with the cut-short steps recorded as
        interrupted: the next start recovers them as after a crash — verified, never
        re-run — since whether the switch took effect is only known then."""
        await self.background.cancel_all()
        # A cancelled task's write still runs on the writer thread; read after it, so a
        # rollback that ended just then is not written back to running.
        await self.writer.drain()
        for found in self.store.rollbacks(states=_IN_FLIGHT, limit=1000):
            async with self.locks.hold(found.service):
                rollback = self.store.rollback(found.id)
                if rollback is None or rollback.state not in _IN_FLIGHT:
                    continue
                now = self.clock()
                await self._close_steps(rollback, now, f"interrupted: {why}")
                await self.writer.set_rollback_state(
                    rollback.id,
                    rollback.state,
                    now,
                    outcome=f"stopped: {why}; verified at the next start, never re-run",
                )
            log.warning(
                "rollback cut short by a stop: verified at the next start", rollback=rollback.id
            )

    async def _close_steps(self, rollback: Rollback, now: float, summary: str) -> None:
        for step in self.store.steps(rollback.id):
            if step.finished_at is None:
                await self.writer.finish_step(step.id, now, False, summary)
