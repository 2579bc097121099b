"""The whole pipeline against a real Prometheus scraping simulated services whose version a
deploy command switches: a bad release is rolled back exactly once and verified; a bad canary
is aborted without a full rollback; a rollback that does not verify freezes the service."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rollbackd.core.model import RollbackState
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.runner import Runner
from rollbackd.store.sqlite import Store
from support.configs import load_config
from support.fake_service import FakeService
from support.prometheus import PrometheusServer, ScrapeTarget

pytestmark = pytest.mark.prometheus

SUPPORT = Path(__file__).parent / "support"
DEPLOY = str(SUPPORT / "deploy.py")
RECORD = str(SUPPORT / "record_run.py")


def command(argv: list[str]) -> str:
    return f'{{ type = "command", argv = {json.dumps(argv)}, timeout = "20s" }}'


def rules(rollback: list[list[str]], canary_abort: list[str] | None = None) -> str:
    canary = ""
    if canary_abort is not None:
        canary = (
            "[canary]\nactive_query = "
            "'count(count by (version) (app_build_info{service=\"checkout\"})) > 1'\n"
            f"abort = [{command(canary_abort)}]\n"
        )
    chain = "\n".join(
        f'[[rollback]]\ntype = "command"\nargv = {json.dumps(argv)}\ntimeout = "20s"\n'
        for argv in rollback
    )
    return f"""
[service]
name = "checkout"
version_query = 'max by (version) (app_build_info{{service="checkout"}})'
version_label = "version"
bake_time = "1m"
{canary}
{chain}
[verify]
window = "2s"
version_timeout = "5s"

