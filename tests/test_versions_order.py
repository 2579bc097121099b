"""Versions that do not flap, applied in time order.

A version missing from one answer is not a rollback, and an older answer applied after a
newer one does not undo it. Against real SQLite files; every time is passed in."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from rollbackd.core.model import VersionSource
from rollbackd.core.samples import Sample, labels_of
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.versions import ABSENCE_GRACE, VersionObservation, VersionTracker
from rollbackd.store.sqlite import Store
from support.configs import load_config, service
from support.prometheus import PrometheusServer, create_blocks

LABEL = "version"
GRACE = 15.0


def answer(*versions: str) -> list[Sample]:
    return [Sample(labels=labels_of({LABEL: v}), value=1.0, timestamp=0.0) for v in versions]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    with Store(db) as opened:
        yield opened


@pytest.fixture
def tracker(store: Store) -> VersionTracker:
    return VersionTracker(store)


async def observe(tracker: VersionTracker, now: float, *versions: str) -> VersionObservation:
    return await tracker.observe("checkout", answer(*versions), LABEL, now, absence_grace=GRACE)


def history(store: Store) -> list[tuple[str | None, str, float]]:
    """The release history, oldest first."""
    return [
        (c.from_version, c.to_version, c.at) for c in reversed(store.version_changes("checkout"))
    ]


async def released(tracker: VersionTracker) -> None:
    """1.0 live since 100, then 1.1 released at 200 and current."""
    await observe(tracker, 100.0, "1.0")
    assert (await observe(tracker, 200.0, "1.0", "1.1")).changed


# A version missing briefly


async def test_one_answer_without_the_new_version_is_no_release(
    tracker: VersionTracker, store: Store
) -> None:
    await released(tracker)
    # 1.1's series were missing from one scrape; only the old pods answered.
    missed = await observe(tracker, 215.0, "1.0")
    assert (missed.current, missed.changed, missed.previous) == ("1.1", False, None)
    assert missed.missing_since == 215.0
    back = await observe(tracker, 230.0, "1.0", "1.1")
    assert (back.current, back.changed, back.missing_since) == ("1.1", False, None)
    assert history(store) == [(None, "1.0", 100.0), ("1.0", "1.1", 200.0)]
    assert tracker.current_since("checkout") == 200.0


async def test_missing_again_and_again_never_flaps(tracker: VersionTracker, store: Store) -> None:
    await released(tracker)
    # Each absence is shorter than the grace, and the clock starts over at each return.
    for now in range(215, 215 + 30 * 10, 30):
        assert (await observe(tracker, now, "1.0")).current == "1.1"
        assert (await observe(tracker, now + 14.0, "1.0")).current == "1.1"
        assert (await observe(tracker, now + 15.0, "1.1")).current == "1.1"
    assert len(history(store)) == 2


async def test_a_real_rollback_takes_over_once_the_grace_has_passed(
    tracker: VersionTracker, store: Store
) -> None:
    await released(tracker)
    assert (await observe(tracker, 215.0, "1.0")).current == "1.1"
    assert (await observe(tracker, 229.0, "1.0")).current == "1.1"
    rolled_back = await observe(tracker, 230.0, "1.0")
    assert (rolled_back.current, rolled_back.changed, rolled_back.previous) == ("1.0", True, "1.1")
    assert (rolled_back.detected_at_start, rolled_back.missing_since) == (False, None)
    # Dated when the answers first showed it: a breach from then on is its doing.
    assert history(store)[-1] == ("1.1", "1.0", 215.0)
    assert tracker.current_since("checkout") == 215.0
    assert store.version_changes("checkout", limit=1)[0].source is VersionSource.DISCOVERED
    # Seen at 230, though it went live at 215.
    await tracker.flush()
    record = store.version("checkout", "1.0")
    assert record is not None and record.last_seen == 230.0
    # 1.1's lingering series do not bring it back.
    assert not (await observe(tracker, 245.0, "1.1", "1.0")).changed
    assert len(history(store)) == 3


async def test_a_never_seen_version_takes_over_at_once_even_while_one_is_missing(
    tracker: VersionTracker, store: Store
) -> None:
    await released(tracker)
    await observe(tracker, 215.0, "1.0")
    seen = await observe(tracker, 220.0, "1.0", "1.2")
    assert (seen.current, seen.changed, seen.previous, seen.missing_since) == (
        "1.2",
        True,
        "1.1",
        None,
    )
    assert history(store)[-1] == ("1.1", "1.2", 220.0)


async def test_an_answer_without_a_valid_version_neither_starts_nor_ends_an_absence(
    tracker: VersionTracker, store: Store
) -> None:
    await released(tracker)
    # Nothing answered for a long time: that says nothing about which version runs.
    assert (await observe(tracker, 215.0)).current == "1.1"
    assert (await observe(tracker, 900.0)).current == "1.1"
    # The first answer naming only 1.0 starts the absence, an empty one does not end it.
    assert (await observe(tracker, 915.0, "1.0")).missing_since == 915.0
    assert (await observe(tracker, 920.0)).current == "1.1"
    assert (await observe(tracker, 930.0, "1.0")).changed
    assert history(store)[-1] == ("1.1", "1.0", 915.0)


async def test_no_grace_is_the_instant_switch(tracker: VersionTracker) -> None:
    await released(tracker)
    seen = await tracker.observe("checkout", answer("1.0"), LABEL, 215.0, absence_grace=0.0)
    assert (seen.current, seen.changed) == ("1.0", True)


async def test_the_default_grace_is_one_default_poll(tracker: VersionTracker) -> None:
    assert ABSENCE_GRACE == 15.0
    await tracker.observe("checkout", answer("1.0"), LABEL, 100.0)
    await tracker.observe("checkout", answer("1.1"), LABEL, 200.0)
    assert not (await tracker.observe("checkout", answer("1.0"), LABEL, 215.0)).changed
    assert (await tracker.observe("checkout", answer("1.0"), LABEL, 230.0)).changed


async def test_a_missing_version_does_not_bake_until_it_answers_again(
    tracker: VersionTracker, store: Store
) -> None:
    bake = timedelta(seconds=100)
    await released(tracker)
    assert await tracker.update_bake("checkout", 200.0, True, bake) is None
    await observe(tracker, 295.0, "1.0")
    # Baking time is up, but 1.1 may have been rolled back: it is not the last known good yet.
    assert await tracker.update_bake("checkout", 300.0, True, bake) is None
    await observe(tracker, 305.0, "1.1")
    assert await tracker.update_bake("checkout", 305.0, True, bake) == "1.1"


async def test_a_version_changed_while_down_is_held_too_and_then_detected_at_start(
    db: Path,
) -> None:
    with Store(db) as before:
        await released(VersionTracker(before))
    with Store(db) as after:
        tracker = VersionTracker(after)
        first = await observe(tracker, 5000.0, "1.0")
        assert (first.current, first.changed, first.missing_since) == ("1.1", False, 5000.0)
        seen = await observe(tracker, 5015.0, "1.0")
        assert (seen.current, seen.changed, seen.detected_at_start) == ("1.0", True, True)
        (change,) = after.version_changes("checkout", limit=1)
        assert (change.to_version, change.at, change.source) == ("1.0", 5000.0, VersionSource.START)


async def test_after_a_restart_the_current_version_answering_again_is_no_change(db: Path) -> None:
    with Store(db) as before:
        await released(VersionTracker(before))
    with Store(db) as after:
        tracker = VersionTracker(after)
        await observe(tracker, 5000.0, "1.0")
        seen = await observe(tracker, 5010.0, "1.1")
        assert (seen.current, seen.changed) == ("1.1", False)
        # Seen since the start: a later rollback is one this daemon watched happen.
        await observe(tracker, 5020.0, "1.0")
        later = await observe(tracker, 5035.0, "1.0")
        assert (later.changed, later.detected_at_start) == (True, False)


# Time order


async def test_an_older_answer_applied_late_is_ignored(
    tracker: VersionTracker, store: Store
) -> None:
    await released(tracker)
    # The verifier's query from before the release comes back after the service job's.
    stale = await observe(tracker, 150.0, "1.0")
    assert (stale.current, stale.changed, stale.previous, stale.missing_since) == (
        "1.1",
        False,
        None,
        None,
    )
    assert stale.first_seen == 200.0
    assert len(history(store)) == 2


async def test_an_older_answer_does_not_start_an_absence(tracker: VersionTracker) -> None:
    await released(tracker)
    await observe(tracker, 190.0, "1.0")
    # Had 190 counted, 1.1 would count as missing since then and 1.0 take over at 210.
    seen = await observe(tracker, 210.0, "1.0")
    assert (seen.current, seen.changed, seen.missing_since) == ("1.1", False, 210.0)


async def test_an_older_answer_cannot_undo_a_new_release(
    tracker: VersionTracker, store: Store
) -> None:
    await tracker.observe("checkout", answer("1.0"), LABEL, 100.0, absence_grace=0.0)
    await tracker.observe("checkout", answer("1.1"), LABEL, 200.0, absence_grace=0.0)
    # Without time order, even with no grace at all this would be a rollback to 1.0.
    seen = await tracker.observe("checkout", answer("1.0"), LABEL, 199.0, absence_grace=0.0)
    assert (seen.current, seen.changed) == ("1.1", False)
    assert len(history(store)) == 2


async def test_answers_at_the_same_time_both_apply(tracker: VersionTracker) -> None:
    await observe(tracker, 100.0, "1.0")
    assert (await observe(tracker, 200.0, "1.0", "1.1")).changed
    assert (await observe(tracker, 200.0, "1.1")).current == "1.1"


async def test_time_order_is_per_service(tracker: VersionTracker) -> None:
    await tracker.observe("search", answer("3.0"), LABEL, 500.0)
    # checkout's first answer is older than search's latest: it applies all the same.
    assert (await observe(tracker, 100.0, "1.0")).changed


async def test_a_release_through_the_api_is_never_dated_before_the_last_one(
    tracker: VersionTracker, store: Store
) -> None:
    await tracker.record_release("batch", "1", now=100.0)
    # The wall clock stepped back: the release is kept (CI will not send it again), and
    # dated no earlier than the one it replaces, so the history stays in order.
    seen = await tracker.record_release("batch", "2", now=90.0)
    assert (seen.current, seen.changed, seen.previous) == ("2", True, "1")
    assert [(c.to_version, c.at) for c in store.version_changes("batch")] == [
        ("2", 100.0),
        ("1", 100.0),
    ]
    assert store.went_live_at("batch") == {"1": 100.0, "2": 100.0}
    assert tracker.current_since("batch") == 100.0


# In the engine, against a real Prometheus


def pods_openmetrics(path: Path, start: int, running: dict[str, list[bool]]) -> None:
    """``app_pods`` of each version every 15 s: 1 while it runs, 0 when it does not."""
    lines = ["# TYPE app_pods gauge"]
    for version, steps in running.items():
        lines += [
            f'app_pods{{service="flappy",version="{version}"}} {int(up)} {start + 15 * i}'
            for i, up in enumerate(steps)
        ]
    lines.append("# EOF")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.prometheus
async def test_the_engine_holds_a_missing_version_for_one_service_poll(
    tmp_path: Path, prometheus_factory: Callable[..., PrometheusServer]
) -> None:
    # Old enough to be backfilled, not in the head block.
    start = (int(time.time()) // 60) * 60 - 3 * 3600
    steps = 16
    # 2.0.0 is released at step 4, its series are missing for 3 steps (45 s, less than the
    # 1 min poll), and from step 11 on it is gone: rolled back to 1.0.0.
    new = [4 <= i <= 10 and not 5 <= i <= 7 for i in range(steps)]
    data = tmp_path / "pods.om"
    pods_openmetrics(data, start, {"1.0.0": [True] * steps, "2.0.0": new})
    prometheus = prometheus_factory(start=False)
    create_blocks(data, prometheus.storage_dir)
    prometheus.start()
    prometheus.wait_ready()
    header = (
        "version_query = 'max by (version) (app_pods{service=\"flappy\"} > 0)'\n"
        'version_label = "version"\n'
    )
    check = (
        '[[check]]\nname = "pods"\ntype = "query"\n'
        'query = \'sum(app_pods{service="flappy"})\'\nabove = 100\ninterval = "1m"\n'
    )
    loaded = load_config(
        tmp_path, prometheus.url, {"flappy": service("flappy", check, header=header)}
    )
    engine = Engine(
        loaded, PrometheusClient(loaded.config.prometheus), Store(tmp_path / "state.db")
    )
    try:
        flappy = loaded.services["flappy"]
        current = []
        for i in range(steps):
            await engine.observe_service(flappy, float(start + 15 * i))
            current.append(engine.versions.current("flappy"))
        assert current == ["1.0.0"] * 4 + ["2.0.0"] * 11 + ["1.0.0"]
        changes = [
            (c.from_version, c.to_version, c.at)
            for c in reversed(engine.store.version_changes("flappy"))
        ]
        assert changes == [
            (None, "1.0.0", start),
            ("1.0.0", "2.0.0", start + 15 * 4),
            ("2.0.0", "1.0.0", start + 15 * 11),
        ]
        # Announced when the grace has passed; the change itself is dated when it began.
        events = engine.store.events(service="flappy", types=["version.changed"])
        assert sorted(e.at for e in events) == [start, start + 15 * 4, start + 15 * 15]
    finally:
        engine.store.close()
        engine.client.close()
