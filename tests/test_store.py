"""The SQLite state store, against real database files."""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rollbackd.core.model import Event, JSONValue, VersionSource
from rollbackd.store import sqlite as store_module
from rollbackd.store.errors import ConflictError, SchemaTooNewError, StoreError
from rollbackd.store.sqlite import SCHEMA_VERSION, Store

DISCOVERED = VersionSource.DISCOVERED


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    with Store(db) as opened:
        yield opened


def raw(db: Path, sql: str) -> list[tuple[object, ...]]:
    """Look at the file with a connection of our own, as another process would."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def deploy(store: Store, service: str, *versions: str, start: float = 1000.0) -> None:
    """Deploy ``versions`` in order, 100 s apart."""
    current = store.service_state(service)
    previous = None if current is None else current.current_version
    for index, version in enumerate(versions):
        store.record_version_change(service, previous, version, start + 100 * index, DISCOVERED)
        previous = version


# Schema and migrations


def test_creates_the_schema_in_an_empty_file(store: Store, db: Path) -> None:
    assert store.schema_version() == SCHEMA_VERSION == len(store_module.MIGRATIONS)
    assert raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    tables = {name for (name,) in raw(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"versions", "version_changes", "service_state", "events"} <= tables


def test_runs_in_wal_mode_with_durable_commits_and_foreign_keys(store: Store, db: Path) -> None:
    # journal_mode=WAL is stored in the file, so any connection sees it.
    assert raw(db, "PRAGMA journal_mode") == [("wal",)]
    # The others are per connection: look at the store's own.
    conn = store._connection()
    assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO version_changes (service, to_version, at, source) "
            "VALUES ('checkout', 'no-such-version', 1, 'api')"
        )


def test_reopening_keeps_everything(db: Path) -> None:
    with Store(db) as first:
        deploy(first, "checkout", "1.0", "1.1")
        first.mark_baked("checkout", "1.0", 1050.0)
        first.set_paused("checkout", True)
        first.add_event(Event(type="check.breach", at=1200.0, service="checkout"))
    with Store(db) as second:
        state = second.service_state("checkout")
        assert state is not None
        assert (state.current_version, state.current_since, state.paused) == ("1.1", 1100.0, True)
        assert [c.to_version for c in second.version_changes("checkout")] == ["1.1", "1.0"]
        lkg = second.last_known_good("checkout", exclude="1.1")
        assert lkg is not None and lkg.version == "1.0"
        assert [e.type for e in second.events()] == ["check.breach"]
        assert second.schema_version() == SCHEMA_VERSION


def test_refuses_a_database_from_a_newer_rollbackd(db: Path) -> None:
    Store(db).close()
    raw(db, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNewError, match=rf"schema version {SCHEMA_VERSION + 1}.*newer"):
        Store(db)
    assert raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]


def test_applies_new_migrations_to_an_existing_database(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(db) as old:
        deploy(old, "checkout", "1.0")
    later = (*store_module.MIGRATIONS, ("CREATE TABLE future_things (id INTEGER PRIMARY KEY)",))
    monkeypatch.setattr(store_module, "MIGRATIONS", later)
    with Store(db) as new:
        assert new.schema_version() == SCHEMA_VERSION + 1
        assert new.version("checkout", "1.0") is not None
    assert raw(db, "SELECT count(*) FROM future_things") == [(0,)]


def test_a_failing_migration_changes_nothing(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Store(db).close()
    broken = (
        *store_module.MIGRATIONS,
        ("CREATE TABLE future_things (id INTEGER PRIMARY KEY)", "INSERT INTO nowhere VALUES (1)"),
    )
    monkeypatch.setattr(store_module, "MIGRATIONS", broken)
    with pytest.raises(StoreError, match=f"migration to schema version {SCHEMA_VERSION + 1}"):
        Store(db)
    assert raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert raw(db, "SELECT name FROM sqlite_master WHERE name = 'future_things'") == []


def test_migrating_from_empty_is_all_or_nothing(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = (*store_module.MIGRATIONS, ("SELECT * FROM nowhere",))
    monkeypatch.setattr(store_module, "MIGRATIONS", broken)
    with pytest.raises(StoreError):
        Store(db)
    assert raw(db, "PRAGMA user_version") == [(0,)]
    assert raw(db, "SELECT name FROM sqlite_master WHERE type = 'table'") == []


def test_refuses_a_file_that_is_not_a_database(db: Path) -> None:
    db.write_bytes(b"not a database at all, " * 100)
    with pytest.raises(StoreError, match="not a database"):
        Store(db)


def test_refuses_a_missing_directory_rather_than_creating_it(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open state database"):
        Store(tmp_path / "no-such-dir" / "state.db")
    assert not (tmp_path / "no-such-dir").exists()


def test_closed_store_says_so(db: Path) -> None:
    opened = Store(db)
    assert opened.writable()
    opened.close()
    opened.close()
    assert not opened.writable()
    with pytest.raises(StoreError, match="closed"):
        opened.service_state("checkout")


# Versions and release history


def test_version_changes_are_kept_in_order_with_one_record_per_version(store: Store) -> None:
    store.record_version_change("checkout", None, "1.0", 100.0, VersionSource.START)
    store.record_version_change("checkout", "1.0", "1.1", 200.0, DISCOVERED)
    store.record_version_change("checkout", "1.1", "1.0", 300.0, VersionSource.API)
    store.record_version_change("checkout", "1.0", "1.2", 300.0, DISCOVERED)

    history = store.version_changes("checkout")
    assert [(c.from_version, c.to_version, c.at, c.source) for c in history] == [
        ("1.0", "1.2", 300.0, DISCOVERED),
        ("1.1", "1.0", 300.0, VersionSource.API),
        ("1.0", "1.1", 200.0, DISCOVERED),
        (None, "1.0", 100.0, VersionSource.START),
    ]
    assert [c.to_version for c in store.version_changes("checkout", limit=2)] == ["1.2", "1.0"]

    records = {r.version: r for r in store.versions("checkout")}
    assert sorted(records) == ["1.0", "1.1", "1.2"]
    # Deployed twice, still one record: first sighting kept, last sighting moved on.
    assert (records["1.0"].first_seen, records["1.0"].last_seen) == (100.0, 300.0)
    assert records["1.0"].source is VersionSource.START
    assert store.went_live_at("checkout") == {"1.0": 300.0, "1.1": 200.0, "1.2": 300.0}

    state = store.service_state("checkout")
    assert state is not None
    assert (state.current_version, state.current_since) == ("1.2", 300.0)


def test_services_are_kept_apart(store: Store) -> None:
    deploy(store, "checkout", "1.0", "1.1")
    deploy(store, "search", "1.0")
    assert [c.to_version for c in store.version_changes("search")] == ["1.0"]
    assert [s.service for s in store.service_states()] == ["checkout", "search"]
    assert store.version("search", "1.1") is None


def test_a_change_from_a_stale_version_is_refused(store: Store) -> None:
    deploy(store, "checkout", "1.0", "1.1")
    with pytest.raises(ConflictError, match=r"current version is now '1\.1'"):
        store.record_version_change("checkout", "1.0", "1.2", 500.0, DISCOVERED)
    assert store.version("checkout", "1.2") is None
    assert len(store.version_changes("checkout")) == 2


def test_release_metadata_is_kept_and_replaced_only_when_given(store: Store) -> None:
    store.record_version_change("api", None, "1.0", 1.0, VersionSource.API, {"commit": "abc"})
    store.record_version_change("api", "1.0", "1.1", 2.0, VersionSource.API)
    store.record_version_change("api", "1.1", "1.0", 3.0, VersionSource.API)
    record = store.version("api", "1.0")
    assert record is not None and record.meta == {"commit": "abc"}
    store.record_version_change("api", "1.0", "1.1", 4.0, VersionSource.API, {"commit": "def"})
    record = store.version("api", "1.1")
    assert record is not None and record.meta == {"commit": "def"}


def test_touch_moves_last_seen_forward_only(store: Store) -> None:
    deploy(store, "checkout", "1.0")
    store.touch_version("checkout", "1.0", 5000.0)
    store.touch_version("checkout", "1.0", 4000.0)
    record = store.version("checkout", "1.0")
    assert record is not None and record.last_seen == 5000.0


def test_bake_clock_restarts_at_a_change_only_if_it_was_running(store: Store) -> None:
    deploy(store, "checkout", "1.0")
    store.set_healthy_since("checkout", 1010.0)
    store.record_version_change("checkout", "1.0", "1.1", 2000.0, DISCOVERED)
    state = store.service_state("checkout")
    assert state is not None and state.healthy_since == 2000.0

    store.set_healthy_since("checkout", None)
    store.record_version_change("checkout", "1.1", "1.2", 3000.0, DISCOVERED)
    state = store.service_state("checkout")
    assert state is not None and state.healthy_since is None


def test_baked_once_and_never_when_bad(store: Store) -> None:
    deploy(store, "checkout", "1.0", "1.1")
    assert store.mark_baked("checkout", "1.0", 1050.0)
    assert not store.mark_baked("checkout", "1.0", 1060.0)
    record = store.version("checkout", "1.0")
    assert record is not None and record.baked_at == 1050.0

    assert store.mark_bad("checkout", "1.1", "error-rate 0.31 > 0.05")
    assert not store.mark_baked("checkout", "1.1", 1200.0)
    record = store.version("checkout", "1.1")
    assert record is not None
    assert (record.bad, record.bad_reason, record.baked_at) == (
        True,
        "error-rate 0.31 > 0.05",
        None,
    )
    assert not store.mark_bad("checkout", "9.9", "unknown")


@pytest.mark.parametrize(
    ("deployed", "baked", "bad", "exclude", "expected"),
    [
        pytest.param([], [], [], None, None, id="nothing-known"),
        pytest.param(["1", "2"], [], [], "2", None, id="nothing-baked"),
        pytest.param(["1", "2", "3"], ["1", "2"], [], "3", "2", id="latest-baked"),
        pytest.param(["1", "2"], ["1", "2"], [], "2", "1", id="excludes-current"),
        pytest.param(["1", "2"], ["1", "2"], [], None, "2", id="no-exclusion"),
        pytest.param(["1", "2", "3"], ["1", "2"], ["2"], "3", "1", id="skips-bad"),
        # 2 baked after 1 but 1 was deployed again later: 1 ran most recently.
        pytest.param(["1", "2", "1", "3"], ["1", "2"], [], "3", "1", id="redeployed-counts"),
    ],
)
def test_last_known_good(
    store: Store,
    deployed: list[str],
    baked: list[str],
    bad: list[str],
    exclude: str | None,
    expected: str | None,
) -> None:
    deploy(store, "checkout", *deployed)
    for version in baked:
        assert store.mark_baked("checkout", version, 5000.0 + int(version))
    for version in bad:
        store.mark_bad("checkout", version, "rolled back")
    record = store.last_known_good("checkout", exclude=exclude)
    assert (None if record is None else record.version) == expected


# Service switches


def test_pause_and_freeze_work_before_any_version_is_known(store: Store) -> None:
    store.set_paused("checkout", True)
    store.set_frozen("checkout", True, "3 rollbacks in 1h")
    state = store.service_state("checkout")
    assert state is not None
    assert (state.current_version, state.paused, state.frozen) == (None, True, True)
    assert state.frozen_reason == "3 rollbacks in 1h"

    deploy(store, "checkout", "1.0")
    store.set_frozen("checkout", False, "ignored when thawing")
    state = store.service_state("checkout")
    assert state is not None
    assert (state.current_version, state.paused, state.frozen, state.frozen_reason) == (
        "1.0",
        True,
        False,
        None,
    )
    assert store.service_state("unknown") is None


# The audit log


def test_events_round_trip_with_json_data(store: Store) -> None:
    data: dict[str, JSONValue] = {
        "check": "error-rate",
        "value": 0.31,
        "threshold": 0.05,
        "labels": {"code": "500"},
        "versions": ["1.0", "1.1"],
        "firing": True,
        "note": None,
    }
    event_id = store.add_event(
        Event(type="check.breach", at=10.0, service="checkout", rollback_id=7, data=data)
    )
    (event,) = store.events()
    assert event == Event(
        type="check.breach", at=10.0, service="checkout", rollback_id=7, data=data, id=event_id
    )


def test_non_finite_values_are_stored_as_prometheus_spells_them(store: Store) -> None:
    store.add_event(
        Event(type="check.recovered", at=1.0, data={"values": [math.nan, math.inf, -math.inf]})
    )
    (event,) = store.events()
    assert event.data == {"values": ["NaN", "+Inf", "-Inf"]}


def test_events_filter_and_come_latest_first(store: Store) -> None:
    for at, kind, service in [
        (1.0, "check.breach", "checkout"),
        (2.0, "prometheus.unreachable", None),
        (3.0, "rollback.started", "checkout"),
        (4.0, "check.breach", "search"),
        (5.0, "rollback.succeeded", "checkout"),
    ]:
        store.add_event(Event(type=kind, at=at, service=service))

    def ats(events: list[Event]) -> list[float]:
        return [e.at for e in events]

    assert ats(store.events()) == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert ats(store.events(limit=2)) == [5.0, 4.0]
    assert ats(store.events(service="checkout")) == [5.0, 3.0, 1.0]
    assert ats(store.events(since=3.0)) == [5.0, 4.0, 3.0]
    assert ats(store.events(types=["check.breach"])) == [4.0, 1.0]
    assert ats(store.events(types="check.breach")) == [4.0, 1.0]
    assert ats(store.events(types=[])) == []
    assert ats(store.events(service="checkout", since=2.0, types=["rollback.started"])) == [3.0]
    with pytest.raises(ValueError, match="limit must be positive"):
        store.events(limit=0)


# Concurrency


def test_concurrent_writes_from_threads_all_land(store: Store) -> None:
    threads, per_thread = 8, 40
    start = threading.Barrier(threads)

    def work(worker: int) -> None:
        start.wait()
        service = f"svc-{worker}"
        previous = None
        for i in range(per_thread):
            store.add_event(Event(type="check.breach", at=float(i), service=service))
            version = f"1.{i}"
            store.record_version_change(service, previous, version, float(i), DISCOVERED)
            store.touch_version(service, version, float(i) + 0.5)
            previous = version
            assert store.writable()

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(work, n) for n in range(threads)]:
            future.result()

    assert len(store.events(limit=10_000)) == threads * per_thread
    for worker in range(threads):
        state = store.service_state(f"svc-{worker}")
        assert state is not None and state.current_version == f"1.{per_thread - 1}"
        assert len(store.version_changes(f"svc-{worker}", limit=1000)) == per_thread


def test_two_stores_on_one_file_wait_for_each_other(db: Path) -> None:
    # A second connection (the CLI, say) must queue behind the busy timeout, not fail.
    with Store(db) as first, Store(db) as second:

        def work(store: Store, name: str) -> None:
            for i in range(50):
                store.add_event(Event(type="check.breach", at=float(i), service=name))

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(work, first, "a"), pool.submit(work, second, "b")]
            for future in futures:
                future.result()
        assert len(first.events(limit=1000)) == 100
