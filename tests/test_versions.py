"""The version tracker: current version, release history, bake time, last known good.

Against real SQLite files; every time is passed in, so nothing waits."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from rollbackd.core.model import VersionSource
from rollbackd.core.samples import Sample, labels_of
from rollbackd.runtime.versions import (
    TOUCH_FLUSH_EVERY,
    VersionTracker,
    candidates,
    is_valid_version,
    pick_current,
)
from rollbackd.store.sqlite import Store

LABEL = "version"
BAKE = timedelta(minutes=10)


def sample(version: str | None, value: float = 1.0, **labels: str) -> Sample:
    if version is not None:
        labels[LABEL] = version
    return Sample(labels=labels_of(labels), value=value, timestamp=0.0)


def answer(*versions: str) -> list[Sample]:
    return [sample(version) for version in versions]


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


# Which version is current


@pytest.mark.parametrize(
    ("samples", "known", "expected"),
    [
        pytest.param([], {}, None, id="empty-answer"),
        pytest.param([sample("1.0")], {}, "1.0", id="one-new"),
        pytest.param([sample("1.0")], {"1.0": 5.0}, "1.0", id="one-known"),
        pytest.param([sample("1.0"), sample("1.1")], {"1.0": 5.0}, "1.1", id="new-beats-known"),
        pytest.param(
            [sample("1.1"), sample("1.0")], {"1.0": 5.0, "1.1": 9.0}, "1.1", id="latest-known"
        ),
        pytest.param(
            [sample("1.1"), sample("1.0")], {"1.0": 9.0, "1.1": 5.0}, "1.0", id="not-by-name"
        ),
        pytest.param([sample("a", 3.0), sample("b", 1.0)], {}, "a", id="several-new-highest-value"),
        pytest.param(
            [sample("b", 1.0), sample("a", 1.0)], {}, "b", id="several-new-greatest-string"
        ),
        pytest.param(
            [sample("a", 1.0), sample("b", 1.0, pod="x"), sample("a", 2.0, pod="y")],
            {},
            "a",
            id="value-is-max-over-series",
        ),
        pytest.param(
            [sample("a", math.nan), sample("b", 0.0)], {}, "b", id="nan-value-ranks-lowest"
        ),
        pytest.param(
            [sample("x", 1.0), sample("y", 1.0)], {"x": 5.0, "y": 5.0}, "y", id="known-tie"
        ),
        pytest.param(
            [sample(None), sample(""), sample("1.0")], {"1.0": 1.0}, "1.0", id="no-label-ignored"
        ),
        pytest.param(
            [sample("bad/version"), sample("1.0")], {"1.0": 1.0}, "1.0", id="invalid-ignored"
        ),
        pytest.param([sample("$(reboot)")], {}, None, id="only-invalid"),
    ],
)
def test_pick_current(samples: list[Sample], known: dict[str, float], expected: str | None) -> None:
    assert pick_current(samples, LABEL, known) == expected
    # The choice must not depend on the order Prometheus sent the series in.
    assert pick_current(list(reversed(samples)), LABEL, known) == expected


@pytest.mark.parametrize(
    "version",
    ["1", "1.2.3", "v1.2.3+build.5", "2024-05-01_rc1", "a" * 128, "0", "sha-3f2a9c1"],
)
def test_valid_versions(version: str) -> None:
    assert is_valid_version(version)


@pytest.mark.parametrize(
    "version",
    [
        "",
        "a" * 129,
        "-1.0",
        ".hidden",
        "_x",
        "../etc/passwd",
        "1.0\n",
        "1.0 ",
        "1 0",
        "1.0;rm -rf /",
        "{to_version}",
        "v1\u00e9",
        '1.0"',
    ],
)
def test_invalid_versions(version: str) -> None:
    assert not is_valid_version(version)


def test_invalid_labels_are_reported_once_each_and_safely() -> None:
    found = candidates(
        [
            sample("1.0"),
            sample("1.0\nFAKE LOG LINE"),
            sample("1.0\nFAKE LOG LINE"),
            sample("x" * 500),
        ],
        LABEL,
    )
    assert dict(found.values) == {"1.0": 1.0}
    assert len(found.rejected) == 2
    assert all("\n" not in reason and len(reason) < 300 for reason in found.rejected)
    assert "not a valid version" in found.rejected[0]


# Observing versions


async def test_first_reading_ever_is_detected_at_start(
    tracker: VersionTracker, store: Store
) -> None:
    seen = await tracker.observe("checkout", answer("1.0"), LABEL, now=100.0)
    assert (seen.current, seen.changed, seen.previous) == ("1.0", True, None)
    assert (seen.first_seen, seen.detected_at_start, seen.rejected) == (100.0, True, ())
    (change,) = store.version_changes("checkout")
    assert (change.to_version, change.source) == ("1.0", VersionSource.START)


async def test_a_release_seen_while_running_is_discovered(
    tracker: VersionTracker, store: Store
) -> None:
    await tracker.observe("checkout", answer("1.0"), LABEL, now=100.0)
    seen = await tracker.observe("checkout", answer("1.0", "1.1"), LABEL, now=200.0)
    assert (seen.current, seen.changed, seen.previous) == ("1.1", True, "1.0")
    assert (seen.first_seen, seen.detected_at_start) == (200.0, False)
    assert [(c.to_version, c.source) for c in store.version_changes("checkout")] == [
        ("1.1", VersionSource.DISCOVERED),
        ("1.0", VersionSource.START),
    ]
    assert tracker.current("checkout") == "1.1"
    assert tracker.current_since("checkout") == 200.0


async def test_the_same_version_again_only_touches_last_seen(
    tracker: VersionTracker, store: Store
) -> None:
    await tracker.observe("checkout", answer("1.0"), LABEL, now=100.0)
    seen = await tracker.observe("checkout", answer("1.0"), LABEL, now=160.0)
    assert (seen.current, seen.changed, seen.previous, seen.detected_at_start) == (
        "1.0",
        False,
        None,
        False,
    )
    assert len(store.version_changes("checkout")) == 1
    record = store.version("checkout", "1.0")
    assert record is not None and (record.first_seen, record.last_seen) == (100.0, 160.0)
    assert tracker.current_since("checkout") == 100.0


async def test_sightings_are_written_together_every_few_seconds(
    tracker: VersionTracker, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a", "b", "c"):
        await tracker.observe(name, answer("1.0"), LABEL, now=100.0)
    writes: list[int] = []
    touch_versions = store.touch_versions

    def counted(seen: list[tuple[str, str, float]]) -> None:
        writes.append(len(seen))
        touch_versions(seen)

    monkeypatch.setattr(store, "touch_versions", counted)

    def last_seen(name: str) -> float:
        record = store.version(name, "1.0")
        assert record is not None
        return record.last_seen

    # The first sighting after a quiet spell is written at once ...
    await tracker.observe("a", answer("1.0"), LABEL, now=200.0)
    assert (writes, last_seen("a")) == ([1], 200.0)
    # ... those within TOUCH_FLUSH_EVERY of the last write wait, then go in one transaction.
    await tracker.observe("b", answer("1.0"), LABEL, now=201.0)
    await tracker.observe("a", answer("1.0"), LABEL, now=203.0)
    assert (writes, last_seen("b")) == ([1], 100.0)
    await tracker.observe("c", answer("1.0"), LABEL, now=200.0 + TOUCH_FLUSH_EVERY)
    assert writes == [1, 3]
    assert [last_seen(name) for name in "abc"] == [203.0, 201.0, 200.0 + TOUCH_FLUSH_EVERY]
    # flush() writes what is pending; a version change is written at once, as ever.
    await tracker.observe("a", answer("1.0"), LABEL, now=206.0)
    await tracker.flush()
    assert (writes, last_seen("a")) == ([1, 3, 1], 206.0)
    assert (await tracker.observe("b", answer("1.1"), LABEL, now=207.0)).changed
    assert store.version("b", "1.1") is not None


async def test_an_answer_without_a_valid_version_changes_nothing(
    tracker: VersionTracker, store: Store
) -> None:
    await tracker.observe("checkout", answer("1.0"), LABEL, now=100.0)
    seen = await tracker.observe("checkout", [sample("no good"), sample(None)], LABEL, now=200.0)
    assert (seen.current, seen.changed, seen.first_seen) == ("1.0", False, 100.0)
    assert len(seen.rejected) == 1
    record = store.version("checkout", "1.0")
    assert record is not None and record.last_seen == 100.0

    nothing = await tracker.observe("search", [], LABEL, now=200.0)
    assert (nothing.current, nothing.changed, nothing.first_seen) == (None, False, None)


async def test_rolling_deploy_picks_the_newest_and_stays_on_it(tracker: VersionTracker) -> None:
    await tracker.observe("checkout", answer("1.0"), LABEL, now=100.0)
    # Old pods and their series linger for a while: the new version stays current.
    for now, versions in [(200.0, ("1.0", "1.1")), (215.0, ("1.1", "1.0")), (230.0, ("1.1",))]:
        seen = await tracker.observe("checkout", answer(*versions), LABEL, now=now)
        assert seen.current == "1.1"
        assert seen.changed == (now == 200.0)


async def test_a_version_deployed_again_is_current_and_lingering_series_do_not_flap(
    tracker: VersionTracker, store: Store
) -> None:
    await tracker.observe("checkout", answer("1.0"), LABEL, now=100.0)
    await tracker.observe("checkout", answer("1.1"), LABEL, now=200.0)
    # Rolled back: only 1.0 answers, for one grace (a known version does not take over
    # at one answer: that may be 1.1's series missing from a scrape) ...
    assert not (await tracker.observe("checkout", answer("1.0"), LABEL, now=300.0)).changed
    assert (await tracker.observe("checkout", answer("1.0"), LABEL, now=315.0)).changed
    # ... and then 1.1's series, not stale yet, show up again.
    seen = await tracker.observe("checkout", answer("1.1", "1.0"), LABEL, now=330.0)
    assert (seen.current, seen.changed) == ("1.0", False)
    assert [c.to_version for c in store.version_changes("checkout")] == ["1.0", "1.1", "1.0"]


async def test_a_bad_version_deployed_again_is_flagged(tracker: VersionTracker) -> None:
    await tracker.observe("checkout", answer("1.0"), LABEL, now=100.0)
    await tracker.observe("checkout", answer("1.1"), LABEL, now=200.0)
    assert await tracker.mark_bad("checkout", "1.1", "error-rate 0.31 > 0.05")
    for now in (300.0, 315.0):
        await tracker.observe("checkout", answer("1.0"), LABEL, now=now)
    assert tracker.current("checkout") == "1.0"
    # Deployed again: a known version, so it takes over once 1.0 has been gone a grace.
    await tracker.observe("checkout", answer("1.1"), LABEL, now=400.0)
    seen = await tracker.observe("checkout", answer("1.1"), LABEL, now=415.0)
    assert (seen.current, seen.changed, seen.bad) == ("1.1", True, True)


# Restarts


@pytest.mark.parametrize(
    ("after_restart", "changed", "source_of_last_change"),
    [
        pytest.param("1.0", False, VersionSource.DISCOVERED, id="same-version-is-no-change"),
        pytest.param("1.2", True, VersionSource.START, id="changed-while-down"),
    ],
)
async def test_restart(
    db: Path, after_restart: str, changed: bool, source_of_last_change: VersionSource
) -> None:
    with Store(db) as before:
        tracker = VersionTracker(before)
        await tracker.observe("checkout", answer("0.9"), LABEL, now=50.0)
        await tracker.observe("checkout", answer("1.0"), LABEL, now=100.0)

    with Store(db) as after:
        tracker = VersionTracker(after)
        seen = await tracker.observe("checkout", answer(after_restart), LABEL, now=5000.0)
        assert (seen.current, seen.changed, seen.detected_at_start) == (
            after_restart,
            changed,
            changed,
        )
        assert seen.previous == ("1.0" if changed else None)
        assert after.version_changes("checkout", limit=1)[0].source is source_of_last_change
        # Later changes are seen happen again.
        later = await tracker.observe("checkout", answer("2.0"), LABEL, now=6000.0)
        assert (later.changed, later.detected_at_start) == (True, False)


# Releases through the API


async def test_record_release(tracker: VersionTracker, store: Store) -> None:
    first = await tracker.record_release(
        "batch", "2024.05.01", now=100.0, meta={"commit": "3f2a9c1"}
    )
    assert (first.current, first.changed, first.previous, first.detected_at_start) == (
        "2024.05.01",
        True,
        None,
        False,
    )
    again = await tracker.record_release("batch", "2024.05.01", now=150.0)
    assert not again.changed
    await tracker.record_release("batch", "2024.05.02", now=200.0)
    assert [(c.to_version, c.source) for c in store.version_changes("batch")] == [
        ("2024.05.02", VersionSource.API),
        ("2024.05.01", VersionSource.API),
    ]
    record = store.version("batch", "2024.05.01")
    assert record is not None and record.meta == {"commit": "3f2a9c1"}
    with pytest.raises(ValueError, match="invalid version"):
        await tracker.record_release("batch", "1.0; rm -rf /", now=300.0)


# Baking


async def ticks(
    tracker: VersionTracker, readings: list[tuple[float, bool]], service: str = "checkout"
) -> list[str | None]:
    return [await tracker.update_bake(service, now, healthy, BAKE) for now, healthy in readings]


async def test_bakes_once_after_bake_time_healthy(tracker: VersionTracker, store: Store) -> None:
    await tracker.observe("checkout", answer("1.0"), LABEL, now=0.0)
    assert await ticks(tracker, [(0.0, True), (300.0, True), (599.0, True), (600.0, True)]) == [
        None,
        None,
        None,
        "1.0",
    ]
    assert await ticks(tracker, [(601.0, True), (900.0, True)]) == [None, None]
    record = store.version("checkout", "1.0")
    assert record is not None and record.baked_at == 600.0


async def test_unhealthy_resets_the_bake_clock(tracker: VersionTracker, store: Store) -> None:
    await tracker.observe("checkout", answer("1.0"), LABEL, now=0.0)
    assert await ticks(tracker, [(0.0, True), (500.0, True), (550.0, False)]) == [None] * 3
    state = store.service_state("checkout")
    assert state is not None and state.healthy_since is None
    assert await ticks(
        tracker, [(560.0, True), (1100.0, True), (1159.0, True), (1160.0, True)]
    ) == [
        None,
        None,
        None,
        "1.0",
    ]


async def test_bake_clock_starts_when_the_version_went_live(tracker: VersionTracker) -> None:
    await tracker.observe("checkout", answer("1.0"), LABEL, now=0.0)
    assert await ticks(tracker, [(0.0, True), (400.0, True)]) == [None, None]
    # Healthy throughout, but 1.1 has only been live since 500.
    await tracker.observe("checkout", answer("1.1"), LABEL, now=500.0)
    assert await ticks(tracker, [(600.0, True), (1099.0, True), (1100.0, True)]) == [
        None,
        None,
        "1.1",
    ]


async def test_a_bad_version_never_bakes(tracker: VersionTracker, store: Store) -> None:
    await tracker.observe("checkout", answer("1.0"), LABEL, now=0.0)
    await tracker.mark_bad("checkout", "1.0", "manual rollback: memory leak")
    assert await ticks(tracker, [(0.0, True), (600.0, True), (6000.0, True)]) == [None] * 3
    record = store.version("checkout", "1.0")
    assert record is not None and record.baked_at is None


async def test_nothing_to_bake_without_a_version(tracker: VersionTracker) -> None:
    assert await ticks(tracker, [(0.0, True), (6000.0, True)], service="unknown") == [None, None]


async def test_bake_clock_restarts_after_a_daemon_restart(db: Path) -> None:
    with Store(db) as before:
        tracker = VersionTracker(before)
        await tracker.observe("checkout", answer("1.0"), LABEL, now=0.0)
        assert await ticks(tracker, [(0.0, True), (500.0, True)]) == [None, None]
    with Store(db) as after:
        tracker = VersionTracker(after)
        # Down from 500 to 700: nobody saw whether it stayed healthy.
        await tracker.observe("checkout", answer("1.0"), LABEL, now=700.0)
        assert await ticks(tracker, [(700.0, True), (1299.0, True), (1300.0, True)]) == [
            None,
            None,
            "1.0",
        ]


# Last known good


async def test_last_known_good_excludes_current_and_bad(tracker: VersionTracker) -> None:
    async def release(version: str, at: float, bakes: bool) -> None:
        await tracker.observe("checkout", answer(version), LABEL, now=at)
        if bakes:
            assert await ticks(tracker, [(at, True), (at + 600.0, True)]) == [None, version]

    assert tracker.last_known_good("checkout") is None
    await release("1.0", 0.0, bakes=True)
    assert tracker.last_known_good("checkout") is None  # the only good one is running
    await release("1.1", 1000.0, bakes=True)
    assert tracker.last_known_good("checkout") == "1.0"
    await release("1.2", 2000.0, bakes=False)
    assert tracker.last_known_good("checkout") == "1.1"
    await tracker.mark_bad("checkout", "1.1", "found a data corruption bug")
    assert tracker.last_known_good("checkout") == "1.0"
