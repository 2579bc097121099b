"""Verification judges only what happened after the switch (the executor finishing).

A whole-service check (no ``version_label``) with the default 1m rate window still holds the
bad release's requests for a minute after a correct rollback; verification clips every range
window to the whole seconds since the switch, and needs an evaluation judged OK with data
before it calls a rollback verified.

Against real Prometheus servers: one scraping a fake service whose version a deploy command
switches (through the whole pipeline), and one holding backfilled, exactly known counters
judged under a fake clock (the verifier's clock and sleep are injected), so boundaries are
deterministic. Plus the clipped PromQL of each check type as pure table tests.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from rollbackd.checks import Check
from rollbackd.core.model import RollbackState
from rollbackd.core.samples import Verdict
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.runner import Runner
from rollbackd.runtime.verify import Verifier, window_cap
from rollbackd.store.sqlite import Store
from support.configs import load_config
from support.fake_service import FakeService
from support.prometheus import (
    PrometheusServer,
    ScrapeTarget,
    create_blocks,
    free_port,
    prometheus_available,
    promtool_available,
)

DEPLOY = str(Path(__file__).parent / "support" / "deploy.py")
CHECK: TypeAdapter[Any] = TypeAdapter(Check)

# The check under test everywhere: whole-service (no version_label), the default 1m window,
# the default 3 consecutive breaches.
ERRORS_CHECK = """
[[check]]
name = "errors"
type = "error_rate"
selector = 'service="{selector}"'
errors = 'code=~"5.."'
above = 0.1
interval = "1s"
{extra}
"""


# -- (c) the clipped PromQL of each check type ---------------------------------------------


def queries(spec: dict[str, Any], cap: timedelta | None, by: str | None = None) -> dict[str, str]:
    return {q.role: q.expr for q in CHECK.validate_python(spec).queries(by, window_cap=cap)}


ERROR_RATE = {"name": "e", "type": "error_rate", "selector": 'service="a"', "errors": 'code="500"'}
LATENCY = {"name": "p", "type": "latency", "metric": "rpc_seconds", "above": "250ms"}
BURN = {"name": "slo", "type": "burn_rate", "errors": 'code=~"5.."', "objective": 0.999}
SPECS = [
    {**ERROR_RATE, "above": 0.05, "window": "2m"},
    {**LATENCY, "window": "5m"},
    BURN,
    {"name": "pr", "type": "probe", "selector": 'job="bb"'},
    {"name": "q", "type": "query", "query": "sum(rate(x[5m]))", "above": 1},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s["type"]))
@pytest.mark.parametrize("by", [None, "version"])
def test_no_cap_or_a_longer_one_changes_no_query(spec: dict[str, Any], by: str | None) -> None:
    configured = {q.role: q.expr for q in CHECK.validate_python(spec).queries(by)}
    assert queries(spec, None, by) == configured
    assert queries(spec, timedelta(days=1), by) == configured


def test_error_rate_clipped() -> None:
    got = queries({**ERROR_RATE, "above": 0.05, "window": "2m"}, timedelta(seconds=7))
    total = 'sum(rate(http_requests_total{service="a"}[7s]))'
    failed = 'sum(rate(http_requests_total{service="a", code="500"}[7s]))'
    assert got == {"value": f"({failed} or 0 * {total}) / {total}", "traffic": total}


def test_latency_clipped_in_buckets_and_count() -> None:
    got = queries({**LATENCY, "window": "5m"}, timedelta(seconds=90), by="version")
    assert got == {
        "value": "histogram_quantile(0.99, sum by (le, version) (rate(rpc_seconds_bucket[1m30s])))",
        "traffic": "sum by (version) (rate(rpc_seconds_count[1m30s]))",
    }


def test_burn_rate_clips_long_and_short_windows_and_keeps_their_roles() -> None:
    # Between the windows: 5m stays, 30m/1h/6h become 10m. Below all: every one is 40s.
    got = queries(BURN, timedelta(minutes=10))
    assert list(got) == ["burn 1h", "burn 5m", "burn 6h", "burn 30m"]
    assert all("[10m]" in got[r] for r in ("burn 1h", "burn 6h", "burn 30m"))
    assert "[5m]" in got["burn 5m"] and "[10m]" not in got["burn 5m"]
    short = queries(BURN, timedelta(seconds=40))
    assert all("[40s]" in e and "[5m]" not in e and "[1h]" not in e for e in short.values())
    assert short["burn 1h"] == short["burn 5m"]


def test_probe_and_raw_query_have_nothing_to_clip() -> None:
    probe = {"name": "pr", "type": "probe", "selector": 'job="bb"'}
    assert queries(probe, timedelta(seconds=3)) == {
        "value": 'sum(probe_success{job="bb"} == bool 0)'
    }
    # A raw query's PromQL is the author's: run as written, its ranges not rewritten.
    raw = {"name": "q", "type": "query", "query": "sum(rate(x[5m]))", "above": 1}
    assert queries(raw, timedelta(seconds=3)) == {"value": "sum(rate(x[5m]))"}


@pytest.mark.parametrize(
    ("since", "now", "cap"),
    [
        (100.0, 102.9, 2),  # rounded down: 3s would reach back before the switch
        (100.0, 102.0, 2),
        (100.0, 160.4, 60),
        (100.0, 100.2, 1),  # at least one second
        (100.0, 99.0, 1),  # a clock behind the switch
    ],
)
def test_window_cap_is_whole_seconds_since_the_switch(since: float, now: float, cap: int) -> None:
    assert window_cap(since, now) == timedelta(seconds=cap)


# -- backfilled counters, judged under a fake clock ----------------------------------------

T0 = (int(time.time()) // 60) * 60 - 2 * 3600
"""First sample of the backfilled history: two hours ago, on a minute."""
LENGTH = 240
SWITCH = T0 + 120.5
"""Half way between two scrapes (every second, on the second)."""


@dataclass(frozen=True)
class Phase:
    start: float
    """Offset from T0 at which these rates begin."""
    ok: float
    errors: float


HISTORIES: dict[str, list[Phase]] = {
    # All requests fail until the switch, none after it.
    "flip": [Phase(0, 0, 10), Phase(120.5, 10, 0)],
    # Half fail, before and after: the rollback did not cure it.
    "bad": [Phase(0, 5, 5)],
    # All fail until the switch, then no requests at all.
    "silent": [Phase(0, 0, 10), Phase(120.5, 0, 0)],
    # As silent, until healthy requests come back 15 s after the switch.
    "late": [Phase(0, 0, 10), Phase(120.5, 0, 0), Phase(135.5, 10, 0)],
}


def counted(phases: list[Phase], at: float, field: str) -> float:
    """Requests counted from T0 to ``T0 + at`` at the phases' rates."""
    total = 0.0
    for phase, following in zip(phases, [*phases[1:], None], strict=True):
        end = min(at, following.start if following else math.inf)
        if end > phase.start:
            total += (end - phase.start) * getattr(phase, field)
    return total


