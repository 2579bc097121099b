"""The state store: what rollbackd must remember across restarts, on SQLite.

All SQL of the project lives in this module, so that a PostgreSQL backend (several
daemons sharing one state) can later stand beside it behind the same methods. Callers
get frozen dataclasses, never rows or dicts.

Errors::

    StoreError              the store cannot do what was asked; wraps sqlite3.Error
    ├── SchemaTooNewError   the database was written by a newer rollbackd
    └── ConflictError       a write was based on a state that changed meanwhile

Durability: WAL with ``synchronous=FULL``. With NORMAL a WAL database stays
consistent, but a power loss or kernel crash may drop the transactions committed just
before it. Those are the ones that matter most here: a lost "rollback started" record
weakens the cooldown and max-rollbacks guards after a host reboot, and an audit log
that forgets the last thing the daemon did to production is not one to trust. The
daemon writes a handful of small transactions per check interval, so an fsync per
commit costs little.

Threads: one connection, guarded by one lock, because the daemon calls the store from
its asyncio loop and from worker threads; SQLite allows one writer at a time anyway.
Each call blocks while it holds the lock (an fsync at most), so async code should call
it through ``asyncio.to_thread``. Every write runs in ``BEGIN IMMEDIATE``, which takes
the write lock up front, so a second process on the same file (the CLI, a second
daemon by mistake) waits out the busy timeout instead of failing half-way through.

Times are UTC unix seconds (floats), passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from rollbackd.core.model import (
    AlertDraft,
    Event,
    JSONValue,
    Rollback,
    RollbackDraft,
    RollbackState,
    ServiceState,
    Step,
    StoredAlert,
    StoredCheckState,
    Trigger,
    VersionChange,
    VersionRecord,
    VersionSource,
)
from rollbackd.store.errors import ConflictError, SchemaTooNewError, StoreError

BUSY_TIMEOUT = 5.0
"""Seconds a write waits for another connection's write lock before it fails."""

