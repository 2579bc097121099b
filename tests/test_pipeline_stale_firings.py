"""A firing judged for a version that is no longer current when it is decided: the race a
new holder runs into after a takeover (found by ``test_ha_failover.py`` about once in ten
runs). The new holder evaluates the service before its first version poll, so it judges
the old version's series (still inside the rate window); its poll then records the version
the executor switched to, before the firing is decided. Decided against the new version,
the firing was refused as "rollback 1 in flight" (a spurious ``rollback.refused``).

Deterministic and in process: a real Prometheus holding the service's history (backfilled,
``support/timeline.py``), one SQLite store, and two sets of the daemon's parts on it — the
holder that started the rollback and died (``interrupt_all``: the rollback stays running,
for its next holder to verify), then the new holder, whose evaluation, version poll and
hand-over are called one after the other in the racy order.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollbackd.config.loader import Service, load
from rollbackd.core.model import RollbackState
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.firings import CheckEvaluation
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.runner import Runner
from rollbackd.store.sqlite import Store
from support.configs import write_config
from support.prometheus import PrometheusFactory
from support.timeline import SERVICE, STEP, VERSION_QUERY, Segment, Timeline, origin

pytestmark = pytest.mark.prometheus

RECORD = str(Path(__file__).parent / "support" / "record_run.py")
MIN = 60


def rules(log: Path) -> str:
    """Version-scoped error rate (the defaults: 1m rate, 15s interval, 3 breaches), rolled
    back by an executor that records its run and never ends (the holder dies during it)."""
    argv = [sys.executable, RECORD, str(log), "{to_version}", "--hang"]
    return f"""
[service]
name = "{SERVICE}"
version_query = '{VERSION_QUERY}'
version_label = "version"

[[rollback]]
type = "command"
argv = {json.dumps(argv)}
timeout = "10m"

[[check]]
name = "error-rate"
type = "error_rate"
selector = 'service="{SERVICE}"'
errors = 'code=~"5.."'
above = 0.05
"""


class Daemon:
    """One daemon's parts on the shared store: engine, pipeline, runner."""

    def __init__(self, config: Path, store: Store) -> None:
        loaded = load(config)
        self.engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), store)
        self.pipeline = Pipeline(self.engine, clock=lambda: self.now)
        self.runner = Runner(self.engine, self.pipeline.on_fire)
        self.now = 0.0

    @property
    def service(self) -> Service:
        return self.engine.loaded.services[SERVICE]

    async def evaluate(self, now: float) -> CheckEvaluation:
        """The service's check evaluated, its firings not handed over yet."""
        self.now = now
        [check] = self.service.rules.check
        return await self.engine.run_check(self.service, check, now)

    async def poll_version(self, now: float, until: str) -> float:
        """The service's version polled every interval until it reads ``until`` (bounded:
        a known version takes over from a missing one after a poll's grace); the time then."""
        for _ in range(5):
            self.now = now
            await self.engine.observe_service(self.service, now)
            if self.engine.versions.current(SERVICE) == until:
                return now
            now += STEP
        raise AssertionError(f"{SERVICE} never read {until}")


class World:
    def __init__(self, tmp_path: Path, factory: PrometheusFactory, timeline: Timeline) -> None:
        server = factory(start=False)
        timeline.backfill(server.storage_dir)
        server.start()
        server.wait_ready()
        self.log = tmp_path / "runs.jsonl"
        self.config = write_config(tmp_path, server.url, {SERVICE: rules(self.log)})
        self.store = Store(tmp_path / "state.db")

    def daemon(self) -> Daemon:
        return Daemon(self.config, self.store)

    def runs(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line)["argv"] for line in self.log.read_text().splitlines()]

    def events(self, kind: str) -> list[str]:
        return [e.type for e in self.store.events(types=[kind], limit=1000)]


@pytest.fixture
def world(tmp_path: Path, prometheus_factory: PrometheusFactory) -> Iterator[type[World]]:
    made: list[World] = []

    class Made(World):
        def __init__(self, timeline: Timeline) -> None:
            super().__init__(tmp_path / f"world-{len(made)}", prometheus_factory, timeline)
            made.append(self)

    yield Made
    for w in made:
        w.store.close()