def openmetrics() -> str:
    lines = ["# TYPE http_requests counter"]
    for service, phases in HISTORIES.items():
        for code, field in (("200", "ok"), ("500", "errors")):
            labels = f'service="{service}",code="{code}"'
            lines += [
                f"http_requests_total{{{labels}}} {counted(phases, k, field):g} {T0 + k}"
                for k in range(LENGTH + 1)
            ]
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    if not (prometheus_available() and promtool_available()):
        pytest.skip("the 'prometheus' and 'promtool' binaries are needed (package: prometheus)")
    directory = tmp_path_factory.mktemp("history")
    data = directory / "history.om"
    data.write_text(openmetrics())
    server = PrometheusServer(directory / "prometheus")
    try:
        create_blocks(data, server.storage_dir)
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.close()


@dataclass
class FakeTime:
    """The verifier's clock: its sleeps move it on, at once."""

    now: float

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


VERIFY = 'window = "8s"\nversion_timeout = "20s"'


def rule_file(name: str, selector: str, extra: str = "", verify: str = VERIFY) -> str:
    return (
        f'[service]\nname = "{name}"\n'
        '[[rollback]]\ntype = "command"\nargv = ["/bin/true"]\n'
        f"[verify]\n{verify}\n" + ERRORS_CHECK.format(selector=selector, extra=extra)
    )


class Judged:
    """An engine over the backfilled history and a verifier on a fake clock at the switch."""

    def __init__(self, tmp_path: Path, url: str, history: str, extra: str, verify: str) -> None:
        loaded = load_config(tmp_path, url, {"svc": rule_file("svc", history, extra, verify)})
        self.store = Store(tmp_path / "state.db")
        self.engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), self.store)
        self.service = loaded.services["svc"]
        self.time = FakeTime(SWITCH)
        self.verifier = Verifier(self.engine, clock=self.time.clock, sleep=self.time.sleep)


@pytest.fixture
def judged(tmp_path: Path, history: PrometheusServer) -> Iterator[Callable[..., Judged]]:
    made: list[Judged] = []

    def make(name: str, extra: str = "", url: str | None = None, verify: str = VERIFY) -> Judged:
        one = Judged(tmp_path / f"j{len(made)}", url or history.url, name, extra, verify)
        made.append(one)
        return one

    yield make
    for one in made:
        one.store.close()


