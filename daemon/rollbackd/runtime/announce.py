"""A rollback's events, and the writes that end in one, shared by deciding, executing and
recovering: the standard payload of a rollback's event, finishing a rollback, freezing a
service (which pages, once)."""

from __future__ import annotations

from collections.abc import Callable

from rollbackd.core.model import JSONValue, Rollback, RollbackState
from rollbackd.runtime.bus import EventBus
from rollbackd.runtime.service_locks import ServiceLocks
from rollbackd.store.interfaces import StateStore
from rollbackd.store.writer import writer_for


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

    async def finish(self, rollback: Rollback, state: RollbackState, outcome: str) -> None:
        """End a rollback as succeeded or failed, and say so."""
        done = await self.writer.set_rollback_state(
            rollback.id, state, self.clock(), outcome=outcome
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
