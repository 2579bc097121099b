"""The store's writes, off the event loop: one writer thread that the loop awaits.

A commit waits for the disk (``synchronous=FULL``: an fsync per transaction). On the
event-loop thread a slow device would stall every check, the API and the watchdog; here
it slows only the coroutine that waits for its own write. One thread, so writes keep the
order they were asked in and never contend with each other for SQLite's write lock.

Reads stay direct calls on the store: they do not wait for the disk's fsync (WAL readers
see the last committed state without blocking on a writer).
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from rollbackd.core.model import (
    AlertDraft,
    Event,
    Fence,
    Handoff,
    HandoffDraft,
    JSONValue,
    Rollback,
    RollbackDraft,
    RollbackState,
    StoredAlert,
    VersionSource,
)
from rollbackd.store.interfaces import StateStore

P = ParamSpec("P")
T = TypeVar("T")

_WRITERS: weakref.WeakKeyDictionary[StateStore, StoreWriter] = weakref.WeakKeyDictionary()


def writer_for(store: StateStore) -> StoreWriter:
    """The one writer of ``store``: every component writing to it shares the same thread,
    so writes keep the order they were asked in."""
    writer = _WRITERS.get(store)
    if writer is None:
        writer = _WRITERS[store] = StoreWriter(store)
    return writer


class StoreWriter:
    """Awaitable twins of the store's write methods, each run on the writer thread."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, functools.partial(fn, *args, **kwargs))

    async def drain(self) -> None:
        """Wait until every write asked for before this call is done. A write whose caller
        was cancelled still runs on the thread: whoever must read it drains first."""
        await self._run(lambda: None)

    def close(self) -> None:
        """Waits for the writes already asked for, then ends the thread."""
        self._thread.shutdown(wait=True)

    async def record_version_change(
        self,
        service: str,
        from_version: str | None,
        to_version: str,
        at: float,
        source: VersionSource,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        await self._run(
            self.store.record_version_change, service, from_version, to_version, at, source, meta
        )

    async def touch_versions(self, seen: Sequence[tuple[str, str, float]]) -> None:
        await self._run(self.store.touch_versions, seen)

    async def mark_baked(self, service: str, version: str, at: float) -> bool:
        return await self._run(self.store.mark_baked, service, version, at)

    async def mark_bad(self, service: str, version: str, reason: str) -> bool:
        return await self._run(self.store.mark_bad, service, version, reason)

    async def set_healthy_since(self, service: str, at: float | None) -> None:
        await self._run(self.store.set_healthy_since, service, at)

    async def set_frozen(self, service: str, frozen: bool, reason: str | None = None) -> None:
        await self._run(self.store.set_frozen, service, frozen, reason)

    async def save_check_state(self, service: str, check: str, state: str, at: float) -> None:
        await self._run(self.store.save_check_state, service, check, state, at)

    async def delete_check_state(self, service: str, check: str) -> None:
        await self._run(self.store.delete_check_state, service, check)

    async def create_rollback(
        self, draft: RollbackDraft, *, fence: Fence | None = None
    ) -> Rollback:
        return await self._run(self.store.create_rollback, draft, fence=fence)

    async def set_rollback_state(
        self,
        rollback_id: int,
        state: RollbackState,
        at: float,
        *,
        expected: Sequence[RollbackState] | None = None,
        outcome: str | None = None,
        decided_by: str | None = None,
        to_version: str | None = None,
        canary: bool | None = None,
        fence: Fence | None = None,
    ) -> Rollback:
        return await self._run(
            self.store.set_rollback_state,
            rollback_id,
            state,
            at,
            expected=expected,
            outcome=outcome,
            decided_by=decided_by,
            to_version=to_version,
            canary=canary,
            fence=fence,
        )

    async def add_trigger(
        self, rollback_id: int, at: float, source: str, detail: Mapping[str, JSONValue]
    ) -> int:
        return await self._run(self.store.add_trigger, rollback_id, at, source, detail)

    async def start_step(self, rollback_id: int, kind: str, executor: str, at: float) -> int:
        return await self._run(self.store.start_step, rollback_id, kind, executor, at)

    async def finish_step(
        self,
        step_id: int,
        at: float,
        ok: bool,
        summary: str,
        stdout_tail: str = "",
        stderr_tail: str = "",
        command: Sequence[str] = (),
    ) -> None:
        await self._run(
            self.store.finish_step, step_id, at, ok, summary, stdout_tail, stderr_tail, command
        )

    async def set_pause(self, scope: str, paused: bool, at: float, who: str = "") -> None:
        await self._run(self.store.set_pause, scope, paused, at, who)

    async def record_alerts(
        self, drafts: Sequence[AlertDraft], received_at: float
    ) -> list[tuple[StoredAlert, bool]]:
        return await self._run(self.store.record_alerts, drafts, received_at)

    async def set_alert_handled(
        self, alert_id: int, at: float, outcome: str, rollback_id: int | None = None
    ) -> None:
        await self._run(self.store.set_alert_handled, alert_id, at, outcome, rollback_id)

    async def add_event(self, event: Event) -> int:
        return await self._run(self.store.add_event, event)

    async def hand_off(self, draft: HandoffDraft, at: float) -> int:
        return await self._run(self.store.hand_off, draft, at)

    async def take_handoffs(
        self, taker: str, services: Sequence[str], at: float, limit: int = 100
    ) -> list[Handoff]:
        return await self._run(self.store.take_handoffs, taker, services, at, limit)

    async def answer_handoff(
        self, handoff_id: int, answer: Mapping[str, JSONValue], at: float
    ) -> None:
        await self._run(self.store.answer_handoff, handoff_id, answer, at)

    async def withdraw_handoff(self, handoff_id: int, at: float) -> bool:
        return await self._run(self.store.withdraw_handoff, handoff_id, at)