@pytest.mark.prometheus
async def test_a_cured_service_verifies_although_the_1m_window_holds_bad_requests(
    judged: Callable[..., Judged],
) -> None:
    world = judged("flip")
    result = await world.verifier.verify(world.service, None)  # since: now, the switch
    assert result.ok, result.reason
    assert result.reason == "checks held for 8s"


@pytest.mark.prometheus
async def test_a_clipped_window_without_two_samples_is_a_gap_even_under_on_no_data_breach(
    judged: Callable[..., Judged],
) -> None:
    # The first evaluation, a second after the switch, holds one scrape: no rate, no data.
    world = judged("flip", extra='on_no_data = "breach"\nbreaches = 1')
    [check] = world.service.rules.check
    [first] = await world.engine.evaluate(
        world.service, check, SWITCH + 1, window_cap=window_cap(SWITCH, SWITCH + 1)
    )
    assert first.verdict is Verdict.NO_DATA
    result = await world.verifier.verify(world.service, None)
    assert result.ok, result.reason


@pytest.mark.prometheus
async def test_judged_from_long_before_the_switch_the_same_rollback_fires_again(
    judged: Callable[..., Judged],
) -> None:
    # What verification did before it clipped: the 1m window full of the bad release.
    world = judged("flip")
    result = await world.verifier.verify(world.service, None, since=SWITCH - 120)
    assert not result.ok
    assert result.reason.startswith("check errors fired again: error ratio")


@pytest.mark.prometheus
async def test_the_rounded_down_window_holds_no_scrape_from_before_the_switch(
    judged: Callable[..., Judged],
) -> None:
    world = judged("flip")
    [check] = world.service.rules.check
    at = SWITCH + 2.4
    assert window_cap(SWITCH, at) == timedelta(seconds=2)
    [clipped] = await world.engine.evaluate(
        world.service, check, at, window_cap=window_cap(SWITCH, at)
    )
    assert clipped.verdict is Verdict.OK, clipped.reason
    # One second longer, the window takes in the last scrape before the switch, and the
    # rate up to the next one counts the bad release's last half second of requests.
    [rounded_up] = await world.engine.evaluate(
        world.service, check, at, window_cap=timedelta(seconds=3)
    )
    assert rounded_up.verdict is Verdict.BREACH, rounded_up.reason


@pytest.mark.prometheus
async def test_a_service_still_bad_after_the_switch_fires_under_its_own_rule(
    judged: Callable[..., Judged],
) -> None:
    world = judged("bad")
    result = await world.verifier.verify(world.service, None)
    assert not result.ok
    assert result.reason.startswith("check errors fired again: error ratio 50.00% above 10.00%")
    # 3 breaches: at 2 s, 3 s and 4 s (the 1 s window holds one scrape: no data).
    assert world.time.now == SWITCH + 4


@pytest.mark.prometheus
async def test_no_requests_after_the_switch_is_no_proof_of_health(
    judged: Callable[..., Judged],
) -> None:
    world = judged("silent")
    result = await world.verifier.verify(world.service, None)
    assert not result.ok
    assert result.reason.startswith("could not verify: errors had no data after the switch")
    assert "NaN" in result.reason
    # Judged for the window and then version_timeout longer, before giving up.
    assert world.time.now >= SWITCH + 1 + 8 + 20


@pytest.mark.prometheus
async def test_traffic_below_min_rate_is_no_proof_either(judged: Callable[..., Judged]) -> None:
    world = judged("flip", extra="min_rate = 20")
    result = await world.verifier.verify(world.service, None)
    assert not result.ok
    assert "errors had no data after the switch" in result.reason
    assert "below min_rate 20" in result.reason


@pytest.mark.prometheus
async def test_data_that_comes_after_the_window_still_verifies(
    judged: Callable[..., Judged],
) -> None:
    world = judged("late")
    result = await world.verifier.verify(world.service, None)
    assert result.ok, result.reason
    assert "data after the switch came" in result.reason
    # Past the 8 s window, well before the 20 s more it may take.
    assert SWITCH + 9 < world.time.now < SWITCH + 29


@pytest.mark.prometheus
async def test_queries_failing_the_whole_time_cannot_verify(
    judged: Callable[..., Judged],
) -> None:
    # Short: each evaluation retries the dead address for up to its interval, in real time.
    quick = 'window = "2s"\nversion_timeout = "2s"'
    world = judged("flip", url=f"http://127.0.0.1:{free_port()}", verify=quick)
    result = await world.verifier.verify(world.service, None)
    assert not result.ok
    assert result.reason == "could not verify: queries of errors failed the whole window"


