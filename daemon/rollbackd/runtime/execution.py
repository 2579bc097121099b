"""Running a decided rollback, as a task of its own (outside any service lock):

  canary in progress? its abort executors first, then verification
  -> else, or when that fails: the [[rollback]] chain, each executor in turn until one
     succeeds, then verification
  -> succeeded, or failed: verify.failed / rollback.failed freeze the service and page

Every step is written to the store before it runs and after it ends, so a crash leaves a
complete record and recovery never re-runs an executor blindly.

Fencing: an execution runs under the fence its rollback was decided under (None with one
daemon alone). Every state change it writes carries it, the lease is checked again before
each executor starts, and executors get its epoch as ``{fencing_token}``. When the lease is
lost mid-rollback (``FencedError``) the execution stops where it is, recording neither
success nor failure: the service's new holder finds it in flight and verifies it, as after
a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

from rollbackd.config.loader import Service
from rollbackd.config.rules import CanarySection
from rollbackd.core.model import Fence, Rollback, RollbackState
from rollbackd.executors.base import Executor, ExecutorSpec, RollbackContext, StepResult
from rollbackd.logs import get_logger
from rollbackd.runtime.announce import Announcer
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.triggers import service_named
from rollbackd.runtime.verify import Verifier, VerifyResult
from rollbackd.store.errors import FencedError, StoreError

log = get_logger("rollbackd.pipeline")


class Execution:
    def __init__(
        self,
        engine: Engine,
        announce: Announcer,
        verifier: Verifier,
        clock: Callable[[], float],
    ) -> None:
        self.engine = engine
        self.announce = announce
        self.writer = announce.writer
        self.verifier = verifier
        self.clock = clock
        self.active: set[int] = set()
        """The rollbacks this process executes or verifies now, from before their task
        starts: a later ``recover`` (after a lease is taken) must leave them alone."""

    def run(self, rollback: Rollback, fence: Fence | None) -> Coroutine[Any, Any, None]:
        """Execute a rollback decided to run (running, not yet started) under ``fence``:
        the work, for a task, marked active at once."""
        self.active.add(rollback.id)
        return self._run(rollback, fence)

    async def _run(self, rollback: Rollback, fence: Fence | None) -> None:
        try:
            await self._run_recorded(rollback, fence)
        except FencedError as exc:
            log.critical(
                "lease lost during a rollback: stopping it here, nothing further runs; "
                "the service's new holder verifies it",
                rollback=rollback.id,
                service=rollback.service,
                error=str(exc),
            )
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
        finally:
            self.active.discard(rollback.id)

    async def _run_recorded(self, rollback: Rollback, fence: Fence | None) -> None:
        service = service_named(self.engine, rollback.service)
        now = self.clock()
        if rollback.state is not RollbackState.RUNNING:
            rollback = await self.writer.set_rollback_state(
                rollback.id, RollbackState.RUNNING, now, fence=fence
            )
        if rollback.from_version:
            await self.engine.versions.mark_bad(
                rollback.service, rollback.from_version, f"rolled back by rollback {rollback.id}"
            )
        canary = self.engine.canary_active(rollback.service) and service.rules.canary is not None
        await self.announce.rollback_event("rollback.started", rollback, {"canary": canary})
        context = RollbackContext(
            service=rollback.service,
            from_version=rollback.from_version,
            to_version=rollback.to_version,
            reason=rollback.reason,
            rollback_id=f"rb-{rollback.id}",
            canary=canary,
            fencing_token=None if fence is None else fence.epoch,
        )
        if canary and service.rules.canary is not None:
            canary_spec = service.rules.canary
            if await self._canary_first(rollback, service, canary_spec, context, now, fence):
                return
            context = replace(context, canary=False)
        done = await self._chain(rollback, "rollback", service.rules.rollback, context, fence)
        if done is None:
            reason = "every executor of the rollback chain failed"
            await self._fail(rollback, reason, self.clock(), fence)
            return
        await self.verify_and_finish(rollback, service, since=self.clock(), fence=fence)

    async def _canary_first(
        self,
        rollback: Rollback,
        service: Service,
        canary: CanarySection,
        context: RollbackContext,
        now: float,
        fence: Fence | None,
    ) -> bool:
        """Abort the canary in progress and verify. True when the rollback ended here: the
        abort took effect, or it did not and the fallback chain cannot run."""
        await self.writer.set_rollback_state(
            rollback.id, RollbackState.RUNNING, now, canary=True, fence=fence
        )
        aborted = await self._chain(rollback, "canary_abort", canary.abort, context, fence)
        if aborted is not None:
            # Judged from the switch on: what the canary did before it says nothing.
            result = await self.verify(rollback, service, since=self.clock(), fence=fence)
            if result.ok:
                await self.announce.rollback_event(
                    "canary.aborted", rollback, {"step": aborted.summary}
                )
                outcome = f"canary aborted; {result.reason}"
                await self.announce.finish(rollback, RollbackState.SUCCEEDED, outcome, fence=fence)
                return True
            log.warning("canary abort did not verify: full rollback", rollback=rollback.id)
        if rollback.to_version is None and any(
            spec.needs_target() for spec in service.rules.rollback
        ):
            reason = (
                "the canary abort did not take effect, and the fallback chain needs a "
                "target version that no version has baked into"
            )
            await self._fail(rollback, reason, now, fence)
            return True
        return False

    async def _fail(self, rollback: Rollback, reason: str, now: float, fence: Fence | None) -> None:
        await self.announce.finish(rollback, RollbackState.FAILED, reason, fence=fence)
        await self.announce.freeze(
            rollback.service, f"rollback {rollback.id} failed: {reason}", now
        )

    async def verify_and_finish(
        self, rollback: Rollback, service: Service, since: float, *, fence: Fence | None
    ) -> None:
        result = await self.verify(rollback, service, since=since, fence=fence)
        if result.ok:
            await self.announce.finish(
                rollback, RollbackState.SUCCEEDED, result.reason, fence=fence
            )
            return
        await self.verify_failed(rollback, result, fence=fence)

    async def verify_failed(
        self, rollback: Rollback, result: VerifyResult, *, fence: Fence | None
    ) -> None:
        now = self.clock()
        failed = await self.writer.set_rollback_state(
            rollback.id,
            RollbackState.FAILED,
            now,
            outcome=f"verification failed: {result.reason}",
            fence=fence,
        )
        await self.announce.rollback_event("verify.failed", failed, {"reason": result.reason})
        await self.announce.freeze(
            rollback.service, f"rollback {rollback.id} did not verify: {result.reason}", now
        )

    async def verify(
        self,
        rollback: Rollback,
        service: Service,
        *,
        since: float | None = None,
        fence: Fence | None,
    ) -> VerifyResult:
        """``since``: when the executor switched the service; None after a restart, where
        it is unknown (judged from now on)."""
        now = self.clock()
        await self.writer.set_rollback_state(rollback.id, RollbackState.VERIFYING, now, fence=fence)
        step = await self.writer.start_step(rollback.id, "verify", "verify", now)
        try:
            result = await self.verifier.verify(service, rollback.to_version, since=since)
        except Exception as exc:  # a bug in verification must still leave a record
            log.exception("verification crashed", rollback=rollback.id)
            result = VerifyResult(False, f"verification crashed: {exc!r}")
        await self.writer.finish_step(step, self.clock(), result.ok, result.reason)
        return result

    async def _chain(
        self,
        rollback: Rollback,
        kind: str,
        specs: Sequence[ExecutorSpec],
        context: RollbackContext,
        fence: Fence | None,
    ) -> StepResult | None:
        """Each executor in turn until one succeeds; None when all failed. FencedError,
        before the next executor starts, once the lease is lost."""
        for spec in specs:
            self._check_held(rollback, fence)
            executor = _runner(spec)
            step = await self.writer.start_step(
                rollback.id, kind, executor.describe(), self.clock()
            )
            log.info(
                "executor starting", rollback=rollback.id, kind=kind, executor=executor.describe()
            )
            try:
                result = await executor.run(context)
            except Exception as exc:  # an executor bug is a failed step, not a crash
                log.exception("executor crashed", rollback=rollback.id)
                result = StepResult(ok=False, summary=f"executor crashed: {exc!r}")
            await self.writer.finish_step(
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

    def _check_held(self, rollback: Rollback, fence: Fence | None) -> None:
        """FencedError unless the fence still holds the service's live lease. A read, not
        a write: the executor it guards is outside the store anyway, and its fencing token
        lets the deploy tool refuse a writer that lost the lease meanwhile."""
        if fence is None:
            return
        if not self.engine.store.holds(rollback.service, fence.holder, fence.epoch):
            raise FencedError(
                f"service {rollback.service!r}: {fence.holder!r} no longer holds its lease "
                f"with epoch {fence.epoch}"
            )


def _runner(spec: ExecutorSpec) -> Executor[Any]:
    runner = getattr(spec, "runner", None)
    if runner is None:
        raise TypeError(f"{type(spec).__name__} has no runner")
    result: Executor[Any] = runner()
    return result
