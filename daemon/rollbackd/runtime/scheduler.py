"""Runs the engine on a schedule: one APScheduler job per check (or per batch of checks that
share one query, see ``batching.py``), one per service for its version and canary, each at
its own interval with a jittered start. Each job goes through the ``Runner``, which hands
what fires to the pipeline.

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
    EVENT_JOB_SUBMITTED,
    JobEvent,
    JobSubmissionEvent,
)
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from rollbackd.checks.base import CheckSpec
from rollbackd.checks.batching import Batch
from rollbackd.config.loader import LoadedConfig, Service
from rollbackd.logs import get_logger
from rollbackd.runtime.runner import Runner

log = get_logger("rollbackd.scheduler")


def check_job_id(service: str, check: str) -> str:
    return f"check:{service}:{check}"


def service_job_id(service: str) -> str:
    return f"service:{service}"


_KINDS = ("check", "batch", "service")


class Scheduler:
    def __init__(self, runner: Runner, *, rng: random.Random | None = None) -> None:
        self.runner = runner
        self.engine = runner.engine
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not security)
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._scheduler.add_listener(
            self._on_job_event,
            EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED | EVENT_JOB_ERROR | EVENT_JOB_SUBMITTED,
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
        Unchanged checks keep their jobs, their timing and their state; a batch whose
        members and shape are unchanged keeps its job (its members' thresholds may change:
        it reads them at each run)."""
        old = self.engine.loaded
        self.engine.replace_config(loaded)
        plan = self.engine.plan
        wanted: dict[str, tuple[Service, CheckSpec | None]] = {}
        for service in loaded.services.values():
            wanted[service_job_id(service.name)] = (service, None)
        for service, spec in plan.singles:
            wanted[check_job_id(service.name, spec.name)] = (service, spec)
        for job in self._scheduler.get_jobs():
            if job.id.startswith(("check:", "service:", "batch:")) and not (
                job.id in wanted or job.id in plan.batches
            ):
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
        for batch in plan.batches.values():
            if self._scheduler.get_job(batch.id) is None:
                self._add_batch(batch)

    def _schedule_all(self, loaded: LoadedConfig) -> None:
        plan = self.engine.plan
        for service in loaded.services.values():
            self._add(service, None)
        for service, check in plan.singles:
            self._add(service, check)
        for batch in plan.batches.values():
            self._add_batch(batch)

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
        self._add_job(job_id, func, interval, self._args(service, check))

    def _add_batch(self, batch: Batch) -> None:
        self._add_job(batch.id, self._run_batch, batch.interval, [batch.id])

    def _add_job(
        self,
        job_id: str,
        func: Callable[..., Awaitable[None]],
        interval: timedelta,
        args: list[Any],
    ) -> None:
        seconds = interval.total_seconds()
        # A jittered first run spreads thousands of checks over the interval instead of
        # sending them to Prometheus in one burst.
        first = datetime.now(UTC) + timedelta(seconds=self._rng.uniform(0, seconds))
        self._scheduler.add_job(
            func,
            IntervalTrigger(seconds=seconds, timezone=UTC),
            args=args,
            id=job_id,
            name=job_id,
            replace_existing=True,
            next_run_time=first,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(seconds)),
        )

    async def _run_check(self, service: Service, check: CheckSpec) -> None:
        await self.runner.run_check(service, check, time.time())

    async def _run_batch(self, batch_id: str) -> None:
        batch = self.engine.plan.batches.get(batch_id)
        if batch is not None:  # else a reload has just replaced it
            await self.runner.run_batch(batch, time.time())

    async def _run_service(self, service: Service) -> None:
        await self.runner.run_service(service, time.time())

    def _on_job_event(self, event: JobEvent) -> None:
        kind = event.job_id.split(":", 1)[0]
        metrics = self.engine.metrics
        if event.code == EVENT_JOB_SUBMITTED:
            if kind in _KINDS and isinstance(event, JobSubmissionEvent):
                due = max(event.scheduled_run_times, default=None)
                if due is not None:
                    late = (datetime.now(UTC) - due).total_seconds()
                    metrics.start_delay.labels(kind).observe(max(late, 0.0))
            return
        checks = self._checks_of(event.job_id)
        for service, check in checks:
            if event.code == EVENT_JOB_MAX_INSTANCES:
                metrics.overruns.labels(service, check).inc()
            elif event.code == EVENT_JOB_MISSED:
                metrics.missed.labels(service, check).inc()
        if not checks:
            return
        where: dict[str, Any] = (
            {"service": checks[0][0], "check": checks[0][1]}
            if kind == "check"
            else {"batch": event.job_id, "checks": len(checks)}
        )
        if event.code == EVENT_JOB_MAX_INSTANCES:
            log.warning("check overran its interval", **where)
        elif event.code == EVENT_JOB_MISSED:
            log.warning("check evaluation missed", **where)
        elif event.code == EVENT_JOB_ERROR:
            log.error(
                "check evaluation crashed",
                **where,
                error=repr(getattr(event, "exception", None)),
            )

    def _checks_of(self, job_id: str) -> list[tuple[str, str]]:
        """The (service, check) pairs a check or batch job evaluates."""
        if job_id.startswith("batch:"):
            batch = self.engine.plan.batches.get(job_id)
            return [] if batch is None else [m.key for m in batch.members]
        parts = job_id.split(":", 2)
        if len(parts) != 3 or parts[0] != "check":
            return []
        return [(parts[1], parts[2])]

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
