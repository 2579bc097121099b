"""Runs the engine and hands what fires to the rollback pipeline: the one place where
evaluation and decision meet, so that the engine knows nothing of the pipeline.

A firing the pipeline could not record (``on_fire`` returned False: the state store
failed) is handed over again at every evaluation of its check while its series still
fires, so that a breach seen while the disk was full is acted on once it is not.

With several daemons on one database, each evaluates, observes and bakes only the services
its ``Tenancy`` may act on now (the ones whose lease it holds); the others are another
daemon's. One daemon alone (``SoloTenancy``) acts on all of them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from rollbackd.checks.base import CheckSpec
from rollbackd.checks.batching import Batch
from rollbackd.config.loader import Service
from rollbackd.core.check_state import Phase
from rollbackd.core.samples import Labels
from rollbackd.logs import get_logger
from rollbackd.runtime.engine import Answers, Engine
from rollbackd.runtime.firings import CheckEvaluation, Firing
from rollbackd.runtime.tenancy import SoloTenancy, Tenancy

log = get_logger("rollbackd.engine")

OnFire = Callable[[Firing], Awaitable[bool]]
"""Hands a firing over (``Pipeline.on_fire``); False when it could not be recorded."""


class Runner:
    def __init__(
        self, engine: Engine, on_fire: OnFire | None = None, tenancy: Tenancy | None = None
    ) -> None:
        """``on_fire``: None hands nothing over (a scheduler under test, say). ``tenancy``:
        which services this daemon may act on (default: all, ``SoloTenancy``)."""
        self.engine = engine
        self.on_fire = on_fire
        self.tenancy: Tenancy = SoloTenancy() if tenancy is None else tenancy
        self._not_handed_over: dict[tuple[str, str, Labels], Firing] = {}
        """Firings the pipeline could not record, by (service, check, series)."""

    async def tick(self, now: float | None = None) -> list[CheckEvaluation]:
        """``Engine.tick``, with every firing handed over before baking (tests and the
        stateful model use it; the daemon schedules the same steps)."""
        at = time.time() if now is None else now
        await self.engine.observe_all(at)
        evaluations = await self.engine.run_all(at)
        for evaluation in evaluations:
            await self.hand_over(evaluation)
        await self.engine.bake_all(at)
        return evaluations

    async def run_check(
        self, service: Service, check: CheckSpec, now: float, *, answers: Answers | None = None
    ) -> CheckEvaluation | None:
        """The check evaluated and its firings handed over; None (nothing done) when the
        service is another daemon's."""
        if not self.tenancy.evaluates(service.name):
            return None
        evaluation = await self.engine.run_check(service, check, now, answers=answers)
        await self.hand_over(evaluation)
        return evaluation

    async def run_batch(self, batch: Batch, now: float) -> list[CheckEvaluation]:
        """The members whose service this daemon may act on, still with one query for
        them all (the batch's); nothing when it may act on none."""
        mine = tuple(m for m in batch.members if self.tenancy.evaluates(m.service.name))
        if not mine:
            return []
        if len(mine) < len(batch.members):
            batch = replace(batch, members=mine)  # same id: same job, same rejection memory
        evaluations = await self.engine.run_batch(batch, now)
        for evaluation in evaluations:
            await self.hand_over(evaluation)
        return evaluations

    async def run_service(self, service: Service, now: float) -> None:
        """The service's own job: its version and canary, then its bake (only while this
        daemon may act on the service)."""
        if not self.tenancy.may_act(service.name):
            return
        await self.engine.observe_service(service, now)
        await self.engine.bake(service, now)

    async def hand_over(self, evaluation: CheckEvaluation) -> None:
        """The evaluation's firings to the pipeline, then again those of its check that
        the pipeline could not record before, while their series still fire."""
        on_fire = self.on_fire
        if on_fire is None:
            return
        for labels, firing in evaluation.fired.items():
            key = (evaluation.service, evaluation.check.name, labels)
            await self._hand_over(on_fire, key, firing)
        for key, firing in list(self._not_handed_over.items()):
            if key[:2] != (evaluation.service, evaluation.check.name) or key[2] in evaluation.fired:
                continue
            series = evaluation.state.series.get(key[2])
            if series is None or series.phase is not Phase.FIRING:
                del self._not_handed_over[key]  # over: nothing left to act on
                continue
            await self._hand_over(on_fire, key, replace(firing, at=evaluation.at))

    async def _hand_over(
        self, on_fire: OnFire, key: tuple[str, str, Labels], firing: Firing
    ) -> None:
        if await on_fire(firing):
            self._not_handed_over.pop(key, None)
            return
        if key not in self._not_handed_over:
            log.critical(
                "firing not handed over: the state store failed; it is handed over again "
                "on every evaluation while the check fires",
                service=firing.service,
                check=firing.check,
            )
        self._not_handed_over[key] = firing


__all__ = ["OnFire", "Runner"]
