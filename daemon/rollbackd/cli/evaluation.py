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

from rollbackd.checks.judge import Measurement
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
                }
                for m in self.measurements
            ],
        }


async def evaluate_once(
    loaded: LoadedConfig, services: Sequence[Service], now: float | None = None
) -> list[ServicePass]:
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
                for check in service.rules.check:
                    measurements.extend(await engine.evaluate(service, check, at))
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
