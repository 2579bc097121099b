"""A rollback's events, and the writes that end in one, shared by deciding, executing and
recovering: the standard payload of a rollback's event, a refusal (announced once per quiet
period), finishing a rollback, freezing a service (which pages, once)."""

from __future__ import annotations

from collections.abc import Callable

from rollbackd.core.guards import Decision, lapses
from rollbackd.core.model import Fence, JSONValue, Rollback, RollbackState
from rollbackd.logs import get_logger
from rollbackd.runtime.bus import EventBus
from rollbackd.runtime.service_locks import ServiceLocks
from rollbackd.runtime.triggers import REFUSAL_LOG_EVERY, Refusals, Trigger
from rollbackd.store.interfaces import StateStore
from rollbackd.store.writer import writer_for

log = get_logger("rollbackd.pipeline")


class Announcer:
    def __init__(self, store: StateStore, bus: EventBus, clock: Callable[[], float]) -> None:
        self.store = store
        self.writer = writer_for(store)
        self.bus = bus
        self.clock = clock
        # Freezing reads "frozen already?" then writes: two rollbacks failing at once
        # (or a failure and a max_rollbacks refusal) must not both page. A lock of its own,
        # taken last and holding no other: a decision holding its service's lock may
        # freeze, and an execution (holding none) may too.
        self._freezing = ServiceLocks()
        self._refusals = Refusals()

    async def rollback_event(
        self, kind: str, rollback: Rollback, extra: dict[str, JSONValue]
    ) -> None:
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
        await self.bus.publish(
            kind, self.clock(), rollback.service, rollback_id=rollback.id, data=data
        )

    async def refusal(
        self, key: tuple[object, ...], service: str, trigger: Trigger, decision: Decision
    ) -> None:
        """``rollback.refused`` and a warning, once per quiet period for the same refusal
        (``key``: the service, its release and the guards that failed)."""
        now = trigger.at
        repeats = self._refusals.repeat(key, now)
        if repeats is None:
            await self.bus.publish(
                "rollback.refused",
                now,
                service,
                data={
                    "reason": decision.reason,
                    "guards": [dict(g.as_json()) for g in decision.guards],
                    "lapses": lapses(decision),
                    "trigger": trigger.as_json(),
                },
            )
            log.warning("rollback refused", service=service, reason=decision.reason)
        elif repeats % REFUSAL_LOG_EVERY == 0:
            log.info(
                "rollback refused again", service=service, reason=decision.reason, times=repeats
            )

    async def finish(
        self, rollback: Rollback, state: RollbackState, outcome: str, *, fence: Fence | None
    ) -> None:
        """End a rollback as succeeded or failed, and say so. ``fence``: the lease the
        rollback runs under (FencedError, and nothing said, when it is lost)."""
        done = await self.writer.set_rollback_state(
            rollback.id, state, self.clock(), outcome=outcome, fence=fence
        )
        kind = "rollback.succeeded" if state is RollbackState.SUCCEEDED else "rollback.failed"
        await self.rollback_event(kind, done, {"outcome": outcome})

    async def freeze(self, service: str, reason: str, now: float) -> None:
        """Freeze and page, once: a service already frozen keeps its first reason, and
        a storm of refused triggers does not page again."""
        async with self._freezing.hold(service):
            state = self.store.service_state(service)
            if state is not None and state.frozen:
                return
            await self.writer.set_frozen(service, True, reason)
            await self.bus.publish("service.frozen", now, service, data={"reason": reason})
