"""The SQLite schema: every migration since the first, and how a file is brought up to date.

``PRAGMA user_version`` holds the number of migrations a file has had.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from rollbackd.store.errors import SchemaTooNewError, StoreError

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
        # state is store/check_state_codec.py's JSON; the store does not read inside it. Only
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
    # 5: per-service leases with fencing epochs, and the live daemons (members). Times are
    # the database's clock, as unix seconds. A lease row is never deleted, so that its
    # epoch stays the highest ever given for the service.
    (
        """
        CREATE TABLE leases (
            service      TEXT PRIMARY KEY,
            holder       TEXT NOT NULL CHECK (holder <> ''),
            epoch        INTEGER NOT NULL CHECK (epoch >= 1),
            acquired_at  REAL NOT NULL,
            expires_at   REAL NOT NULL
        )
        """,
        """
        CREATE TABLE members (
            member      TEXT PRIMARY KEY,
            expires_at  REAL NOT NULL
        )
        """,
    ),
    # 6: requests handed to a service's holder by the daemon that took them (handoffs);
    # which process a member is (instance), so two daemons given one member name are told
    # apart; the firing alerts no daemon has handed to the pipeline yet, found by index.
    (
        """
        CREATE TABLE handoffs (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            service      TEXT NOT NULL,
            kind         TEXT NOT NULL,
            body         TEXT NOT NULL CHECK (json_valid(body)),
            asked_by     TEXT NOT NULL,
            asked_at     REAL NOT NULL,
            taken_by     TEXT,
            taken_at     REAL,
            answered_at  REAL,
            answer       TEXT CHECK (answer IS NULL OR json_valid(answer))
        )
        """,
        "CREATE INDEX handoffs_open ON handoffs (service, id) WHERE taken_by IS NULL",
        "ALTER TABLE members ADD COLUMN instance TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX alerts_unhandled ON alerts (matched_service, id) WHERE handled_at IS NULL",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
"""The schema version this code writes; ``PRAGMA user_version`` of an up-to-date file."""


def migrate(
    conn: sqlite3.Connection, path: Path, migrations: Sequence[Sequence[str]] | None = None
) -> None:
    """Bring the schema to ``len(migrations)`` (default: all of :data:`MIGRATIONS`) in one
    transaction: all or nothing. Raises SchemaTooNewError, and changes nothing, when the
    file has more migrations than that."""
    if migrations is None:
        # Looked up at each call, not bound at import, so a test can append a migration.
        migrations = MIGRATIONS
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
