"""``rollbackd eval``: one pass of every check against Prometheus now, changing nothing.

It runs the engine's own ``evaluate`` (the same queries, judging and baselines as the
daemon) on a throw-away state store, so it never touches the daemon's records.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollbackd.checks.compare_judge import evidence_json
from rollbackd.checks.judge import Measurement
from rollbackd.cli.replay import version_timeline
from rollbackd.config.loader import LoadedConfig, Service
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.store.sqlite import Store
from rollbackd.store.writer import writer_for


@dataclass(frozen=True)
class ServicePass:
    service: str
    version: str | None
    canary: bool
    measurements: list[Measurement]

    def as_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "version": self.version,
            "canary": self.canary,
            "checks": [
                {
                    "check": m.check,
                    "series": dict(m.labels),
                    "value": None if m.value is None or math.isnan(m.value) else m.value,
                    "threshold": str(m.threshold) if m.threshold else None,
                    "baseline": (
                        {"value": m.baseline.value, "source": m.baseline.source}
                        if m.baseline
                        else None
                    ),
                    "verdict": m.verdict.value,
                    "reason": m.reason,
                    "query": m.query,
                    "evidence": None if m.evidence is None else evidence_json(m.evidence),
                }
                for m in self.measurements
            ],
        }


RELEASE_LOOKBACK = 86_400.0
"""How far back ``eval`` reads version_query to find when the running version went live."""


def release_time(client: PrometheusClient, service: Service, at: float) -> float | None:
    """When the version running at ``at`` went live, as version_query's history over the
    day before shows it (the daemon knows it from its store; ``eval`` keeps none). Only
    needed by checks counting since the release; None without version_query."""
    if not any(c.counts_since_release for c in service.rules.check):
        return None
    if not service.rules.service.version_query:
        return None
    step = min(c.interval.total_seconds() for c in service.rules.check)
    timeline = version_timeline(client, service, at - RELEASE_LOOKBACK, at, max(step, 60.0))
    return timeline.at(at)[1]


async def evaluate_once(
    loaded: LoadedConfig,
    services: Sequence[Service],
    now: float | None = None,
    *,
    since: float | None = None,
) -> list[ServicePass]:
    """``since``: when the running versions went live, for checks counting since the
    release (default: ``release_time``)."""
    at = time.time() if now is None else now
    client = PrometheusClient(loaded.config.prometheus)
    with tempfile.TemporaryDirectory(prefix="rollbackd-eval-") as scratch:
        store = Store(Path(scratch) / "eval.db")
        try:
            engine = Engine(loaded, client, store)
            passes = []
            for service in services:
                await engine.observe_service(service, at)
                measurements: list[Measurement] = []
                went_live = since if since is not None else release_time(client, service, at)
                for check in service.rules.check:
                    measurements.extend(await engine.evaluate(service, check, at, since=went_live))
                passes.append(
                    ServicePass(
                        service.name,
                        engine.versions.current(service.name),
                        engine.canary_active(service.name),
                        measurements,
                    )
                )
            return passes
        finally:
            writer_for(store).close()
            store.close()
