"""The PostgreSQL schema: every migration since the first, and how a database is brought
up to date.

The migrations are numbered as SQLite's (``store/sqlite/migrations.py``), one for one, so
that a schema version means the same tables on either backend; a new migration is added
to both. The table ``rollbackd_schema`` holds the number a database has had (one row).

Several daemons may start together on one database: each migrates inside one transaction
that first takes a transaction-scoped advisory lock, so one of them migrates and the others
wait, then find the schema up to date. DDL is transactional in PostgreSQL: a migration
that fails leaves nothing behind.

Dialect notes: times are ``double precision`` (a float of unix seconds round-trips
exactly); flags are ``boolean``; JSON is ``json``, which keeps the text as given (key order,
number forms), where ``jsonb`` would rewrite it; names that are compared or ordered are
``COLLATE "C"``, so they sort byte by byte as on SQLite whatever the database's locale.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from rollbackd.store.errors import SchemaTooNewError, StoreError
from rollbackd.store.postgres.connections import Connection

MIGRATION_LOCK = 0x726F6C6C6261636B
"""The advisory lock key migrations take: "rollback" in ASCII, as a bigint."""

# Only ever append here; a migration that has shipped is never edited, since databases
# already carry it.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: versions and their release history, per-service state, the audit log.
    (
        """
        CREATE TABLE versions (
            service     text COLLATE "C" NOT NULL,
            version     text COLLATE "C" NOT NULL,
            first_seen  double precision NOT NULL,
            last_seen   double precision NOT NULL,
            source      text NOT NULL,
            baked_at    double precision,
            bad         boolean NOT NULL DEFAULT false,
            bad_reason  text,
            meta        json NOT NULL DEFAULT '{}',
            PRIMARY KEY (service, version)
        )
        """,
        """
        CREATE TABLE version_changes (
            id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            service       text COLLATE "C" NOT NULL,
            from_version  text COLLATE "C",
            to_version    text COLLATE "C" NOT NULL,
            at            double precision NOT NULL,
            source        text NOT NULL,
            FOREIGN KEY (service, from_version) REFERENCES versions (service, version),
            FOREIGN KEY (service, to_version) REFERENCES versions (service, version)
        )
        """,
        "CREATE INDEX version_changes_by_service ON version_changes (service, id)",
        "CREATE INDEX version_changes_by_target ON version_changes (service, to_version, at)",
        """
        CREATE TABLE service_state (
            service          text COLLATE "C" PRIMARY KEY,
            current_version  text COLLATE "C",
            current_since    double precision,
            healthy_since    double precision,
            paused           boolean NOT NULL DEFAULT false,
            frozen           boolean NOT NULL DEFAULT false,
            frozen_reason    text,
            FOREIGN KEY (service, current_version) REFERENCES versions (service, version)
        )
        """,
        # rollback_id gets no foreign key: the audit log keeps rows whose rollback is gone.
        """
        CREATE TABLE events (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at           double precision NOT NULL,
            type         text COLLATE "C" NOT NULL,
            service      text COLLATE "C",
            rollback_id  bigint,
            data         json NOT NULL DEFAULT '{}'
        )
        """,
        "CREATE INDEX events_by_service ON events (service, at)",
        "CREATE INDEX events_by_time ON events (at)",
    ),
    # 2: rollbacks, the executor steps each ran, and the triggers recorded against them.
    (
        # from_version is '' when unknown, so the release key is never NULL (NULLs never
        # collide in a unique index); release_id is the version_changes row that made
        # from_version current (0 when unknown).
        """
        CREATE TABLE rollbacks (
            id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            service       text COLLATE "C" NOT NULL,
            from_version  text COLLATE "C" NOT NULL,
            release_id    bigint NOT NULL DEFAULT 0,
            to_version    text COLLATE "C",
            state         text COLLATE "C" NOT NULL,
            source        text NOT NULL,
            automatic     boolean NOT NULL,
            reason        text NOT NULL,
            mode          text NOT NULL,
            canary        boolean NOT NULL DEFAULT false,
            "trigger"     json NOT NULL DEFAULT '{}',
            guards        json NOT NULL DEFAULT '[]',
            created_at    double precision NOT NULL,
            updated_at    double precision NOT NULL,
            started_at    double precision,
            finished_at   double precision,
            expires_at    double precision,
            decided_by    text,
            outcome       text NOT NULL DEFAULT ''
        )
        """,
        # At most one live or successful rollback per release, whichever daemon tries:
        # create_rollback's ON CONFLICT names this index's columns and predicate.
        """
        CREATE UNIQUE INDEX rollbacks_one_per_release
        ON rollbacks (service, from_version, release_id)
        WHERE state IN ('pending', 'running', 'verifying', 'succeeded')
        """,
        "CREATE INDEX rollbacks_by_service ON rollbacks (service, created_at)",
        "CREATE INDEX rollbacks_by_state ON rollbacks (state)",
        """
        CREATE TABLE rollback_steps (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            rollback_id  bigint NOT NULL REFERENCES rollbacks (id),
            kind         text NOT NULL,
            executor     text NOT NULL,
            started_at   double precision NOT NULL,
            finished_at  double precision,
            ok           boolean,
            summary      text NOT NULL DEFAULT '',
            stdout_tail  text NOT NULL DEFAULT '',
            stderr_tail  text NOT NULL DEFAULT '',
            command      json NOT NULL DEFAULT '[]'
        )
        """,
        "CREATE INDEX rollback_steps_by_rollback ON rollback_steps (rollback_id, id)",
        """
        CREATE TABLE rollback_triggers (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            rollback_id  bigint NOT NULL REFERENCES rollbacks (id),
            at           double precision NOT NULL,
            source       text NOT NULL,
            detail       json NOT NULL DEFAULT '{}'
        )
        """,
        "CREATE INDEX rollback_triggers_by_rollback ON rollback_triggers (rollback_id, id)",
        """
        CREATE TABLE pauses (
            scope  text COLLATE "C" PRIMARY KEY,
            at     double precision NOT NULL,
            who    text NOT NULL DEFAULT ''
        )
        """,
    ),
    # 3: every alert Alertmanager delivered, matched to a service or not.
    (
        # (fingerprint, starts_at, status) is what Alertmanager re-sends unchanged while an
        # alert fires: the key record_alerts upserts on, atomic among daemons.
        """
        CREATE TABLE alerts (
            id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            fingerprint       text COLLATE "C" NOT NULL,
            status            text COLLATE "C" NOT NULL,
            starts_at         double precision NOT NULL,
            ends_at           double precision,
            alertname         text NOT NULL DEFAULT '',
            labels            json NOT NULL DEFAULT '{}',
            annotations       json NOT NULL DEFAULT '{}',
            generator_url     text NOT NULL DEFAULT '',
            receiver          text NOT NULL DEFAULT '',
            group_key         text NOT NULL DEFAULT '',
            received_at       double precision NOT NULL,
            last_received_at  double precision NOT NULL,
            deliveries        bigint NOT NULL DEFAULT 1,
            matched_service   text COLLATE "C",
            handled_at        double precision,
            outcome           text NOT NULL DEFAULT '',
            rollback_id       bigint,
            UNIQUE (fingerprint, starts_at, status)
        )
        """,
        "CREATE INDEX alerts_by_time ON alerts (received_at)",
        "CREATE INDEX alerts_by_service ON alerts (matched_service, received_at)",
    ),
    # 4: each check's state machine, so a restart neither forgets a breach nor dates it
    # after a release it predates. The json type refuses text that is not JSON.
    (
        """
        CREATE TABLE check_states (
            service     text COLLATE "C" NOT NULL,
            check_name  text COLLATE "C" NOT NULL,
            state       json NOT NULL,
            updated_at  double precision NOT NULL,
            PRIMARY KEY (service, check_name)
        )
        """,
    ),
    # 5: per-service leases with fencing epochs, and the live daemons (members). Times are
    # the server's clock_timestamp() as unix seconds. A lease row is never deleted, so
    # that its epoch stays the highest ever given for the service.
    (
        """
        CREATE TABLE leases (
            service      text COLLATE "C" PRIMARY KEY,
            holder       text COLLATE "C" NOT NULL CHECK (holder <> ''),
            epoch        bigint NOT NULL CHECK (epoch >= 1),
            acquired_at  double precision NOT NULL,
            expires_at   double precision NOT NULL
        )
        """,
        """
        CREATE TABLE members (
            member      text COLLATE "C" PRIMARY KEY,
            expires_at  double precision NOT NULL
        )
        """,
    ),
    # 6: requests handed to a service's holder by the daemon that took them (handoffs);
    # which process a member is (instance), so two daemons given one member name are told
    # apart; the firing alerts no daemon has handed to the pipeline yet, found by index.
    (
        """
        CREATE TABLE handoffs (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            service      text COLLATE "C" NOT NULL,
            kind         text COLLATE "C" NOT NULL,
            body         json NOT NULL,
            asked_by     text NOT NULL,
            asked_at     double precision NOT NULL,
            taken_by     text,
            taken_at     double precision,
            answered_at  double precision,
            answer       json
        )
        """,
        "CREATE INDEX handoffs_open ON handoffs (service, id) WHERE taken_by IS NULL",
        "ALTER TABLE members ADD COLUMN instance text NOT NULL DEFAULT ''",
        "CREATE INDEX alerts_unhandled ON alerts (matched_service, id) WHERE handled_at IS NULL",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
"""The schema version this code writes."""

_VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS rollbackd_schema (
        one      boolean PRIMARY KEY DEFAULT true CHECK (one),
        version  integer NOT NULL
    )"""


