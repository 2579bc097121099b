"""The decision table end to end, with the rules as users first write them — the default
windows (1m rates, 15s intervals, 3 breaches, 10m bake time, 2m verification), whole-service
checks without ``version_label`` as well as version-scoped ones, canaries, each mode — against
a real Prometheus holding the service's history (backfilled with promtool, see
``support/timeline.py``), judged by the real engine, pipeline, executors and verifier over a
simulated clock.

The executors are real processes that record their runs. A rollback's executor "takes" until
the timeline's next switch: when it has run, the clock jumps there, and the data from then on
is what the service did once rolled back (restored, or still bad).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollbackd.core.model import RollbackState
from rollbackd.store.errors import ConflictError
from support.daemon_process import set_mode
from support.prometheus import PrometheusFactory
from support.story import Story, stories
from support.timeline import CANARY_QUERY, SERVICE, VERSION_QUERY, Segment, Timeline, origin

pytestmark = pytest.mark.prometheus

RECORD = str(Path(__file__).parent / "support" / "record_run.py")
MIN = 60


def rules(
    log: Path,
    *,
    version_label: bool = False,
    version_query: bool = True,
    canary: bool = False,
    target: bool = True,
) -> str:
    rollback = [sys.executable, RECORD, str(log), "{to_version}" if target else "undo"]
    abort = [sys.executable, RECORD, str(log), "abort"]
    lines = ["[service]", f'name = "{SERVICE}"']
    if version_query:
        lines.append(f"version_query = '{VERSION_QUERY}'")
    if version_label:
        lines.append('version_label = "version"')
    if canary:
        lines += ["", "[canary]", f"active_query = '{CANARY_QUERY}'"]
        lines.append(f'abort = [{{ type = "command", argv = {json.dumps(abort)} }}]')
    return "\n".join(
        [
            *lines,
            "",
            "[[rollback]]",
            'type = "command"',
            f"argv = {json.dumps(rollback)}",
            "",
            "[[check]]",
            'name = "error-rate"',
            'type = "error_rate"',
            f"selector = 'service=\"{SERVICE}\"'",
            "errors = 'code=~\"5..\"'",
            "above = 0.05",
            "",
            "[[check]]",
            'name = "p99"',
            'type = "latency"',
            'metric = "http_request_duration_seconds"',
            f"selector = 'service=\"{SERVICE}\"'",
            'above = "1s"',
            "",
        ]
    )


@pytest.fixture
def story(tmp_path: Path, prometheus_factory: PrometheusFactory) -> Iterator[type[Story]]:
    with stories(tmp_path, prometheus_factory, rules) as made:
        yield made


def bad_release(t0: int, *, restored_error_ratio: float = 0.01) -> tuple[Timeline, int, int]:
    """1.0.0 healthy for 30 minutes, 2.0.0 with 30% errors and a slow p99, and whatever the
    service does after the rollback's switch (3 minutes later)."""
    release = t0 + 30 * MIN
    switch = release + 3 * MIN
    return (
        Timeline(
            [
                Segment("1.0.0", t0, release - 15),
                Segment("2.0.0", release, switch - 15, error_ratio=0.3, slow=True),
                Segment(
                    "1.0.0",
                    switch,
                    switch + 20 * MIN,
                    error_ratio=restored_error_ratio,
                    slow=restored_error_ratio > 0.05,
                ),
            ]
        ),
        release,
        switch,
    )


@pytest.mark.parametrize("version_label", [False, True], ids=["whole-service", "per-version"])
async def test_a_bad_release_is_rolled_back_once_and_verified_with_default_windows(
    story: type[Story], version_label: bool
) -> None:
    t0 = origin()
    timeline, release, switch = bad_release(t0)
    s = story(timeline, start=t0, switches=(switch,), version_label=version_label)
    await s.run_until(release)
    assert s.baked("1.0.0")  # on evidence: 30 minutes judged OK
    await s.run_until(switch + 10 * MIN)
    assert s.runs() == [["1.0.0"]]
    assert s.rollbacks() == [("2.0.0", "1.0.0", RollbackState.SUCCEEDED)]
    assert "verify.failed" not in s.events()
    bad = s.store.version(SERVICE, "2.0.0")
    assert bad is not None and bad.bad


async def test_a_rollback_that_did_not_help_fails_verification_and_freezes(
    story: type[Story],
) -> None:
    t0 = origin()
    timeline, _, switch = bad_release(t0, restored_error_ratio=0.3)
    s = story(timeline, start=t0, switches=(switch,))
    await s.run_until(switch + 10 * MIN)
    assert s.runs() == [["1.0.0"]]
    [(_, _, state)] = s.rollbacks()
    assert state is RollbackState.FAILED
    assert s.events()[-2:] == ["verify.failed", "service.frozen"]


