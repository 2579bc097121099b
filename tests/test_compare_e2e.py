"""The ``compare`` check end to end, as users first write it — defaults as shipped (1h
baseline window, 15s interval, worse_by 20%, confidence 0.99), whole-service and per-version,
a canary against its stable track, errors and slow requests — against a real Prometheus
holding the service's history (backfilled, ``support/timeline.py``), judged by the real
engine, pipeline, executors and verifier over a simulated clock (``support/story.py``).
``rollbackd eval`` and ``replay`` show the same evidence.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollbackd.cli.evaluation import evaluate_once
from rollbackd.cli.operator_commands import _print_status
from rollbackd.cli.replay import replay
from rollbackd.config.loader import load
from rollbackd.core.model import RollbackState
from rollbackd.core.samples import Verdict
from rollbackd.core.sequential import Decision
from rollbackd.notify.content import build_message
from rollbackd.prometheus import PrometheusClient
from support.configs import write_config
from support.prometheus import PrometheusFactory
from support.story import Story, stories
from support.timeline import CANARY_QUERY, SERVICE, VERSION_QUERY, Segment, Timeline, origin

pytestmark = pytest.mark.prometheus

RECORD = str(Path(__file__).parent / "support" / "record_run.py")
MIN = 60
BAKE_TIME = 10 * MIN
"""``[service] bake_time`` as shipped."""


def rules(
    log: Path,
    *,
    version_label: bool = False,
    canary: bool = False,
    slow: bool = False,
    bake_time: str | None = None,
) -> str:
    rollback = [sys.executable, RECORD, str(log), "{to_version}"]
    abort = [sys.executable, RECORD, str(log), "abort"]
    lines = ["[service]", f'name = "{SERVICE}"', f"version_query = '{VERSION_QUERY}'"]
    if version_label:
        lines.append('version_label = "version"')
    if bake_time:
        lines.append(f'bake_time = "{bake_time}"')
    if canary:
        lines += ["", "[canary]", f"active_query = '{CANARY_QUERY}'"]
        lines.append(f'abort = [{{ type = "command", argv = {json.dumps(abort)} }}]')
    lines += ["", "[[rollback]]", 'type = "command"', f"argv = {json.dumps(rollback)}", ""]
    lines += ["[[check]]", 'type = "compare"', f"selector = 'service=\"{SERVICE}\"'"]
    if slow:
        lines += [
            'name = "slow-vs-baseline"',
            'metric = "http_request_duration_seconds"',
            'slower_than = "500ms"',
        ]
    else:
        lines += ['name = "errors-vs-baseline"', "errors = 'code=~\"5..\"'"]
    return "\n".join([*lines, ""])


@pytest.fixture
def story(tmp_path: Path, prometheus_factory: PrometheusFactory) -> Iterator[type[Story]]:
    with stories(tmp_path, prometheus_factory, rules) as made:
        yield made


def release(
    t0: int, *, error_ratio: float = 0.01, slow: bool = False, rps: float = 10.0
) -> tuple[Timeline, int, int]:
    """1.0.0 for 75 minutes at 1% errors (more than the 1h baseline window), then 2.0.0,
    and 1.0.0 again after the switch, 20 minutes later."""
    released = t0 + 75 * MIN
    switch = released + 20 * MIN
    return (
        Timeline(
            [
                Segment("1.0.0", t0, released - 15, rps=rps),
                Segment(
                    "2.0.0", released, switch - 15, rps=rps, error_ratio=error_ratio, slow=slow
                ),
                Segment("1.0.0", switch, switch + 20 * MIN, rps=rps),
            ]
        ),
        released,
        switch,
    )


def breach_reasons(s: Story) -> list[str]:
    return [
        str(e.data.get("reason"))
        for e in reversed(s.store.events(limit=5000))
        if e.type == "check.breach"
    ]


@pytest.mark.parametrize("version_label", [False, True], ids=["whole-service", "per-version"])
async def test_a_release_with_three_times_the_errors_is_rolled_back_and_verified(
    story: type[Story], version_label: bool
) -> None:
    t0 = origin()
    timeline, released, switch = release(t0, error_ratio=0.03)
    # The daemon starts 15 minutes before the release: 1.0.0 bakes, and is the target.
    s = story(timeline, start=released - 15 * MIN, switches=(switch,), version_label=version_label)
    await s.run_until(released)
    assert s.baked("1.0.0")
    await s.run_until(switch + 10 * MIN)
    assert s.runs() == [["1.0.0"]]
    assert s.rollbacks() == [("2.0.0", "1.0.0", RollbackState.SUCCEEDED)]
    assert "verify.failed" not in s.events()
    [reason] = breach_reasons(s)
    assert "error ratio 3.00% vs 1.00% baseline (the 1h before the release)" in reason
    assert "worse: evidence" in reason and "threshold 200:1" in reason
    # The notification of the rollback says it too.
    [done] = [e for e in s.store.events(limit=5000) if e.type == "rollback.succeeded"]
    assert "for worse, threshold 200:1; on " in build_message(done).text()


async def test_a_canary_with_three_times_the_errors_of_its_stable_track_is_aborted(
    story: type[Story],
) -> None:
    t0 = origin()
    start = t0 + 75 * MIN
    switch = start + 20 * MIN
    timeline = Timeline(
        [
            Segment("1.0.0", t0, switch + 20 * MIN, rps=8.0),
            Segment("2.0.0", start, switch - 15, rps=2.0, error_ratio=0.03),
        ],
        canary=[(start, switch - 15)],
    )
    s = story(timeline, start=start - 15 * MIN, switches=(switch,), version_label=True, canary=True)
    await s.run_until(switch + 10 * MIN)
    assert s.runs() == [["abort"]]
    [rollback] = s.store.rollbacks(service=SERVICE)
    assert (rollback.from_version, rollback.state, rollback.canary) == (
        "2.0.0",
        RollbackState.SUCCEEDED,
        True,
    )
    [reason] = breach_reasons(s)
    assert "vs 1.00% baseline (stable track, version 1.0.0)" in reason
    assert "threshold 100:1" in reason


async def test_a_release_with_slow_requests_is_rolled_back(story: type[Story]) -> None:
    t0 = origin()
    timeline, released, switch = release(t0, slow=True)
    s = story(timeline, start=released - 15 * MIN, switches=(switch,), slow=True)
    await s.run_until(switch + 10 * MIN)
    assert s.runs() == [["1.0.0"]]
    [reason] = breach_reasons(s)
    assert "share slower than 500ms 20.00% vs 0.50% baseline" in reason


async def test_a_healthy_release_is_not_rolled_back_and_bakes_before_the_bake_time(
    story: type[Story], capsys: pytest.CaptureFixture[str]
) -> None:
    """At 100 requests/s the test concludes "not worse by 20%" in about a quarter of an
    hour: the version need not wait out a 30m bake time."""
    t0 = origin()
    timeline, released, switch = release(t0, rps=100.0)
    s = story(timeline, start=released - 35 * MIN, switches=(switch,), bake_time="30m")
    await s.run_until(released)
    assert s.baked("1.0.0")
    await s.run_until(switch)
    assert s.runs() == []
    assert s.baked("2.0.0")
    [baked] = [
        e
        for e in s.store.events(limit=5000)
        if e.type == "version.baked" and e.data["version"] == "2.0.0"
    ]
    assert baked.at < released + 20 * MIN
    assert "concluded not worse" in str(baked.data.get("early"))
    # What rollbackd status shows.
    status = await s.status()
    [check] = status["services"][0]["checks"]
    assert "not worse by 20%: evidence" in check["evidence"]
    _print_status(status, "http://rollbackd.test")
    assert "  shop errors-vs-baseline: error ratio 1.00% vs 1.00% baseline" in (
        capsys.readouterr().out
    )


async def test_a_healthy_release_at_low_traffic_stays_undecided_and_bakes_at_the_bake_time(
    story: type[Story],
) -> None:
    """At 10 requests/s an hour's baseline is known to about 13%: too little to conclude
    "not worse by 20%" soon. The test stays undecided, nothing is rolled back, and the
    version bakes on the bake time's evidence."""
    t0 = origin()
    timeline, released, switch = release(t0)
    s = story(timeline, start=released - 15 * MIN, switches=(switch,))
    await s.run_until(released + BAKE_TIME - MIN)
    assert not s.baked("2.0.0")
    await s.run_until(released + BAKE_TIME + 2 * MIN)
    assert s.runs() == []
    assert s.baked("2.0.0")
    assert breach_reasons(s) == []


async def test_eval_and_replay_show_the_evidence(
    tmp_path: Path, prometheus_factory: PrometheusFactory
) -> None:
    t0 = origin()
    timeline, released, switch = release(t0, error_ratio=0.03)
    server = prometheus_factory(start=False)
    timeline.backfill(server.storage_dir)
    server.start()
    server.wait_ready()
    config = write_config(tmp_path, server.url, {SERVICE: rules(tmp_path / "runs.jsonl")})
    loaded = load(config)
    # eval finds the release in version_query's history, five minutes after it.
    [one] = await evaluate_once(loaded, list(loaded.services.values()), released + 5 * MIN)
    [m] = one.measurements
    assert m.verdict is Verdict.BREACH
    assert m.evidence is not None and m.evidence.decision is Decision.WORSE
    assert m.evidence.new.requests == pytest.approx(5 * MIN * 10, rel=0.05)
    events = replay(PrometheusClient(loaded.config.prometheus), loaded, released - 5 * MIN, switch)
    [fired] = [e for e in events if e.kind == "would_roll_back"]
    assert released < fired.at < released + 5 * MIN
    assert "evidence" in fired.text and "for worse" in fired.text