def migrate(
    conn: Connection, location: str, migrations: Sequence[Sequence[str]] | None = None
) -> None:
    """Bring the schema to ``len(migrations)`` (default: all of :data:`MIGRATIONS`) in one
    transaction: all or nothing. Raises SchemaTooNewError, and changes nothing, when the
    database has more migrations than that. ``conn`` must not be in autocommit."""
    if migrations is None:
        # Looked up at each call, not bound at import, so a test can append a migration.
        migrations = MIGRATIONS
    try:
        # Held until the transaction ends: whoever comes second reads the version after
        # the first has committed its migration.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(_VERSION_TABLE)
        found = _locked_version(conn)
        if found > len(migrations):
            raise SchemaTooNewError(
                f"state database {location} has schema version {found}, but this rollbackd "
                f"knows versions up to {len(migrations)} only: a newer rollbackd wrote it. "
                "Run that newer rollbackd, or point [store] url at another database; "
                "the database was left untouched"
            )
        for number in range(found + 1, len(migrations) + 1):
            _apply(conn, location, number, migrations[number - 1])
        if found < len(migrations):
            conn.execute(
                """INSERT INTO rollbackd_schema (one, version) VALUES (true, %s)
                   ON CONFLICT (one) DO UPDATE SET version = excluded.version""",
                (len(migrations),),
            )
        conn.commit()
    finally:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()


def stored_version(conn: Connection) -> int:
    """The schema version the database is in (0 before any migration)."""
    row = conn.execute("SELECT version FROM rollbackd_schema").fetchone()
    return 0 if row is None else int(row[0])


def touch_version_row(conn: Connection) -> None:
    """The smallest real write: the schema version rewritten unchanged."""
    conn.execute("UPDATE rollbackd_schema SET version = version")


def _locked_version(conn: Connection) -> int:
    row = conn.execute("SELECT version FROM rollbackd_schema FOR UPDATE").fetchone()
    return 0 if row is None else int(row[0])


def _apply(conn: Connection, location: str, number: int, statements: Sequence[str]) -> None:
    for statement in statements:
        try:
            conn.execute(statement)
        except psycopg.Error as error:
            raise StoreError(
                f"state database {location}: migration to schema version {number} "
                f"failed, nothing was changed: {error}"
            ) from error
