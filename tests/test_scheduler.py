"""The scheduler: one job per check and per service, never two runs of a check at once,
and a reload that replaces only what changed."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from rollbackd.core.check_state import CheckState, SeriesState
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.runner import Runner
from rollbackd.runtime.scheduler import Scheduler
from rollbackd.store.sqlite import Store
from support.configs import load_config, service
from support.prometheus import PrometheusServer

pytestmark = pytest.mark.prometheus


def check(name: str, interval: str = "1s", above: float = 0.05) -> str:
    return (
        f'[[check]]\nname = "{name}"\ntype = "error_rate"\nerrors = \'code="500"\'\n'
        f'above = {above}\ninterval = "{interval}"\n'
    )


async def evaluated(engine: Engine, service_name: str, check_name: str, times: int) -> None:
    """Await ``times`` evaluations of a check, as counted by the daemon's own metrics."""

    def count() -> float:
        total = 0.0
        for verdict in ("ok", "breach", "no_data", "error"):
            total += (
                engine.metrics.registry.get_sample_value(
                    "rollbackd_check_evaluations_total",
                    {"service": service_name, "check": check_name, "verdict": verdict},
                )
                or 0.0
            )
        return total

    for _ in range(400):
        if count() >= times:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{check_name} evaluated {count()} times, wanted {times}")


async def test_jobs_run_and_reload_replaces_only_what_changed(
    tmp_path: Path, backfilled_prometheus: PrometheusServer
) -> None:
    url = backfilled_prometheus.url
    loaded = load_config(tmp_path, url, {"a": service("a", check("keep") + check("change"))})
    engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), Store(tmp_path / "s.db"))
    scheduler = Scheduler(Runner(engine), rng=random.Random(7))
    scheduler.start()
    try:
        assert scheduler.job_ids() == ["check:a:change", "check:a:keep", "service:a"]
        for job in scheduler._scheduler.get_jobs():
            assert (job.max_instances, job.coalesce) == (1, True)
        await evaluated(engine, "a", "keep", 2)
        await evaluated(engine, "a", "change", 2)

        # Mark the unchanged check's state so a reset would show.
        marker = CheckState(series={(): SeriesState(breach_count=42)})
        engine.states[("a", "keep")] = marker
        keep_next = scheduler._scheduler.get_job("check:a:keep").next_run_time

        reloaded = load_config(
            tmp_path,
            url,
            {"a": service("a", check("keep") + check("change", above=0.5) + check("new"))},
        )
        scheduler.reload(reloaded)
        assert scheduler.job_ids() == ["check:a:change", "check:a:keep", "check:a:new", "service:a"]
        assert engine.states[("a", "keep")] is marker
        assert ("a", "change") in engine.states  # kept by name, though its threshold changed
        job = scheduler._scheduler.get_job("check:a:keep")
        assert job.next_run_time >= keep_next  # kept its timing, not rescheduled from zero
        await evaluated(engine, "a", "new", 1)
        changed = next(c for c in engine.loaded.services["a"].rules.check if c.name == "change")
        assert changed.threshold().value == 0.5

        # A service removed from the rules: its jobs go.
        scheduler.reload(load_config(tmp_path / "b", url, {"b": service("b", check("x"))}))
        assert scheduler.job_ids() == ["check:b:x", "service:b"]
    finally:
        scheduler.shutdown()
        engine.store.close()