[[check]]
name = "errors"
type = "error_rate"
selector = 'service="checkout"'
errors = 'code=~"5.."'
above = 0.1
window = "10s"
breaches = 2
interval = "1s"
"""


class World:
    def __init__(self, tmp_path: Path, prometheus: PrometheusServer, text: str) -> None:
        loaded = load_config(tmp_path, prometheus.url, {"checkout": text})
        self.prometheus = prometheus
        self.store = Store(tmp_path / "state.db")
        self.engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), self.store)
        self.pipeline = Pipeline(self.engine)
        self.runner = Runner(self.engine, self.pipeline.on_fire)
        self.service = loaded.services["checkout"]

    async def bake_current(self) -> None:
        now = time.time()
        await self.runner.tick(now)
        assert await self.engine.bake(self.service, now + 61) is not None

    def events(self) -> list[str]:
        return [
            e.type
            for e in reversed(self.store.events(limit=1000))
            if e.type.startswith(("rollback.", "canary.", "verify.", "service."))
        ]


@pytest.fixture
def worlds() -> Iterator[list[World]]:
    made: list[World] = []
    yield made
    for world in made:
        world.store.close()


def await_versions(prometheus: PrometheusServer, *versions: str) -> None:
    prometheus.wait_for(
        'sum by (version) (rate(http_requests_total{service="checkout"}[10s]))',
        lambda result: (
            {s["metric"]["version"] for s in result if float(s["value"][1]) > 0} >= set(versions)
        ),
    )


async def fire(world: World) -> None:
    """Tick until the pipeline has something in flight (two breaching evaluations)."""
    for _ in range(40):
        await world.runner.tick(time.time())
        if world.store.rollbacks(limit=1):
            return
        await asyncio.sleep(0.25)  # poll: the next scrape brings new samples
    raise AssertionError("the check never fired")


async def test_bad_release_rolled_back_exactly_once_and_verified(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service: FakeService,
) -> None:
    log = tmp_path / "deploys.jsonl"
    deploy = [
        sys.executable,
        DEPLOY,
        f"{fake_service.url}/control",
        "{to_version}",
        "--log",
        str(log),
    ]
    prometheus = prometheus_factory(targets=[ScrapeTarget(fake_service.address)])
    await_versions(prometheus, "1.0.0")
    world = World(tmp_path, prometheus, rules([deploy]))
    await world.bake_current()

    fake_service.update(version="2.0.0", error_ratio=0.5)  # the bad release
    await_versions(prometheus, "2.0.0")
    await fire(world)
    await world.pipeline.wait_idle()

    [rollback] = world.store.rollbacks()
    assert rollback.state is RollbackState.SUCCEEDED, rollback.outcome
    assert (rollback.from_version, rollback.to_version) == ("2.0.0", "1.0.0")
    assert rollback.trigger["check"] == "errors"
    assert "error ratio" in str(rollback.trigger["reason"])
    assert fake_service.version == "1.0.0"
    assert [(s.kind, s.ok) for s in world.store.steps(rollback.id)] == [
        ("rollback", True),
        ("verify", True),
    ]
    assert world.events() == ["rollback.started", "rollback.succeeded"]
    # The daemon keeps watching: it reads 1.0.0 back (verification reads the version but
    # records nothing; the daemon's own polls do, once 2.0.0 has been missing for a poll),
    # the bad version's series no longer count, nothing repeats.
    for _ in range(40):
        await world.runner.tick(time.time())
        if world.engine.versions.current("checkout") == "1.0.0":
            break
        await asyncio.sleep(0.25)
    assert world.engine.versions.current("checkout") == "1.0.0"
    for _ in range(3):
        await world.runner.tick(time.time())
    await world.pipeline.wait_idle()
    assert len(world.store.rollbacks()) == 1
    assert len(log.read_text().splitlines()) == 1

    # Someone deploys the bad version again: flagged, and it is a new release — not joined
    # to the old rollback — which the cooldown now holds back.
    fake_service.update(version="2.0.0", error_ratio=0.5)
    world.prometheus.wait_for(
        'max by (version) (app_build_info{service="checkout"})',
        lambda result: [s["metric"]["version"] for s in result] == ["2.0.0"],
    )
    for _ in range(40):
        await world.runner.tick(time.time())
        if world.store.events(types=["rollback.refused"]):
            break
        await asyncio.sleep(0.25)
    [flagged] = world.store.events(types=["release.bad_version_deployed"])
    assert flagged.data["version"] == "2.0.0"
    [refused] = world.store.events(types=["rollback.refused"])
    assert "within cooldown 15m" in str(refused.data["reason"])
    assert len(log.read_text().splitlines()) == 1


async def test_bad_canary_is_aborted_without_a_full_rollback(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service_factory: Callable[..., FakeService],
) -> None:
    stable = fake_service_factory("checkout", "1.0.0", rps=18.0)
    canary = fake_service_factory("checkout", "1.0.0", rps=2.0)
    runs = tmp_path / "full-rollbacks.jsonl"
    abort = [sys.executable, DEPLOY, f"{canary.url}/control", "{to_version}"]
    prometheus = prometheus_factory(
        targets=[
            ScrapeTarget(stable.address, job="stable"),
            ScrapeTarget(canary.address, job="canary"),
        ]
    )
    await_versions(prometheus, "1.0.0")
    world = World(
        tmp_path, prometheus, rules([[sys.executable, RECORD, str(runs), "{to_version}"]], abort)
    )
    await world.bake_current()

    canary.update(version="2.0.0", error_ratio=0.5)  # the canary takes 10% of traffic
    await_versions(prometheus, "1.0.0", "2.0.0")
    await fire(world)
    await world.pipeline.wait_idle()

    [rollback] = world.store.rollbacks()
    assert rollback.state is RollbackState.SUCCEEDED, rollback.outcome
    assert rollback.canary
    assert [(s.kind, s.ok) for s in world.store.steps(rollback.id)] == [
        ("canary_abort", True),
        ("verify", True),
    ]
    assert world.events() == ["rollback.started", "canary.aborted", "rollback.succeeded"]
    assert not runs.exists()  # no full rollback ran
    assert canary.version == "1.0.0"


@pytest.mark.faults
async def test_verification_failure_freezes_the_service(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service: FakeService,
) -> None:
    runs = tmp_path / "runs.jsonl"
    useless = [sys.executable, RECORD, str(runs), "{to_version}"]  # "succeeds", changes nothing
    prometheus = prometheus_factory(targets=[ScrapeTarget(fake_service.address)])
    await_versions(prometheus, "1.0.0")
    world = World(tmp_path, prometheus, rules([useless]))
    await world.bake_current()
    fake_service.update(version="2.0.0", error_ratio=0.5)
    await_versions(prometheus, "2.0.0")
    await fire(world)
    await world.pipeline.wait_idle()

    [rollback] = world.store.rollbacks()
    assert rollback.state is RollbackState.FAILED
    assert rollback.outcome.startswith("verification failed: version reads '2.0.0', not '1.0.0'")
    assert world.events() == ["rollback.started", "verify.failed", "service.frozen"]
    state = world.store.service_state("checkout")
    assert state is not None and state.frozen
    assert len(runs.read_text().splitlines()) == 1  # no retry loop
