"""One lock per service, so that each read-decide-write about a service runs alone.

A decision reads (is there a rollback for this release? what do the guards see?) and then
writes, with awaits in between since writes run on the store's writer thread. Two triggers
for one service — a check and an alert, a webhook storm, a sweep and an approval — must not
interleave there, or both would see "no rollback yet" and both act.

``asyncio.Lock`` is not re-entrant: a task that takes its service's lock again would wait
for itself forever. ``hold`` refuses that with an error instead, so the bug shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


class ServiceLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, asyncio.Task[Any]] = {}

    @asynccontextmanager
    async def hold(self, service: str) -> AsyncIterator[None]:
        """Hold ``service``'s lock for the block. Never across an executor run or a
        verification (those take minutes): they run as tasks of their own."""
        task = asyncio.current_task()
        if task is not None and self._holders.get(service) is task:
            raise RuntimeError(f"this task already holds the lock of service {service!r}")
        lock = self._locks.setdefault(service, asyncio.Lock())
        async with lock:
            if task is not None:
                self._holders[service] = task
            try:
                yield
            finally:
                self._holders.pop(service, None)