async def judge_until_a_rollback(daemon: Daemon, start: int, end: int) -> None:
    """Tick the daemon every interval from ``start`` until it has created a rollback."""
    now = float(start)
    while now < end:
        daemon.now = now
        await daemon.runner.tick(now)
        await daemon.pipeline.housekeeping()
        if daemon.engine.store.rollbacks(service=SERVICE, limit=1):
            return
        now += STEP
    raise AssertionError("no rollback was started")


async def test_a_new_holder_joins_the_rollback_in_flight_with_a_firing_of_the_old_version(
    world: type[World],
) -> None:
    t0 = origin()
    release, switch = t0 + 30 * MIN, t0 + 33 * MIN
    w = world(
        Timeline(
            [
                Segment("1.0.0", t0, release - STEP),
                Segment("2.0.0", release, switch - STEP, error_ratio=0.3),
                Segment("1.0.0", switch, switch + 20 * MIN),
            ]
        )
    )
    holder = w.daemon()
    await judge_until_a_rollback(holder, t0, switch)
    [rollback] = w.store.rollbacks(service=SERVICE)
    assert (rollback.from_version, rollback.to_version) == ("2.0.0", "1.0.0")
    for _ in range(1000):  # poll, bounded: the executor has started
        if w.runs():
            break
        await asyncio.sleep(0.01)
    assert w.runs() == [["1.0.0", "--hang"]]
    # The holder dies while its executor switches the service: the rollback stays running.
    await holder.pipeline.interrupt_all("the holder died")
    running = w.store.rollback(rollback.id)
    assert running is not None and running.state is RollbackState.RUNNING

    # The new holder, after the switch: it judges before its first version poll, so
    # against 2.0.0 (the store's current version), whose series is still in the rate
    # window; then its poll records 1.0.0; then the firing is decided.
    taker = w.daemon()
    evaluation = await taker.evaluate(switch + STEP)
    assert [dict(labels)["version"] for labels in evaluation.fired] == ["2.0.0"]
    taker.now = await taker.poll_version(switch + STEP, until="1.0.0")
    await taker.runner.hand_over(evaluation)
    await taker.pipeline.wait_idle()

    assert w.events("rollback.refused") == []
    assert [r.id for r in w.store.rollbacks(service=SERVICE)] == [rollback.id]
    [joined] = w.store.triggers(rollback.id)
    assert joined.source == "check"
    assert w.runs() == [["1.0.0", "--hang"]]  # nothing started again


async def test_a_firing_of_a_replaced_version_without_a_rollback_is_dropped(
    world: type[World],
) -> None:
    """2.0.0 fired with nothing to act (the firing not handed over), and 3.0.0 replaced it
    before its firing was decided: nothing is decided against 3.0.0, nothing announced."""
    t0 = origin()
    release, fixed = t0 + 30 * MIN, t0 + 33 * MIN
    w = world(
        Timeline(
            [
                Segment("1.0.0", t0, release - STEP),
                Segment("2.0.0", release, fixed - STEP, error_ratio=0.3),
                Segment("3.0.0", fixed, fixed + 20 * MIN),
            ]
        )
    )
    judge = w.daemon()
    judge.runner.on_fire = None  # evaluating only: nothing is handed to its pipeline
    now = float(t0)
    while now < fixed:
        judge.now = now
        await judge.runner.tick(now)
        now += STEP
    assert judge.engine.check_state(SERVICE, "error-rate").firing

    decider = w.daemon()
    evaluation = await decider.evaluate(fixed + STEP)
    assert [dict(labels)["version"] for labels in evaluation.fired] == ["2.0.0"]
    decider.now = await decider.poll_version(fixed + STEP, until="3.0.0")
    await decider.runner.hand_over(evaluation)

    assert w.store.rollbacks(service=SERVICE) == []
    assert w.events("rollback.refused") == []