def canary(t0: int) -> tuple[Timeline, int, int]:
    """1.0.0 stable; a canary of 2.0.0 at 20% of traffic with 50% errors — 10.8% for the
    whole service — aborted at the switch."""
    start = t0 + 30 * MIN
    switch = start + 3 * MIN
    return (
        Timeline(
            [
                Segment("1.0.0", t0, switch + 20 * MIN, rps=8.0),
                Segment("2.0.0", start, switch - 15, rps=2.0, error_ratio=0.5),
            ],
            canary=[(start, switch - 15)],
        ),
        start,
        switch,
    )


async def test_a_bad_canary_judged_service_wide_is_aborted_not_rolled_back(
    story: type[Story],
) -> None:
    t0 = origin()
    timeline, _, switch = canary(t0)
    s = story(timeline, start=t0, switches=(switch,), canary=True)
    await s.run_until(switch + 10 * MIN)
    assert s.runs() == [["abort"]]  # the [[rollback]] chain never ran
    [rollback] = s.store.rollbacks(service=SERVICE)
    assert (rollback.from_version, rollback.state, rollback.canary) == (
        "2.0.0",
        RollbackState.SUCCEEDED,
        True,
    )
    assert "canary.aborted" in s.events()


async def test_a_canary_is_aborted_without_a_target_version(story: type[Story]) -> None:
    """The daemon starts during the canary: no version has baked, and aborting needs none."""
    t0 = origin()
    timeline, start, switch = canary(t0)
    s = story(timeline, start=start + 15, switches=(switch,), canary=True)
    await s.run_until(switch + 10 * MIN)
    assert not s.baked("1.0.0")  # nobody watched it bake
    assert s.runs() == [["abort"]]
    [rollback] = s.store.rollbacks(service=SERVICE)
    assert rollback.state is RollbackState.SUCCEEDED
    target = next(g for g in rollback.guards if g["guard"] == "target")
    assert "aborting the canary in progress needs none" in str(target["reason"])


async def test_a_breach_older_than_the_release_stays_older_across_a_restart(
    story: type[Story],
) -> None:
    """An incident hits every version: 1.0.0 breaks, 2.0.0 comes out in the middle of it.
    2.0.0 did not cause it — before and after a restart."""
    t0 = origin()
    incident = t0 + 30 * MIN
    release = incident + 3 * MIN
    timeline = Timeline(
        [
            Segment("1.0.0", t0, incident - 15),
            Segment("1.0.0", incident, release - 15, error_ratio=0.3),
            Segment("2.0.0", release, release + 30 * MIN, error_ratio=0.3),
        ]
    )
    s = story(timeline, start=t0)
    await s.run_until(release + 2 * MIN)
    s.restart()
    await s.run_until(release + 10 * MIN)
    assert s.runs() == []
    assert s.rollbacks() == []
    v2 = s.store.version(SERVICE, "2.0.0")
    assert v2 is not None and not v2.bad
    refusals = [
        e for e in s.store.events(types=["rollback.refused"], limit=100) if e.service == SERVICE
    ]
    assert refusals, "the first firing is refused: no version to roll back to"


async def test_a_release_refused_by_the_cooldown_is_rolled_back_when_it_ends(
    story: type[Story],
) -> None:
    t0 = origin()
    first = t0 + 30 * MIN
    switch1 = first + 3 * MIN
    second = switch1 + 5 * MIN
    switch2 = first + 20 * MIN
    timeline = Timeline(
        [
            Segment("1.0.0", t0, first - 15),
            Segment("2.0.0", first, switch1 - 15, error_ratio=0.3),
            Segment("1.0.0", switch1, second - 15),
            Segment("3.0.0", second, switch2 - 15, error_ratio=0.3),
            Segment("1.0.0", switch2, switch2 + 20 * MIN),
        ]
    )
    s = story(timeline, start=t0, switches=(switch1, switch2))
    await s.run_until(first + 15 * MIN)
    assert s.runs() == [["1.0.0"]]  # 3.0.0 fired within the cooldown (15m): not now
    assert s.events("rollback.refused") == ["rollback.refused"]
    await s.run_until(switch2 + 10 * MIN)
    assert s.runs() == [["1.0.0"], ["1.0.0"]]
    assert s.rollbacks() == [
        ("2.0.0", "1.0.0", RollbackState.SUCCEEDED),
        ("3.0.0", "1.0.0", RollbackState.SUCCEEDED),
    ]
    assert s.events("rollback.refused") == ["rollback.refused"]  # announced once


async def test_dry_run_switched_to_auto_by_a_reload_rolls_the_live_bad_release_back(
    story: type[Story],
) -> None:
    t0 = origin()
    timeline, release, switch = bad_release(t0)
    timeline = Timeline(
        [
            Segment("1.0.0", t0, release - 15),
            Segment("2.0.0", release, switch + 5 * MIN - 15, error_ratio=0.3),
            Segment("1.0.0", switch + 5 * MIN, switch + 25 * MIN),
        ]
    )
    s = story(timeline, start=t0, switches=(switch + 5 * MIN,), mode="dry-run")
    await s.run_until(switch)
    assert s.runs() == []
    assert s.rollbacks() == [("2.0.0", "1.0.0", RollbackState.DRY_RUN)]
    set_mode(s.config, "auto")
    s.reload()
    await s.run_until(switch + 15 * MIN)
    assert s.runs() == [["1.0.0"]]
    assert s.rollbacks()[-1] == ("2.0.0", "1.0.0", RollbackState.SUCCEEDED)


