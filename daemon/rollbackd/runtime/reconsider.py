"""Deciding again: "not now" is not "never". Every few seconds (and after a restart, when
check states come back firing) each trigger that still fires — a rollback check's firing
series, a mapped alert still firing — is decided again if it was refused only by guards
that may lapse (cooldown, pause, freeze, a rollback in flight, max_rollbacks), or if its
release's dry run or approval no longer stands (mode changed, approval expired).

Silent unless it creates a rollback: the trigger was recorded and announced when it first
fired. Only for the services this daemon holds, each under its lock and fence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from rollbackd.checks.base import Action
from rollbackd.config.loader import Service
from rollbackd.core.guards import lapses
from rollbackd.core.model import Fence
from rollbackd.logs import get_logger
from rollbackd.runtime.deciding import Decider
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.guard_facts import joins, release_of
from rollbackd.runtime.service_locks import ServiceLocks
from rollbackd.runtime.tenancy import NotHolder, Tenancy
from rollbackd.runtime.triggers import Settled, Submission, Trigger
from rollbackd.store.errors import FencedError, StoreError
from rollbackd.store.interfaces import StateStore

log = get_logger("rollbackd.pipeline")


class Reconsider:
    def __init__(
        self,
        engine: Engine,
        decider: Decider,
        *,
        settled: Settled,
        locks: ServiceLocks,
        tenancy: Tenancy,
        clock: Callable[[], float],
    ) -> None:
        """``clock``: the pipeline's (tests replace ``pipeline.clock``)."""
        self.engine = engine
        self.store: StateStore = engine.store
        self.decider = decider
        self.tenancy = tenancy
        self._settled = settled
        self._locks = locks
        self._clock = clock

    async def reconsider(self, now: float | None = None) -> list[Submission]:
        """Decide again every standing trigger of every service this daemon holds; what
        was created."""
        at = self._clock() if now is None else now
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
            Trigger.from_firing(replace(firing, at=at), service)
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
            if trigger.stale(current):
                continue  # an old version's series, about to be forgotten: never decided
            release = release_of(self.store, name, current, trigger)
            if self._settled.is_settled(name, release, trigger):
                continue
            if release not in joined:
                existing = self.store.latest_rollback(name, current, release)
                joined[release] = existing is not None and joins(
                    existing, trigger, self.decider.mode()
                )
            if joined[release]:
                continue
            submission = await self.decider.decide(service, trigger, fence, standing=True)
            if submission.outcome != "refused":
                return submission
            if submission.decision is not None and lapses(submission.decision):
                return None  # the service refuses for now: the others would be refused alike
        return None


__all__ = ["Reconsider"]
