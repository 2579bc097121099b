"""The SQLite state store's own matters, against real database files: the schema and its
migrations, pragmas, the file, the read connections. The behaviour every backend shares is
in test_store_contract.py."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollbackd.core.model import Event, VersionSource
from rollbackd.store.errors import SchemaTooNewError, StoreError
from rollbackd.store.sqlite import SCHEMA_VERSION, Store, database, migrations
from support.store_history import deploy

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


# Schema and migrations


def test_creates_the_schema_in_an_empty_file(store: Store, db: Path) -> None:
    assert store.schema_version() == SCHEMA_VERSION == len(migrations.MIGRATIONS)
    assert raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    tables = {name for (name,) in raw(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"versions", "version_changes", "service_state", "events"} <= tables


def test_runs_in_wal_mode_with_durable_commits_and_foreign_keys(store: Store, db: Path) -> None:
    # journal_mode=WAL is stored in the file, so any connection sees it.
    assert raw(db, "PRAGMA journal_mode") == [("wal",)]
    # The others are per connection: look at the store's own writer.
    conn = store._writer
    assert conn is not None
    assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO version_changes (service, to_version, at, source) "
            "VALUES ('checkout', 'no-such-version', 1, 'api')"
        )


def test_read_connections_wait_out_a_busy_file_and_never_write(store: Store) -> None:
    with store._read() as conn:
        assert conn is not store._writer
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
        assert conn.execute("PRAGMA query_only").fetchone() == (1,)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("INSERT INTO pauses (scope, at) VALUES ('*', 1)")
    assert store.paused() == set()


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
    later = (*migrations.MIGRATIONS, ("CREATE TABLE future_things (id INTEGER PRIMARY KEY)",))
    monkeypatch.setattr(migrations, "MIGRATIONS", later)
    with Store(db) as new:
        assert new.schema_version() == SCHEMA_VERSION + 1
        assert new.version("checkout", "1.0") is not None
    assert raw(db, "SELECT count(*) FROM future_things") == [(0,)]


def test_a_failing_migration_changes_nothing(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Store(db).close()
    broken = (
        *migrations.MIGRATIONS,
        ("CREATE TABLE future_things (id INTEGER PRIMARY KEY)", "INSERT INTO nowhere VALUES (1)"),
    )
    monkeypatch.setattr(migrations, "MIGRATIONS", broken)
    with pytest.raises(StoreError, match=f"migration to schema version {SCHEMA_VERSION + 1}"):
        Store(db)
    assert raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert raw(db, "SELECT name FROM sqlite_master WHERE name = 'future_things'") == []


def test_migrating_from_empty_is_all_or_nothing(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = (*migrations.MIGRATIONS, ("SELECT * FROM nowhere",))
    monkeypatch.setattr(migrations, "MIGRATIONS", broken)
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
    with pytest.raises(StoreError, match="closed"):
        opened.set_paused("checkout", True)


# Read connections


def test_reads_reuse_their_connections_and_close_closes_them_all(db: Path) -> None:
    store = Store(db)
    with store._read() as first:
        pass
    with store._read() as again:
        assert again is first  # handed back, taken again: no new connection per read
    with store._read() as outer, store._read() as inner:
        assert inner is not outer  # two reads in flight: one connection each
    store.close()
    for conn in (outer, inner):
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")


def test_a_read_in_flight_at_close_finishes_and_its_connection_is_closed_after(
    db: Path,
) -> None:
    store = Store(db)
    with store._read() as conn:
        store.close()
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        conn.execute("SELECT 1")


def test_another_process_writing_does_not_stop_reads(store: Store, db: Path) -> None:
    deploy(store, "checkout", "1.0")
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO pauses (scope, at) VALUES ('*', 1)")
        # WAL: reads go on beside the other writer, and see only what it committed.
        state = store.service_state("checkout")
        assert state is not None and state.current_version == "1.0"
        assert store.paused() == set()
        other.execute("COMMIT")
        assert store.paused() == {"*"}
    finally:
        other.close()


def test_a_write_that_fails_is_remembered_until_one_succeeds(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "BUSY_TIMEOUT", 0.05)
    with Store(db) as store:
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="locked"):
                store.add_event(Event(type="check.breach", at=1.0))
            assert store.write_failure is not None and "locked" in store.write_failure
            assert not store.writable()
            assert store.events() == []
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert store.writable()
        assert store.write_failure is None
        store.add_event(Event(type="check.breach", at=2.0))
        assert [e.at for e in store.events()] == [2.0]
