"""The engine against a real Prometheus scraping a simulated service: version changes are
recorded, baked into the last known good, survive restarts, and a change made while the
daemon was down is detected at start."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rollbackd.core.samples import Verdict
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.store.sqlite import Store
from support.configs import load_config, service
from support.fake_service import FakeService
from support.prometheus import PrometheusServer, ScrapeTarget

pytestmark = pytest.mark.prometheus

HEADER = """
version_query = 'max by (version) (app_build_info{service="checkout"})'
version_label = "version"
bake_time = "5m"
"""
CHECK = """
[[check]]
name = "errors"
type = "error_rate"
selector = 'service="checkout"'
errors = 'code=~"5.."'
above = 0.05
window = "10s"
breaches = 2
interval = "1s"
"""


def engine(tmp_path: Path, prometheus: PrometheusServer) -> Engine:
    loaded = load_config(
        tmp_path, prometheus.url, {"checkout": service("checkout", CHECK, header=HEADER)}
    )
    return Engine(loaded, PrometheusClient(loaded.config.prometheus), Store(tmp_path / "s.db"))


def serving(prometheus: PrometheusServer, version: str) -> None:
    """Await Prometheus seeing ``version`` as the only one running."""
    prometheus.wait_for(
        'max by (version) (app_build_info{service="checkout"})',
        lambda result: [s["metric"].get("version") for s in result] == [version],
    )


@pytest.mark.faults
async def test_version_change_recorded_baked_and_surviving_restart(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service: FakeService,
) -> None:
    prometheus = prometheus_factory(targets=[ScrapeTarget(fake_service.address)])
    serving(prometheus, "1.0.0")
    # Baking needs evidence: the check judged 1.0.0 on its own traffic.
    prometheus.wait_for(
        'sum(rate(http_requests_total{service="checkout", version="1.0.0"}[10s])) > 0'
    )
    first = engine(tmp_path, prometheus)
    now = time.time()
    await first.tick(now)
    assert first.versions.current("checkout") == "1.0.0"
    # Healthy for bake_time: 1.0.0 becomes the last known good.
    assert await first.bake(first.loaded.services["checkout"], now + 301) == "1.0.0"

    fake_service.update(version="2.0.0", error_ratio=0.5)
    serving(prometheus, "2.0.0")
    await first.tick(time.time())
    assert first.versions.current("checkout") == "2.0.0"
    assert first.versions.last_known_good("checkout") == "1.0.0"
    [change, *_] = first.store.version_changes("checkout")
    assert (change.from_version, change.to_version) == ("1.0.0", "2.0.0")
    changed = first.store.events(service="checkout", types=["version.changed"])
    assert [e.data["to_version"] for e in changed] == ["2.0.0", "1.0.0"]
    first.store.close()

    # A restart on the same state: the same version is not a change.
    again = engine(tmp_path, prometheus)
    await again.tick(time.time())
    assert again.versions.current("checkout") == "2.0.0"
    assert len(again.store.version_changes("checkout")) == 2
    again.store.close()

    # The daemon is down while 3.0.0 goes out: detected at start.
    fake_service.update(version="3.0.0", error_ratio=0.0)
    serving(prometheus, "3.0.0")
    later = engine(tmp_path, prometheus)
    await later.tick(time.time())
    [latest] = later.store.events(service="checkout", types=["version.changed"], limit=1)
    assert latest.data == {
        "from_version": "2.0.0",
        "to_version": "3.0.0",
        "detected_at_start": True,
    }
    later.store.close()


async def test_bad_release_fires_on_its_own_series_within_a_few_scrapes(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service: FakeService,
) -> None:
    prometheus = prometheus_factory(targets=[ScrapeTarget(fake_service.address)])
    serving(prometheus, "1.0.0")
    watcher = engine(tmp_path, prometheus)
    prometheus.wait_for('sum(rate(http_requests_total{service="checkout"}[10s])) > 0')
    [healthy] = await watcher.tick(time.time())
    assert healthy.verdict is Verdict.OK

    fake_service.update(version="2.0.0", error_ratio=0.3)
    prometheus.wait_for(
        'sum by (version) (rate(http_requests_total{service="checkout", version="2.0.0"}[10s])) > 0'
    )
    verdicts = [(await watcher.tick(time.time()))[0] for _ in range(2)]
    assert [v.verdict for v in verdicts] == [Verdict.BREACH, Verdict.BREACH]
    assert verdicts[-1].measurements[0].labels == (("version", "2.0.0"),)
    assert watcher.check_state("checkout", "errors").firing
    watcher.store.close()