async def test_approve_mode_runs_what_a_person_approves(story: type[Story]) -> None:
    t0 = origin()
    timeline, release, switch = bad_release(t0)
    s = story(timeline, start=t0, switches=(switch,), mode="approve")
    await s.run_until(release + 3 * MIN - 15)
    [pending] = s.store.rollbacks(service=SERVICE)
    assert pending.state is RollbackState.PENDING and s.runs() == []
    await s.pipeline.approve(pending.id, "alice")
    await s.pipeline.wait_idle()
    await s.run_until(switch + 10 * MIN)
    assert s.runs() == [["1.0.0"]]
    assert s.rollbacks() == [("2.0.0", "1.0.0", RollbackState.SUCCEEDED)]


async def test_a_stale_approval_never_rolls_back_the_release_that_replaced_it(
    story: type[Story],
) -> None:
    t0 = origin()
    release = t0 + 30 * MIN
    fixed = release + 5 * MIN
    timeline = Timeline(
        [
            Segment("1.0.0", t0, release - 15),
            Segment("2.0.0", release, fixed - 15, error_ratio=0.3),
            Segment("5.0.0", fixed, fixed + 20 * MIN),
        ]
    )
    s = story(timeline, start=t0, mode="approve")
    await s.run_until(fixed + 2 * MIN)
    [rollback] = s.store.rollbacks(service=SERVICE)
    assert rollback.state is RollbackState.EXPIRED
    assert rollback.outcome.startswith("superseded: 5.0.0 replaced 2.0.0")
    with pytest.raises(ConflictError, match=r"is expired, not pending"):
        await s.pipeline.approve(rollback.id, "alice")
    assert s.runs() == []


async def test_a_service_without_versions_gets_a_rollback_per_firing_episode(
    story: type[Story],
) -> None:
    t0 = origin()
    first = t0 + 30 * MIN
    switch1 = first + 3 * MIN
    second = switch1 + 25 * MIN  # after the cooldown
    switch2 = second + 3 * MIN
    timeline = Timeline(
        [
            Segment("a", t0, first - 15),
            Segment("b", first, switch1 - 15, error_ratio=0.3),
            Segment("a", switch1, second - 15),
            Segment("b", second, switch2 - 15, error_ratio=0.3),
            Segment("a", switch2, switch2 + 20 * MIN),
        ]
    )
    s = story(timeline, start=t0, switches=(switch1, switch2), version_query=False, target=False)
    await s.run_until(switch2 + 10 * MIN)
    assert s.runs() == [["undo"], ["undo"]]
    assert [state for _, _, state in s.rollbacks()] == [RollbackState.SUCCEEDED] * 2


@pytest.mark.parametrize("guard", ["paused", "frozen"])
async def test_a_bad_release_refused_while_held_back_is_rolled_back_once_released(
    story: type[Story], guard: str
) -> None:
    """Refused means "not now": the check keeps firing, and when a person resumes (or
    thaws) the service, the live bad release is rolled back — once."""
    t0 = origin()
    release = t0 + 30 * MIN
    resume = release + 10 * MIN
    switch = resume + 2 * MIN
    timeline = Timeline(
        [
            Segment("1.0.0", t0, release - 15),
            Segment("2.0.0", release, switch - 15, error_ratio=0.3),
            Segment("1.0.0", switch, switch + 20 * MIN),
        ]
    )
    s = story(timeline, start=t0, switches=(switch,))
    await s.run_until(release - 5 * MIN)
    if guard == "paused":
        s.store.set_pause(SERVICE, True, s.now)
    else:
        s.store.set_frozen(SERVICE, True, "a person froze it")
    await s.run_until(resume)
    assert s.runs() == [] and s.rollbacks() == []
    assert s.events("rollback.refused") == ["rollback.refused"]
    s.store.set_pause(SERVICE, False, s.now)  # rollbackd resume: also thaws
    s.store.set_frozen(SERVICE, False)
    await s.run_until(switch + 10 * MIN)
    assert s.runs() == [["1.0.0"]]
    assert s.rollbacks() == [("2.0.0", "1.0.0", RollbackState.SUCCEEDED)]


async def test_an_approval_nobody_gave_in_time_is_asked_again_while_the_release_is_bad(
    story: type[Story],
) -> None:
    t0 = origin()
    release = t0 + 30 * MIN
    end = release + 70 * MIN
    timeline = Timeline(
        [Segment("1.0.0", t0, release - 15), Segment("2.0.0", release, end, error_ratio=0.3)]
    )
    s = story(timeline, start=t0, mode="approve")
    await s.run_until(release + 40 * MIN)  # past the default approval_timeout (30m)
    states = [state for _, _, state in s.rollbacks()]
    assert states == [RollbackState.EXPIRED, RollbackState.PENDING]
    assert s.runs() == []
