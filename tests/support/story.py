"""One service's story for end-to-end decision tests: its history backfilled into a real
Prometheus (``timeline.py``), and the daemon's real engine, pipeline, executors and
verifier judging it every 15 simulated seconds. A rollback's executor "takes" until the
timeline's next switch: when it has run, the clock jumps there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from rollbackd.api.app import create_app
from rollbackd.config.loader import load
from rollbackd.core.model import RollbackState
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.control import Control
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.runner import Runner
from rollbackd.runtime.verify import Verifier
from rollbackd.store.sqlite import Store

from .configs import write_config
from .daemon_process import set_mode
from .prometheus import PrometheusFactory
from .timeline import SERVICE, Timeline

API_TOKEN = "story-token-0123456789abcdef"

Rules = Callable[..., str]
"""The rule file for the story's service, given the executors' run log and options."""


class Story:
    """One service's story: its history in a real Prometheus, and the daemon's parts judging
    it every 15 simulated seconds."""

    def __init__(
        self,
        tmp_path: Path,
        factory: PrometheusFactory,
        timeline: Timeline,
        *,
        start: int,
        switches: tuple[int, ...] = (),
        mode: str = "auto",
        make_rules: Rules,
        **rule_options: bool,
    ) -> None:
        server = factory(start=False)
        timeline.backfill(server.storage_dir)
        server.start()
        server.wait_ready()
        self.log = tmp_path / "runs.jsonl"
        self.config = write_config(
            tmp_path, server.url, {SERVICE: make_rules(self.log, **rule_options)}
        )
        set_mode(self.config, mode)
        self.store = Store(tmp_path / "state.db")
        self.switches = switches
        self.now = float(start)
        self.restart()

    def restart(self) -> None:
        """A daemon (re)start on the same state store."""
        loaded = load(self.config)
        self.engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), self.store)
        verifier = Verifier(self.engine, clock=self.clock, sleep=self.sleep)
        self.pipeline = Pipeline(self.engine, clock=self.clock, verifier=verifier)
        self.runner = Runner(self.engine, self.pipeline.on_fire)

    def reload(self) -> None:
        self.engine.replace_config(load(self.config))

    def clock(self) -> float:
        # An executor that has run took until its switch: what the data shows from then on
        # is the service after it.
        runs = len(self.runs())
        if runs and runs <= len(self.switches) and self.now < self.switches[runs - 1]:
            self.now = float(self.switches[runs - 1])
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)

    async def run_until(self, end: int, step: int = 15) -> None:
        while self.clock() < end:
            await self.runner.tick(self.now)
            await self.pipeline.housekeeping()
            await self.pipeline.wait_idle()
            self.now += step

    def runs(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line)["argv"] for line in self.log.read_text().splitlines()]

    def rollbacks(self) -> list[tuple[str | None, str | None, RollbackState]]:
        return [
            (r.from_version, r.to_version, r.state)
            for r in reversed(self.store.rollbacks(service=SERVICE))
        ]

    def events(self, *prefixes: str) -> list[str]:
        wanted = prefixes or ("rollback.", "canary.", "verify.", "service.")
        return [
            e.type for e in reversed(self.store.events(limit=5000)) if e.type.startswith(wanted)
        ]

    async def status(self) -> dict[str, Any]:
        """``GET /api/v1/status`` of an API over the story's pipeline, as ``rollbackd
        status`` reads it."""
        app = create_app(
            control=Control(self.pipeline),
            registry=CollectorRegistry(),
            token=API_TOKEN,
            max_body=65536,
            clock=self.clock,
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://rollbackd.test",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
        ) as client:
            answer = await client.get("/api/v1/status")
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found

    def baked(self, version: str) -> bool:
        record = self.store.version(SERVICE, version)
        return record is not None and record.baked_at is not None


@contextmanager
def stories(tmp_path: Path, factory: PrometheusFactory, make_rules: Rules) -> Iterator[type[Story]]:
    """A Story class for one test, whose stories use ``make_rules``; their stores close at
    the end."""
    made: list[Story] = []

    class Made(Story):
        def __init__(self, timeline: Timeline, **kwargs: object) -> None:
            super().__init__(
                tmp_path / f"story-{len(made)}",
                factory,
                timeline,
                make_rules=make_rules,
                **kwargs,  # type: ignore[arg-type]
            )
            made.append(self)

    try:
        yield Made
    finally:
        for s in made:
            s.store.close()