# Each migration is a list of single statements rather than one script: sqlite3's
# executescript() commits any open transaction before it runs, so a script could not be
# applied in the same transaction as the user_version bump. Only ever append here; a
# migration that has shipped is never edited, since databases already carry it.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: versions and their release history, per-service state, the audit log.
    (
        # source is deliberately not CHECK-constrained: SQLite cannot alter a CHECK
        # without rebuilding the table, and new sources (a rollback, say) will come.
        """
        CREATE TABLE versions (
            service     TEXT NOT NULL,
            version     TEXT NOT NULL,
            first_seen  REAL NOT NULL,
            last_seen   REAL NOT NULL,
            source      TEXT NOT NULL,
            baked_at    REAL,
            bad         INTEGER NOT NULL DEFAULT 0 CHECK (bad IN (0, 1)),
            bad_reason  TEXT,
            meta        TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(meta)),
            UNIQUE (service, version)
        )
        """,
        """
        CREATE TABLE version_changes (
            id            INTEGER PRIMARY KEY AUTOINCREMENT,
            service       TEXT NOT NULL,
            from_version  TEXT,
            to_version    TEXT NOT NULL,
            at            REAL NOT NULL,
            source        TEXT NOT NULL,
            FOREIGN KEY (service, from_version) REFERENCES versions (service, version),
            FOREIGN KEY (service, to_version) REFERENCES versions (service, version)
        )
        """,
        "CREATE INDEX version_changes_by_service ON version_changes (service, id)",
        "CREATE INDEX version_changes_by_target ON version_changes (service, to_version, at)",
        """
        CREATE TABLE service_state (
            service          TEXT PRIMARY KEY,
            current_version  TEXT,
            current_since    REAL,
            healthy_since    REAL,
            paused           INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
            frozen           INTEGER NOT NULL DEFAULT 0 CHECK (frozen IN (0, 1)),
            frozen_reason    TEXT,
            FOREIGN KEY (service, current_version) REFERENCES versions (service, version)
        )
        """,
        # rollback_id gets no foreign key yet: the rollbacks table comes in a later
        # migration, and the audit log must keep rows whose rollback is long gone.
        """
        CREATE TABLE events (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            at           REAL NOT NULL,
            type         TEXT NOT NULL,
            service      TEXT,
            rollback_id  INTEGER,
            data         TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(data))
        )
        """,
        "CREATE INDEX events_by_service ON events (service, at)",
        "CREATE INDEX events_by_time ON events (at)",
    ),
    # 2: rollbacks, the executor steps each ran, and the triggers recorded against them.
    (
        # from_version is '' when the version being rolled back is unknown, so the
        # idempotency key (service, from_version, release_id) is never NULL (NULLs never
        # collide). release_id is the version_changes row that made from_version current
        # (0 when unknown): the same version deployed again later is a new release.
        """
        CREATE TABLE rollbacks (
            id            INTEGER PRIMARY KEY AUTOINCREMENT,
            service       TEXT NOT NULL,
            from_version  TEXT NOT NULL,
            release_id    INTEGER NOT NULL DEFAULT 0,
            to_version    TEXT,
            state         TEXT NOT NULL,
            source        TEXT NOT NULL,
            automatic     INTEGER NOT NULL CHECK (automatic IN (0, 1)),
            reason        TEXT NOT NULL,
            mode          TEXT NOT NULL,
            canary        INTEGER NOT NULL DEFAULT 0 CHECK (canary IN (0, 1)),
            trigger       TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(trigger)),
            guards        TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(guards)),
            created_at    REAL NOT NULL,
            updated_at    REAL NOT NULL,
            started_at    REAL,
            finished_at   REAL,
            expires_at    REAL,
            decided_by    TEXT,
            outcome       TEXT NOT NULL DEFAULT ''
        )
        """,
        # At most one live or successful rollback per release: the database itself
        # refuses a second, whatever a bug upstream might try.
        """
        CREATE UNIQUE INDEX rollbacks_one_per_release
        ON rollbacks (service, from_version, release_id)
        WHERE state IN ('pending', 'running', 'verifying', 'succeeded')
        """,
        "CREATE INDEX rollbacks_by_service ON rollbacks (service, created_at)",
        "CREATE INDEX rollbacks_by_state ON rollbacks (state)",
        """
        CREATE TABLE rollback_steps (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            rollback_id  INTEGER NOT NULL REFERENCES rollbacks (id),
            kind         TEXT NOT NULL,
            executor     TEXT NOT NULL,
            started_at   REAL NOT NULL,
            finished_at  REAL,
            ok           INTEGER CHECK (ok IN (0, 1)),
            summary      TEXT NOT NULL DEFAULT '',
            stdout_tail  TEXT NOT NULL DEFAULT '',
            stderr_tail  TEXT NOT NULL DEFAULT '',
            command      TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(command))
        )
        """,
        "CREATE INDEX rollback_steps_by_rollback ON rollback_steps (rollback_id, id)",
        """
        CREATE TABLE rollback_triggers (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            rollback_id  INTEGER NOT NULL REFERENCES rollbacks (id),
            at           REAL NOT NULL,
            source       TEXT NOT NULL,
            detail       TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(detail))
        )
        """,
        "CREATE INDEX rollback_triggers_by_rollback ON rollback_triggers (rollback_id, id)",
        """
        CREATE TABLE pauses (
            scope  TEXT PRIMARY KEY,
            at     REAL NOT NULL,
            who    TEXT NOT NULL DEFAULT ''
        )
        """,
    ),
    # 3: every alert Alertmanager delivered, matched to a service or not.
    (
        # (fingerprint, starts_at, status) is what Alertmanager re-sends unchanged every
        # group_interval while an alert fires: the key that makes the receiver idempotent.
        # Labels and annotations are outside input, kept as data only. handled_at is NULL
        # while a matched firing alert has not yet reached the pipeline, so a delivery
        # that failed half-way is completed by the next one rather than lost.
        """
        CREATE TABLE alerts (
            id                INTEGER PRIMARY KEY AUTOINCREMENT,
            fingerprint       TEXT NOT NULL,
            status            TEXT NOT NULL,
            starts_at         REAL NOT NULL,
            ends_at           REAL,
            alertname         TEXT NOT NULL DEFAULT '',
            labels            TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(labels)),
            annotations       TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(annotations)),
            generator_url     TEXT NOT NULL DEFAULT '',
            receiver          TEXT NOT NULL DEFAULT '',
            group_key         TEXT NOT NULL DEFAULT '',
            received_at       REAL NOT NULL,
            last_received_at  REAL NOT NULL,
            deliveries        INTEGER NOT NULL DEFAULT 1,
            matched_service   TEXT,
            handled_at        REAL,
            outcome           TEXT NOT NULL DEFAULT '',
            rollback_id       INTEGER,
            UNIQUE (fingerprint, starts_at, status)
        )
        """,
        "CREATE INDEX alerts_by_time ON alerts (received_at)",
        "CREATE INDEX alerts_by_service ON alerts (matched_service, received_at)",
    ),
    # 4: each check's state machine (pending since, firing since, ...), so a restart
    # neither forgets a breach nor dates it after a release it predates.
    (
        # state is checks/state_codec.py's JSON; the store does not read inside it. Only
        # checks with something worth restoring have a row.
        """
        CREATE TABLE check_states (
            service     TEXT NOT NULL,
            check_name  TEXT NOT NULL,
            state       TEXT NOT NULL CHECK (json_valid(state)),
            updated_at  REAL NOT NULL,
            PRIMARY KEY (service, check_name)
        )
        """,
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
"""The schema version this code writes; ``PRAGMA user_version`` of an up-to-date file."""


class Store:
    """The SQLite state store. ``path`` is the database file itself; its directory must
    exist (it is the daemon's state_dir, whose ownership is not ours to decide)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = _open(path)
        self._write_failure: str | None = None
        """Why the last write failed (disk full, I/O error), until a write succeeds."""

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Close the connection; later calls raise StoreError. Safe to call twice."""
        with self._lock:
            if self._conn is None:
                return
            conn, self._conn = self._conn, None
            try:
                # Cheap, and keeps the query planner's statistics current for next start.
                conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            finally:
                conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def writable(self, timeout: float = 1.0) -> bool:
        """A cheap readiness probe: can a write transaction start now, and, if the last
        write failed, does a real write succeed again? False when the store is closed,
        read-only, full or failing, busy in this process past ``timeout``, or
        write-locked by another process past the busy timeout."""
        if not self._lock.acquire(timeout=timeout):
            return False
        try:
            conn = self._conn
            if conn is None:
                return False
            try:
                # BEGIN IMMEDIATE takes the write lock without writing, so it proves the
                # file is writable and not held by another process, at no fsync.
                conn.execute("BEGIN IMMEDIATE")
                if self._write_failure is None:
                    conn.execute("ROLLBACK")
                    return True
                # The lock does not prove there is room: after a failed write only a
                # committed write does. Rewriting the header's user_version unchanged is
                # the smallest one there is.
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("COMMIT")
                self._write_failure = None
                return True
            except sqlite3.Error:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                return False
        finally:
            self._lock.release()

    @property
    def write_failure(self) -> str | None:
        """Why the last write failed, or None once a write (or ``writable``) succeeds."""
        return self._write_failure

    # Versions and release history

    def record_version_change(
        self,
        service: str,
        from_version: str | None,
        to_version: str,
        at: float,
        source: VersionSource,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """Make ``to_version`` the service's current version since ``at``: upsert its
        record (``meta`` replaces the stored one when given), append to the release
        history, and move the service state. The bake clock, if running, restarts at
        ``at``, since the new version has not been healthy any longer than that.

        Raises ConflictError when ``from_version`` is no longer the current version."""
        if not to_version:
            raise ValueError("to_version must not be empty")
        source = VersionSource(source)
        meta_json = None if meta is None else _dump_json(meta)
        with self._write() as conn:
            row = conn.execute(
                "SELECT current_version FROM service_state WHERE service = ?", (service,)
            ).fetchone()
            current = None if row is None else row[0]
            if current != from_version:
                raise ConflictError(
                    f"service {service!r}: version change from {from_version!r} to "
                    f"{to_version!r}, but the current version is now {current!r}"
                )
            conn.execute(
                """INSERT INTO versions (
                        service, version, first_seen, last_seen, source, baked_at, bad,
                        bad_reason, meta)
                    VALUES (?, ?, ?, ?, ?, NULL, 0, NULL, coalesce(?, '{}'))
                    ON CONFLICT (service, version) DO UPDATE SET
                        last_seen = max(last_seen, excluded.last_seen),
                        meta = coalesce(?, meta)""",
                (service, to_version, at, at, source.value, meta_json, meta_json),
            )
            conn.execute(
                """INSERT INTO version_changes (service, from_version, to_version, at, source)
                   VALUES (?, ?, ?, ?, ?)""",
                (service, from_version, to_version, at, source.value),
            )
            conn.execute(
                """INSERT INTO service_state (service, current_version, current_since)
                   VALUES (?, ?, ?)
                   ON CONFLICT (service) DO UPDATE SET
                       current_version = excluded.current_version,
                       current_since = excluded.current_since,
                       healthy_since = CASE WHEN healthy_since IS NULL THEN NULL
                                            ELSE max(healthy_since, excluded.current_since)
                                       END""",
                (service, to_version, at),
            )

    def touch_version(self, service: str, version: str, at: float) -> None:
        """The version was seen running at ``at``."""
        with self._write() as conn:
            conn.execute(
                """UPDATE versions SET last_seen = max(last_seen, ?)
                   WHERE service = ? AND version = ?""",
                (at, service, version),
            )

    def touch_versions(self, seen: Sequence[tuple[str, str, float]]) -> None:
        """``touch_version`` for many (service, version, at) at once: one transaction, one
        fsync, however many services."""
        if not seen:
            return
        with self._write() as conn:
            conn.executemany(
                """UPDATE versions SET last_seen = max(last_seen, ?)
                   WHERE service = ? AND version = ?""",
                [(at, service, version) for service, version, at in seen],
            )

    def version(self, service: str, version: str) -> VersionRecord | None:
        with self._read() as conn:
            row = conn.execute(
                """SELECT service, version, first_seen, last_seen, source, baked_at, bad,
                          bad_reason, meta
                   FROM versions WHERE service = ? AND version = ?""",
                (service, version),
            ).fetchone()
        return None if row is None else _version_record(row)

    def versions(self, service: str) -> list[VersionRecord]:
        """Every version the service ever ran, the first seen first."""
        with self._read() as conn:
            rows = conn.execute(
                """SELECT service, version, first_seen, last_seen, source, baked_at, bad,
                          bad_reason, meta
                   FROM versions WHERE service = ? ORDER BY first_seen, version""",
                (service,),
            ).fetchall()
        return [_version_record(row) for row in rows]

    def went_live_at(self, service: str) -> dict[str, float]:
        """Each known version of the service, with when it last went live: its latest
        change to it, else its first sighting. A redeployed version goes live several
        times, and "appeared most recently" must mean the latest of those."""
        with self._read() as conn:
            rows = conn.execute(
                """SELECT version, max(first_seen, coalesce(
                          (SELECT max(c.at) FROM version_changes AS c
                           WHERE c.service = versions.service AND c.to_version = versions.version),
                          first_seen))
                   FROM versions WHERE service = ?""",
                (service,),
            ).fetchall()
        return {str(version): float(at) for version, at in rows}

    def mark_baked(self, service: str, version: str, at: float) -> bool:
        """Record that the version baked at ``at``. Only the first call counts, and a
        version marked bad never bakes: True only when this call marked it."""
        with self._write() as conn:
            cursor = conn.execute(
                """UPDATE versions SET baked_at = ?
                   WHERE service = ? AND version = ? AND baked_at IS NULL AND bad = 0""",
                (at, service, version),
            )
            return cursor.rowcount > 0

    def mark_bad(self, service: str, version: str, reason: str) -> bool:
        """Mark the version bad, so it never bakes nor serves as last known good.
        False when the version is unknown."""
        with self._write() as conn:
            cursor = conn.execute(
                """UPDATE versions SET bad = 1, bad_reason = ?
                   WHERE service = ? AND version = ?""",
                (reason, service, version),
            )
            return cursor.rowcount > 0

    def last_known_good(self, service: str, exclude: str | None = None) -> VersionRecord | None:
        """The baked, not-bad version, other than ``exclude``, that went live most recently.

        Ordered by going live rather than by baking, so that a baked version deployed
        again (a rollback to it, a manual downgrade) counts as the most recent good one."""
        with self._read() as conn:
            row = conn.execute(
                """SELECT service, version, first_seen, last_seen, source, baked_at, bad,
                          bad_reason, meta
                   FROM versions
                   WHERE service = ? AND baked_at IS NOT NULL AND bad = 0
                     AND (? IS NULL OR version <> ?)
                   ORDER BY max(first_seen, coalesce(
                              (SELECT max(c.at) FROM version_changes AS c
                               WHERE c.service = versions.service
                                 AND c.to_version = versions.version),
                              first_seen)) DESC,
                            baked_at DESC, version DESC
                   LIMIT 1""",
                (service, exclude, exclude),
            ).fetchone()
        return None if row is None else _version_record(row)

    def version_changes(self, service: str, limit: int = 100) -> list[VersionChange]:
        """The service's release history, the latest change first."""
        _check_limit(limit)
        with self._read() as conn:
            rows = conn.execute(
                """SELECT id, service, from_version, to_version, at, source
                   FROM version_changes WHERE service = ? ORDER BY id DESC LIMIT ?""",
                (service, limit),
            ).fetchall()
        return [
            VersionChange(
                id=int(row[0]),
                service=row[1],
                from_version=row[2],
                to_version=row[3],
                at=float(row[4]),
                source=VersionSource(row[5]),
            )
            for row in rows
        ]

    # Per-service state

    def service_state(self, service: str) -> ServiceState | None:
        with self._read() as conn:
            row = conn.execute(
                """SELECT service, current_version, current_since, healthy_since, paused,
                          frozen, frozen_reason
                   FROM service_state WHERE service = ?""",
                (service,),
            ).fetchone()
        return None if row is None else _service_state(row)

    def service_states(self) -> list[ServiceState]:
        with self._read() as conn:
            rows = conn.execute(
                """SELECT service, current_version, current_since, healthy_since, paused,
                          frozen, frozen_reason
                   FROM service_state ORDER BY service"""
            ).fetchall()
        return [_service_state(row) for row in rows]

    def set_healthy_since(self, service: str, at: float | None) -> None:
        """Start (``at``) or stop (None) the bake clock; no-op for an unknown service."""
        with self._write() as conn:
            conn.execute(
                "UPDATE service_state SET healthy_since = ? WHERE service = ?", (at, service)
            )

    def set_paused(self, service: str, paused: bool) -> None:
        with self._write() as conn:
            conn.execute(
                """INSERT INTO service_state (service, paused) VALUES (?, ?)
                   ON CONFLICT (service) DO UPDATE SET paused = excluded.paused""",
                (service, int(paused)),
            )

    def set_frozen(self, service: str, frozen: bool, reason: str | None = None) -> None:
        """Freeze (with why) or thaw; thawing forgets the reason."""
        reason = reason if frozen else None
        with self._write() as conn:
            conn.execute(
                """INSERT INTO service_state (service, frozen, frozen_reason) VALUES (?, ?, ?)
                   ON CONFLICT (service) DO UPDATE SET
                       frozen = excluded.frozen, frozen_reason = excluded.frozen_reason""",
                (service, int(frozen), reason),
            )

    # Per-check state

    def check_states(self) -> dict[tuple[str, str], StoredCheckState]:
        """Every saved check state, keyed by (service, check)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT service, check_name, state, updated_at FROM check_states"
            ).fetchall()
        return {
            (row[0], row[1]): StoredCheckState(row[0], row[1], row[2], float(row[3]))
            for row in rows
        }

    def save_check_state(self, service: str, check: str, state: str, at: float) -> None:
        """Insert or replace the check's state (JSON text)."""
        with self._write() as conn:
            conn.execute(
                """INSERT INTO check_states (service, check_name, state, updated_at)
                   VALUES (?, ?, ?, ?)
                   ON CONFLICT (service, check_name) DO UPDATE SET
                       state = excluded.state, updated_at = excluded.updated_at""",
                (service, check, state, at),
            )

    def delete_check_state(self, service: str, check: str) -> None:
        """Forget the check's state; no-op when none is saved."""
        with self._write() as conn:
            conn.execute(
                "DELETE FROM check_states WHERE service = ? AND check_name = ?", (service, check)
            )

    # Rollbacks

    def create_rollback(self, draft: RollbackDraft) -> Rollback:
        """Record a new rollback. Raises ConflictError when the release already has a live
        or successful one: the idempotency key is (service, from_version)."""
        with self._write() as conn:
            try:
                cursor = conn.execute(
                    """INSERT INTO rollbacks (
                            service, from_version, release_id, to_version, state, source,
                            automatic, reason, mode, trigger, guards, created_at, updated_at,
                            expires_at, outcome, finished_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        draft.service,
                        draft.from_version or "",
                        draft.release_id,
                        draft.to_version,
                        RollbackState(draft.state).value,
                        draft.source,
                        int(draft.automatic),
                        draft.reason,
                        draft.mode,
                        _dump_json(draft.trigger),
                        json.dumps(_finite(list(draft.guards)), allow_nan=False),
                        draft.at,
                        draft.at,
                        draft.expires_at,
                        draft.outcome,
                        None if RollbackState(draft.state).live else draft.at,
                    ),
                )
            except sqlite3.IntegrityError as error:
                raise ConflictError(
                    f"service {draft.service!r}: release {draft.from_version!r} already has "
                    "a pending, running or successful rollback"
                ) from error
            rollback_id = cursor.lastrowid
            row = conn.execute(f"{_ROLLBACK_SELECT} WHERE id = ?", (rollback_id,)).fetchone()
        return _rollback(row)

    def rollback(self, rollback_id: int) -> Rollback | None:
        with self._read() as conn:
            row = conn.execute(f"{_ROLLBACK_SELECT} WHERE id = ?", (rollback_id,)).fetchone()
        return None if row is None else _rollback(row)

    def rollbacks(
        self,
        service: str | None = None,
        states: Sequence[RollbackState] | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Rollback]:
        """The latest first."""
        _check_limit(limit)
        where: list[str] = []
        params: list[object] = []
        if service is not None:
            where.append("service = ?")
            params.append(service)
        if states is not None:
            if not states:
                return []
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(RollbackState(s).value for s in states)
        if since is not None:
            where.append("created_at >= ?")
            params.append(since)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._read() as conn:
            rows = conn.execute(
                f"{_ROLLBACK_SELECT} {clause} ORDER BY id DESC LIMIT ?", (*params, limit)
            ).fetchall()
        return [_rollback(row) for row in rows]

    def latest_rollback(
        self, service: str, from_version: str | None, release_id: int = 0
    ) -> Rollback | None:
        """The latest rollback of this release, whatever its state."""
        with self._read() as conn:
            row = conn.execute(
                f"{_ROLLBACK_SELECT} WHERE service = ? AND from_version = ? AND release_id = ? "
                "ORDER BY id DESC LIMIT 1",
                (service, from_version or "", release_id),
            ).fetchone()
        return None if row is None else _rollback(row)

    def set_rollback_state(
        self,
        rollback_id: int,
        state: RollbackState,
        at: float,
        *,
        expected: Sequence[RollbackState] | None = None,
        outcome: str | None = None,
        decided_by: str | None = None,
        to_version: str | None = None,
        canary: bool | None = None,
    ) -> Rollback:
        """Move a rollback to ``state``. With ``expected``, only from one of those states,
        else ConflictError: approve and reject (or expiry) racing each other, say."""
        state = RollbackState(state)
        with self._write() as conn:
            row = conn.execute(
                "SELECT state FROM rollbacks WHERE id = ?", (rollback_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"no rollback {rollback_id}")
            current = RollbackState(row[0])
            if expected is not None and current not in expected:
                raise ConflictError(
                    f"rollback {rollback_id} is {current.value}, not "
                    f"{' or '.join(RollbackState(e).value for e in expected)}"
                )
            conn.execute(
                """UPDATE rollbacks SET
                       state = ?, updated_at = ?,
                       started_at = CASE WHEN ? = 'running' AND started_at IS NULL
                                         THEN ? ELSE started_at END,
                       finished_at = CASE WHEN ? THEN ? ELSE finished_at END,
                       outcome = coalesce(?, outcome),
                       decided_by = coalesce(?, decided_by),
                       to_version = coalesce(?, to_version),
                       canary = coalesce(?, canary)
                   WHERE id = ?""",
                (
                    state.value,
                    at,
                    state.value,
                    at,
                    int(not state.live),
                    at,
                    outcome,
                    decided_by,
                    to_version,
                    None if canary is None else int(canary),
                    rollback_id,
                ),
            )
            updated = conn.execute(f"{_ROLLBACK_SELECT} WHERE id = ?", (rollback_id,)).fetchone()
        return _rollback(updated)

    def add_trigger(
        self, rollback_id: int, at: float, source: str, detail: Mapping[str, JSONValue]
    ) -> int:
        with self._write() as conn:
            cursor = conn.execute(
                """INSERT INTO rollback_triggers (rollback_id, at, source, detail)
                   VALUES (?, ?, ?, ?)""",
                (rollback_id, at, source, _dump_json(detail)),
            )
            return int(cursor.lastrowid or 0)

    def triggers(self, rollback_id: int, limit: int = -1) -> list[Trigger]:
        """The triggers that joined a rollback, oldest first; at most ``limit`` (-1: all)."""
        with self._read() as conn:
            rows = conn.execute(
                """SELECT id, rollback_id, at, source, detail FROM rollback_triggers
                   WHERE rollback_id = ? ORDER BY id LIMIT ?""",
                (rollback_id, limit),
            ).fetchall()
        return [Trigger(int(r[0]), int(r[1]), float(r[2]), r[3], json.loads(r[4])) for r in rows]

    def count_triggers(self, rollback_id: int) -> int:
        with self._read() as conn:
            row = conn.execute(
                "SELECT count(*) FROM rollback_triggers WHERE rollback_id = ?", (rollback_id,)
            ).fetchone()
        return int(row[0])

    def start_step(self, rollback_id: int, kind: str, executor: str, at: float) -> int:
        """Record that a step starts, before it runs: after a crash the record shows what
        was running."""
        with self._write() as conn:
            cursor = conn.execute(
                """INSERT INTO rollback_steps (rollback_id, kind, executor, started_at)
                   VALUES (?, ?, ?, ?)""",
                (rollback_id, kind, executor, at),
            )
            return int(cursor.lastrowid or 0)

    def finish_step(
        self,
        step_id: int,
        at: float,
        ok: bool,
        summary: str,
        stdout_tail: str = "",
        stderr_tail: str = "",
        command: Sequence[str] = (),
    ) -> None:
        with self._write() as conn:
            conn.execute(
                """UPDATE rollback_steps SET finished_at = ?, ok = ?, summary = ?,
                       stdout_tail = ?, stderr_tail = ?, command = ?
                   WHERE id = ?""",
                (
                    at,
                    int(ok),
                    summary,
                    stdout_tail,
                    stderr_tail,
                    json.dumps(list(command)),
                    step_id,
                ),
            )

    def steps(self, rollback_id: int) -> list[Step]:
        with self._read() as conn:
            rows = conn.execute(
                """SELECT id, rollback_id, kind, executor, started_at, finished_at, ok,
                          summary, stdout_tail, stderr_tail, command
                   FROM rollback_steps WHERE rollback_id = ? ORDER BY id""",
                (rollback_id,),
            ).fetchall()
        return [
            Step(
                id=int(r[0]),
                rollback_id=int(r[1]),
                kind=r[2],
                executor=r[3],
                started_at=float(r[4]),
                finished_at=None if r[5] is None else float(r[5]),
                ok=None if r[6] is None else bool(r[6]),
                summary=r[7],
                stdout_tail=r[8],
                stderr_tail=r[9],
                command=json.loads(r[10]),
            )
            for r in rows
        ]

    # Pauses: per service, or "*" for all

    def set_pause(self, scope: str, paused: bool, at: float, who: str = "") -> None:
        with self._write() as conn:
            if paused:
                conn.execute(
                    """INSERT INTO pauses (scope, at, who) VALUES (?, ?, ?)
                       ON CONFLICT (scope) DO UPDATE SET at = excluded.at, who = excluded.who""",
                    (scope, at, who),
                )
            else:
                conn.execute("DELETE FROM pauses WHERE scope = ?", (scope,))

    def paused(self) -> set[str]:
        """The paused scopes: service names, and ``*`` when everything is paused."""
        with self._read() as conn:
            return {row[0] for row in conn.execute("SELECT scope FROM pauses")}

    # Alerts from Alertmanager

    def record_alerts(
        self, drafts: Sequence[AlertDraft], received_at: float
    ) -> list[tuple[StoredAlert, bool]]:
        """Record one delivery's alerts in one transaction, all or none: each with whether
        it is new. An alert already recorded under the same (fingerprint, starts_at,
        status) is a re-send: only its delivery count and last delivery time change."""
        results: list[tuple[StoredAlert, bool]] = []
        with self._write() as conn:
            for draft in drafts:
                conn.execute(
                    """INSERT INTO alerts (
                            fingerprint, status, starts_at, ends_at, alertname, labels,
                            annotations, generator_url, receiver, group_key, received_at,
                            last_received_at, matched_service, handled_at, outcome)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT (fingerprint, starts_at, status) DO UPDATE SET
                           deliveries = deliveries + 1,
                           last_received_at = max(last_received_at, excluded.received_at)""",
                    (
                        draft.fingerprint,
                        draft.status,
                        draft.starts_at,
                        draft.ends_at,
                        draft.alertname,
                        _dump_json(draft.labels),
                        _dump_json(draft.annotations),
                        draft.generator_url,
                        draft.receiver,
                        draft.group_key,
                        received_at,
                        received_at,
                        draft.matched_service,
                        None if draft.needs_handling else received_at,
                        draft.outcome,
                    ),
                )
                row = conn.execute(
                    f"{_ALERT_SELECT} WHERE fingerprint = ? AND starts_at = ? AND status = ?",
                    (draft.fingerprint, draft.starts_at, draft.status),
                ).fetchone()
                alert = _alert(row)
                # Every conflict adds a delivery, so one delivery means this call inserted it.
                results.append((alert, alert.deliveries == 1))
        return results

    def set_alert_handled(
        self, alert_id: int, at: float, outcome: str, rollback_id: int | None = None
    ) -> None:
        """Record what the pipeline did with a matched firing alert."""
        with self._write() as conn:
            conn.execute(
                """UPDATE alerts SET handled_at = ?, outcome = ?, rollback_id = ?
                   WHERE id = ?""",
                (at, outcome, rollback_id, alert_id),
            )

    def alerts(
        self,
        service: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[StoredAlert]:
        """The latest received first; ``service`` filters on the matched service."""
        _check_limit(limit)
        where: list[str] = []
        params: list[object] = []
        if service is not None:
            where.append("matched_service = ?")
            params.append(service)
        if since is not None:
            where.append("received_at >= ?")
            params.append(since)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._read() as conn:
            rows = conn.execute(
                f"{_ALERT_SELECT} {clause} ORDER BY id DESC LIMIT ?", (*params, limit)
            ).fetchall()
        return [_alert(row) for row in rows]

    def firing_alerts(self, service: str, limit: int = 1000) -> list[StoredAlert]:
        """The service's matched alerts still firing: a firing record with no resolved
        record of the same alert (fingerprint and startsAt), the latest first."""
        _check_limit(limit)
        with self._read() as conn:
            # Only the fixed column list is formatted in; values travel as parameters.
            rows = conn.execute(
                f"""{_ALERT_SELECT} WHERE matched_service = ? AND status = 'firing'
                    AND NOT EXISTS (
                        SELECT 1 FROM alerts AS r
                        WHERE r.fingerprint = alerts.fingerprint
                          AND r.starts_at = alerts.starts_at AND r.status = 'resolved')
                    ORDER BY id DESC LIMIT ?""",  # noqa: S608
                (service, limit),
            ).fetchall()
        return [_alert(row) for row in rows]

    # The audit log

    def add_event(self, event: Event) -> int:
        """Append the event (its ``id`` is ignored) and return the id it was given."""
        if not event.type:
            raise ValueError("an event needs a type")
        data = _dump_json(event.data)
        with self._write() as conn:
            cursor = conn.execute(
                """INSERT INTO events (at, type, service, rollback_id, data)
                   VALUES (?, ?, ?, ?, ?)""",
                (event.at, event.type, event.service, event.rollback_id, data),
            )
            if cursor.lastrowid is None:
                raise StoreError("SQLite gave the new event no id")
            return cursor.lastrowid

    def events(
        self,
        service: str | None = None,
        since: float | None = None,
        types: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """The latest events first, at most ``limit``; filters combine. ``since`` is
        inclusive; ``types`` are exact names."""
        _check_limit(limit)
        where: list[str] = []
        params: list[object] = []
        if service is not None:
            where.append("service = ?")
            params.append(service)
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        if types is not None:
            # A bare string is a Sequence[str] too; read letter by letter it matches nothing.
            types = [types] if isinstance(types, str) else list(types)
            if not types:
                return []
            where.append(f"type IN ({', '.join('?' * len(types))})")
            params.extend(types)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        # Only fixed fragments and "?" placeholders are joined into the text; values
        # travel as parameters.
        sql = (
            "SELECT id, at, type, service, rollback_id, data FROM events "  # noqa: S608
            f"{clause} ORDER BY id DESC LIMIT ?"
        )
        with self._read() as conn:
            rows = conn.execute(sql, (*params, limit)).fetchall()
        return [
            Event(
                id=int(row[0]),
                at=float(row[1]),
                type=row[2],
                service=row[3],
                rollback_id=row[4],
                data=json.loads(row[5]),
            )
            for row in rows
        ]

    # Plumbing

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"state database {self._path} is closed")
        return self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as error:
                raise StoreError(f"state database {self._path}: {error}") from error

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back when the body raises."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            except sqlite3.IntegrityError as error:
                # A constraint said no: the database works, the write was refused.
                raise StoreError(f"state database {self._path}: {error}") from error
            except sqlite3.Error as error:
                self._write_failure = str(error)
                raise StoreError(f"state database {self._path}: {error}") from error
            self._write_failure = None


def _open(path: Path) -> sqlite3.Connection:
    try:
        # isolation_level=None: the module must not open transactions behind our back;
        # every write says BEGIN IMMEDIATE itself. timeout sets SQLite's busy timeout.
        conn = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as error:
        raise StoreError(f"cannot open state database {path}: {error}") from error
    try:
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if mode.lower() != "wal":
            # WAL needs shared memory beside the file; network filesystems may refuse it.
            raise StoreError(
                f"state database {path}: SQLite refused WAL mode (journal mode is {mode}); "
                "put state_dir on a local filesystem"
            )
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, path, MIGRATIONS)
    except sqlite3.Error as error:
        conn.close()
        raise StoreError(f"state database {path}: {error}") from error
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Sequence[str]]) -> None:
    """Bring the schema to ``len(migrations)`` in one transaction: all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read inside the write transaction, so two processes starting together cannot
        # both apply the same migration.
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > len(migrations):
            raise SchemaTooNewError(
                f"state database {path} has schema version {found}, but this rollbackd "
                f"knows versions up to {len(migrations)} only: a newer rollbackd wrote it. "
                "Run that newer rollbackd, or point state_dir at another directory; "
                "the file was left untouched"
            )
        for number in range(found + 1, len(migrations) + 1):
            for statement in migrations[number - 1]:
                try:
                    conn.execute(statement)
                except sqlite3.Error as error:
                    raise StoreError(
                        f"state database {path}: migration to schema version {number} "
                        f"failed, nothing was changed: {error}"
                    ) from error
        if found < len(migrations):
            # PRAGMA takes no parameters; the value is our own integer.
            conn.execute(f"PRAGMA user_version = {len(migrations):d}")
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be positive, got: {limit}")


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float spelt as Prometheus spells it."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _dump_json(value: Mapping[str, JSONValue]) -> str:
    return json.dumps(_finite(value), sort_keys=True, allow_nan=False, separators=(",", ":"))


def _version_record(row: Sequence[Any]) -> VersionRecord:
    return VersionRecord(
        service=row[0],
        version=row[1],
        first_seen=float(row[2]),
        last_seen=float(row[3]),
        source=VersionSource(row[4]),
        baked_at=None if row[5] is None else float(row[5]),
        bad=bool(row[6]),
        bad_reason=row[7],
        meta={str(key): str(value) for key, value in json.loads(row[8]).items()},
    )


_ROLLBACK_SELECT = """SELECT id, service, from_version, release_id, to_version, state, source,
       automatic, reason, mode, canary, trigger, guards, created_at, updated_at, started_at,
       finished_at, expires_at, decided_by, outcome FROM rollbacks"""


def _rollback(row: Sequence[Any]) -> Rollback:
    return Rollback(
        id=int(row[0]),
        service=row[1],
        from_version=row[2] or None,
        release_id=int(row[3]),
        to_version=row[4],
        state=RollbackState(row[5]),
        source=row[6],
        automatic=bool(row[7]),
        reason=row[8],
        mode=row[9],
        canary=bool(row[10]),
        trigger=json.loads(row[11]),
        guards=json.loads(row[12]),
        created_at=float(row[13]),
        updated_at=float(row[14]),
        started_at=None if row[15] is None else float(row[15]),
        finished_at=None if row[16] is None else float(row[16]),
        expires_at=None if row[17] is None else float(row[17]),
        decided_by=row[18],
        outcome=row[19],
    )


def _service_state(row: Sequence[Any]) -> ServiceState:
    return ServiceState(
        service=row[0],
        current_version=row[1],
        current_since=None if row[2] is None else float(row[2]),
        healthy_since=None if row[3] is None else float(row[3]),
        paused=bool(row[4]),
        frozen=bool(row[5]),
        frozen_reason=row[6],
    )


_ALERT_SELECT = """SELECT id, fingerprint, status, starts_at, ends_at, alertname, labels,
       annotations, generator_url, receiver, group_key, received_at, last_received_at,
       deliveries, matched_service, handled_at, outcome, rollback_id FROM alerts"""


def _alert(row: Sequence[Any]) -> StoredAlert:
    return StoredAlert(
        id=int(row[0]),
        fingerprint=row[1],
        status=row[2],
        starts_at=float(row[3]),
        ends_at=None if row[4] is None else float(row[4]),
        alertname=row[5],
        labels=json.loads(row[6]),
        annotations=json.loads(row[7]),
        generator_url=row[8],
        receiver=row[9],
        group_key=row[10],
        received_at=float(row[11]),
        last_received_at=float(row[12]),
        deliveries=int(row[13]),
        matched_service=row[14],
        handled_at=None if row[15] is None else float(row[15]),
        outcome=row[16],
        rollback_id=None if row[17] is None else int(row[17]),
    )
