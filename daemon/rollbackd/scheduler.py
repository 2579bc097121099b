"""Runs the engine on a schedule: one APScheduler job per check, one per service for its
version and canary, each at its own interval with a jittered start.

``max_instances=1`` means a check never runs twice at once; a run that comes due while the
previous still runs is skipped and counted as an overrun. ``coalesce=True`` turns a backlog
of missed runs into one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
)
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from rollbackd.checks.base import CheckSpec
from rollbackd.engine import Engine
from rollbackd.loader import LoadedConfig, Service
from rollbackd.logs import get_logger

log = get_logger("rollbackd.scheduler")


def check_job_id(service: str, check: str) -> str:
    return f"check:{service}:{check}"


def service_job_id(service: str) -> str:
    return f"service:{service}"


class Scheduler:
    def __init__(self, engine: Engine, *, rng: random.Random | None = None) -> None:
        self.engine = engine
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not security)
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._scheduler.add_listener(
            self._on_job_event, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED | EVENT_JOB_ERROR
        )

    def start(self) -> None:
        """Schedule every job; must be called inside the running event loop."""
        self._schedule_all(self.engine.loaded)
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def reload(self, loaded: LoadedConfig) -> None:
        """Replace jobs whose check or service changed, remove the ones gone, add new ones.
        Unchanged checks keep their jobs, their timing and their state."""
        old = self.engine.loaded
        self.engine.replace_config(loaded)
        wanted: dict[str, tuple[Service, CheckSpec | None]] = {}
        for service in loaded.services.values():
            wanted[service_job_id(service.name)] = (service, None)
            for spec in service.rules.check:
                wanted[check_job_id(service.name, spec.name)] = (service, spec)
        for job in self._scheduler.get_jobs():
            if job.id not in wanted and job.id.startswith(("check:", "service:")):
                job.remove()
        for job_id, (service, check) in wanted.items():
            before = old.services.get(service.name)
            unchanged = (
                before is not None
                and self._scheduler.get_job(job_id) is not None
                and (
                    before.rules == service.rules if check is None else check in before.rules.check
                )
            )
            if unchanged:
                # Same definition: keep timing, but run against the new Service object.
                self._scheduler.modify_job(job_id, args=self._args(service, check))
            else:
                self._add(service, check)

    def _schedule_all(self, loaded: LoadedConfig) -> None:
        for service in loaded.services.values():
            self._add(service, None)
            for check in service.rules.check:
                self._add(service, check)

    def _args(self, service: Service, check: CheckSpec | None) -> list[Any]:
        return [service] if check is None else [service, check]

    def _add(self, service: Service, check: CheckSpec | None) -> None:
        func: Callable[..., Awaitable[None]]
        if check is None:
            intervals = [c.interval for c in service.rules.check] or [timedelta(seconds=15)]
            interval = min(intervals)
            job_id, func = service_job_id(service.name), self._run_service
        else:
            interval = check.interval
            job_id, func = check_job_id(service.name, check.name), self._run_check
        seconds = interval.total_seconds()
        # A jittered first run spreads thousands of checks over the interval instead of
        # sending them to Prometheus in one burst.
        first = datetime.now(UTC) + timedelta(seconds=self._rng.uniform(0, seconds))
        self._scheduler.add_job(
            func,
            IntervalTrigger(seconds=seconds, timezone=UTC),
            args=self._args(service, check),
            id=job_id,
            name=job_id,
            replace_existing=True,
            next_run_time=first,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(seconds)),
        )

    async def _run_check(self, service: Service, check: CheckSpec) -> None:
        await self.engine.run_check(service, check, time.time())

    async def _run_service(self, service: Service) -> None:
        now = time.time()
        await self.engine.observe_service(service, now)
        await self.engine.bake(service, now)

    def _on_job_event(self, event: JobEvent) -> None:
        parts = event.job_id.split(":", 2)
        if len(parts) != 3:
            return
        _, service, check = parts
        metrics = self.engine.metrics
        if event.code == EVENT_JOB_MAX_INSTANCES:
            metrics.overruns.labels(service, check).inc()
            log.warning("check overran its interval", service=service, check=check)
        elif event.code == EVENT_JOB_MISSED:
            metrics.missed.labels(service, check).inc()
            log.warning("check evaluation missed", service=service, check=check)
        elif event.code == EVENT_JOB_ERROR:
            log.error(
                "check evaluation crashed",
                service=service,
                check=check,
                error=repr(getattr(event, "exception", None)),
            )

    def add_periodic(
        self, job_id: str, func: Callable[[], Awaitable[object]], seconds: float
    ) -> None:
        """A housekeeping job (approval expiry, say) beside the checks."""
        self._scheduler.add_job(
            func,
            IntervalTrigger(seconds=seconds, timezone=UTC),
            id=job_id,
            name=job_id,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
        )

    def job_ids(self) -> list[str]:
        return sorted(job.id for job in self._scheduler.get_jobs())
