"""Rollbacks a crash or a stop left in flight: never re-executed.

At start-up (``recover``) each one found running or verifying is verified in the
background: if the service comes to read the target version and its checks hold, it took
effect and succeeded; otherwise it is interrupted, the service frozen and people told. On a
stop (``interrupt_all``) the executions in flight are cut short and left for the next
start to verify the same way.

With leases, only the services this daemon may act on (``Tenancy``), and every state change
under the service's fence: the rollbacks of a service another daemon holds are its to
verify. A service taken over from a daemon that died is recovered the same way, so
``recover`` may run again after a lease is taken: it leaves alone what this process itself
executes or verifies (``Execution.active``).
"""

from __future__ import annotations

from collections.abc import Callable

from rollbackd.config.loader import Service
from rollbackd.core.model import Fence, Rollback, RollbackState
from rollbackd.logs import get_logger
from rollbackd.runtime.announce import Announcer
from rollbackd.runtime.background import Background
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.execution import Execution
from rollbackd.runtime.service_locks import ServiceLocks
from rollbackd.runtime.tenancy import NotHolder, SoloTenancy, Tenancy
from rollbackd.store.errors import FencedError

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
        tenancy: Tenancy | None = None,
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.execution = execution
        self.announce: Announcer = execution.announce
        self.writer = execution.writer
        self.locks = locks
        self.background = background
        self.clock = clock
        self.tenancy: Tenancy = tenancy or SoloTenancy()

    async def recover(self) -> list[Rollback]:
        """At start-up: rollbacks found running or verifying were interrupted by a crash or
        a stop. None is ever re-executed. Each is verified in the background: if the service
        comes to read the target version within ``version_timeout`` and its checks hold, the
        rollback took effect and succeeded; otherwise it is marked interrupted, the service
        is frozen and people are told, since a person must decide."""
        handled = []
        for found in self.store.rollbacks(states=_IN_FLIGHT, limit=1000):
            if not self.tenancy.may_act(found.service):
                continue  # another daemon holds it: its holder recovers it
            async with self.locks.hold(found.service):
                rollback = self.store.rollback(found.id)
                if rollback is None or rollback.state not in _IN_FLIGHT:
                    continue  # decided meanwhile
                if rollback.id in self.execution.active:
                    continue  # this process runs or verifies it now (recovered before)
                try:
                    fence = self.tenancy.fence(rollback.service)
                    handled.append(await self._recover(rollback, fence))
                except (NotHolder, FencedError) as exc:
                    log.warning(
                        "lease lost: a rollback in flight is left to the service's holder",
                        rollback=rollback.id,
                        error=str(exc),
                    )
        return handled

    async def _recover(self, rollback: Rollback, fence: Fence | None) -> Rollback:
        """Close its cut-short steps, then interrupt it or verify it in the background."""
        now = self.clock()
        await self._close_steps(rollback, now, "interrupted: the daemon stopped while this ran")
        service = self.engine.loaded.services.get(rollback.service)
        if service is None or not rollback.to_version or not service.rules.service.version_query:
            why = "whether it took effect cannot be told"
            return await self._interrupted(rollback, why, fence)
        verifying = await self.writer.set_rollback_state(
            rollback.id,
            RollbackState.VERIFYING,
            now,
            outcome="found in flight after a restart: verifying, never re-run",
            fence=fence,
        )
        log.warning("rollback found in flight at start: verifying", rollback=rollback.id)
        self.execution.active.add(rollback.id)
        self.background.spawn(self._verify_recovered(verifying, service, fence))
        return verifying

    async def _verify_recovered(
        self, rollback: Rollback, service: Service, fence: Fence | None
    ) -> None:
        try:
            result = await self.execution.verify(rollback, service, fence=fence)
            if result.ok:
                outcome = f"after a restart: {result.reason}"
                await self.announce.finish(rollback, RollbackState.SUCCEEDED, outcome, fence=fence)
            elif not result.reached_version:
                await self._interrupted(rollback, result.reason, fence)
            else:
                await self.execution.verify_failed(rollback, result, fence=fence)
        except FencedError as exc:
            log.critical(
                "lease lost while verifying a recovered rollback: stopping; the service's "
                "new holder verifies it",
                rollback=rollback.id,
                service=rollback.service,
                error=str(exc),
            )
        finally:
            self.execution.active.discard(rollback.id)

    async def _interrupted(self, rollback: Rollback, why: str, fence: Fence | None) -> Rollback:
        now = self.clock()
        reason = (
            f"interrupted: the daemon stopped while it ran; {why}; not re-run, a person must decide"
        )
        interrupted = await self.writer.set_rollback_state(
            rollback.id, RollbackState.INTERRUPTED, now, outcome=reason, fence=fence
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
            if not self.tenancy.may_act(found.service):
                continue  # another daemon's, or no longer ours: left to its holder
            async with self.locks.hold(found.service):
                rollback = self.store.rollback(found.id)
                if rollback is None or rollback.state not in _IN_FLIGHT:
                    continue
                try:
                    await self._cut_short(rollback, why, self.tenancy.fence(rollback.service))
                except (NotHolder, FencedError):
                    continue  # the lease went meanwhile: the new holder recovers it
            log.warning(
                "rollback cut short by a stop: verified at the next start", rollback=rollback.id
            )

    async def _cut_short(self, rollback: Rollback, why: str, fence: Fence | None) -> None:
        now = self.clock()
        await self._close_steps(rollback, now, f"interrupted: {why}")
        await self.writer.set_rollback_state(
            rollback.id,
            rollback.state,
            now,
            outcome=f"stopped: {why}; verified at the next start, never re-run",
            fence=fence,
        )

    async def _close_steps(self, rollback: Rollback, now: float, summary: str) -> None:
        for step in self.store.steps(rollback.id):
            if step.finished_at is None:
                await self.writer.finish_step(step.id, now, False, summary)