@pytest.mark.prometheus
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s["type"]))
async def test_clipped_queries_run_on_prometheus(
    history: PrometheusServer, spec: dict[str, Any]
) -> None:
    for query in CHECK.validate_python(spec).queries(None, window_cap=timedelta(seconds=3)):
        history.query(query.expr, time=SWITCH + 3)  # raises on a PromQL error


# -- (a), (b): the whole pipeline, a fake service switched by a deploy command ---------------


def live_rules(deploy: list[str]) -> str:
    return f"""
[service]
name = "checkout"
version_query = 'max by (version) (app_build_info{{service="checkout"}})'
bake_time = "1m"

[[rollback]]
type = "command"
argv = {json.dumps(deploy)}
timeout = "20s"

[verify]
window = "8s"
version_timeout = "10s"
""" + ERRORS_CHECK.format(selector="checkout", extra="")


class World:
    def __init__(self, tmp_path: Path, prometheus: PrometheusServer, deploy: list[str]) -> None:
        loaded = load_config(tmp_path, prometheus.url, {"checkout": live_rules(deploy)})
        self.store = Store(tmp_path / "state.db")
        self.engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), self.store)
        self.pipeline = Pipeline(self.engine)
        self.runner = Runner(self.engine, self.pipeline.on_fire)
        self.service = loaded.services["checkout"]

    def events(self) -> list[str]:
        return [
            e.type
            for e in reversed(self.store.events(limit=1000))
            if e.type.startswith(("rollback.", "verify.", "service."))
        ]


@pytest.fixture
def live(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service: FakeService,
) -> Iterator[Callable[..., World]]:
    """``make(*flags)``: a world on the fake service at 1.0.0, rolled back by deploy.py
    with those flags."""
    made: list[World] = []

    def make(*flags: str) -> World:
        deploy = [sys.executable, DEPLOY, f"{fake_service.url}/control", "{to_version}", *flags]
        prometheus = prometheus_factory(targets=[ScrapeTarget(fake_service.address)])
        await_version(prometheus, "1.0.0")
        world = World(tmp_path, prometheus, deploy)
        made.append(world)
        return world

    yield make
    for world in made:
        world.store.close()


def await_version(prometheus: PrometheusServer, version: str) -> None:
    prometheus.wait_for(
        'max by (version) (app_build_info{service="checkout"})',
        lambda result: [s["metric"]["version"] for s in result] == [version],
    )


async def release_bad_and_roll_back(world: World, fake: FakeService) -> None:
    await world.runner.tick(time.time())
    # Baking is not under test here: 1.0.0 is simply the last known good.
    assert world.store.mark_baked("checkout", "1.0.0", time.time())
    # Nearly all requests fail: the 1m window still holds well over 10% errors all through
    # verification (what failed every correct rollback before windows were clipped).
    fake.update(version="2.0.0", error_ratio=0.9)
    for _ in range(80):
        await world.runner.tick(time.time())
        if world.store.rollbacks(limit=1):
            break
        await asyncio.sleep(0.25)  # poll: the next scrape brings new samples
    else:
        raise AssertionError("the check never fired on the bad release")
    await world.pipeline.wait_idle()


@pytest.mark.prometheus
async def test_a_correct_rollback_of_a_whole_service_check_verifies(
    live: Callable[..., World], fake_service: FakeService
) -> None:
    world = live()
    await release_bad_and_roll_back(world, fake_service)
    [rollback] = world.store.rollbacks()
    assert fake_service.version == "1.0.0" and fake_service.error_ratio == 0
    assert rollback.state is RollbackState.SUCCEEDED, rollback.outcome
    assert (rollback.from_version, rollback.to_version) == ("2.0.0", "1.0.0")
    assert [(s.kind, s.ok) for s in world.store.steps(rollback.id)] == [
        ("rollback", True),
        ("verify", True),
    ]
    assert "verify.failed" not in world.events()
    assert "service.frozen" not in world.events()


@pytest.mark.prometheus
async def test_a_rollback_that_leaves_the_service_bad_fails_verification(
    live: Callable[..., World], fake_service: FakeService
) -> None:
    world = live("--error-ratio", "0.5")  # the version comes back, the errors stay
    await release_bad_and_roll_back(world, fake_service)
    [rollback] = world.store.rollbacks()
    assert fake_service.version == "1.0.0" and fake_service.error_ratio == 0.5
    assert rollback.state is RollbackState.FAILED
    assert rollback.outcome.startswith("verification failed: check errors fired again:")
    assert [(s.kind, s.ok) for s in world.store.steps(rollback.id)] == [
        ("rollback", True),
        ("verify", False),
    ]
    assert {"verify.failed", "service.frozen"} <= set(world.events())
