"""PostgreSQL tables ``versions`` and ``version_changes``: the :class:`VersionStore` of a
service's versions and release history."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rollbackd.core.model import VersionChange, VersionRecord, VersionSource
from rollbackd.store import rows
from rollbackd.store.errors import ConflictError
from rollbackd.store.interfaces import VersionStore
from rollbackd.store.postgres.database import Database

# When each version last went live: its latest change to it, else its first sighting.
_WENT_LIVE = """greatest(first_seen, coalesce(
    (SELECT max(c.at) FROM version_changes AS c
     WHERE c.service = versions.service AND c.to_version = versions.version),
    first_seen))"""

_TOUCH = """UPDATE versions SET last_seen = greatest(last_seen, %s)
            WHERE service = %s AND version = %s"""


class PostgresVersions(Database, VersionStore):
    def record_version_change(
        self,
        service: str,
        from_version: str | None,
        to_version: str,
        at: float,
        source: VersionSource,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        if not to_version:
            raise ValueError("to_version must not be empty")
        source = VersionSource(source)
        meta_json = None if meta is None else rows.dump_json(meta)
        with self._write() as conn:
            # The service's row, locked until commit: another daemon changing the same
            # service waits here, then reads the version this one made current. Created
            # first (empty, as set_paused makes it) so that there is a row to lock.
            conn.execute(
                "INSERT INTO service_state (service) VALUES (%s) ON CONFLICT (service) DO NOTHING",
                (service,),
            )
            row = conn.execute(
                "SELECT current_version FROM service_state WHERE service = %s FOR UPDATE",
                (service,),
            ).fetchone()
            current = None if row is None else row[0]
            if current != from_version:
                raise ConflictError(
                    f"service {service!r}: version change from {from_version!r} to "
                    f"{to_version!r}, but the current version is now {current!r}"
                )
            conn.execute(
                """INSERT INTO versions (service, version, first_seen, last_seen, source, meta)
                   VALUES (%(service)s, %(version)s, %(at)s, %(at)s, %(source)s,
                           coalesce(%(meta)s::json, '{}'::json))
                   ON CONFLICT (service, version) DO UPDATE SET
                       last_seen = greatest(versions.last_seen, excluded.last_seen),
                       meta = coalesce(%(meta)s::json, versions.meta)""",
                {
                    "service": service,
                    "version": to_version,
                    "at": at,
                    "source": source.value,
                    "meta": meta_json,
                },
            )
            conn.execute(
                """INSERT INTO version_changes (service, from_version, to_version, at, source)
                   VALUES (%s, %s, %s, %s, %s)""",
                (service, from_version, to_version, at, source.value),
            )
            conn.execute(
                """UPDATE service_state SET
                       current_version = %(version)s,
                       current_since = %(at)s,
                       healthy_since = CASE WHEN healthy_since IS NULL THEN NULL
                                            ELSE greatest(healthy_since, %(at)s) END
                   WHERE service = %(service)s""",
                {"service": service, "version": to_version, "at": at},
            )

    def touch_version(self, service: str, version: str, at: float) -> None:
        with self._write() as conn:
            conn.execute(_TOUCH, (at, service, version))

    def touch_versions(self, seen: Sequence[tuple[str, str, float]]) -> None:
        if not seen:
            return
        # In key order, so that two daemons touching the same rows lock them in the same
        # order and cannot deadlock.
        ordered = sorted(seen, key=lambda item: (item[0], item[1]))
        with self._write() as conn, conn.cursor() as cursor:
            cursor.executemany(_TOUCH, [(at, service, version) for service, version, at in ordered])

    def version(self, service: str, version: str) -> VersionRecord | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {rows.VERSION_COLUMNS} FROM versions "  # noqa: S608
                "WHERE service = %s AND version = %s",
                (service, version),
            ).fetchone()
        return None if row is None else rows.version_record(row)

    def versions(self, service: str) -> list[VersionRecord]:
        with self._read() as conn:
            found = conn.execute(
                f"SELECT {rows.VERSION_COLUMNS} FROM versions "  # noqa: S608
                "WHERE service = %s ORDER BY first_seen, version",
                (service,),
            ).fetchall()
        return [rows.version_record(row) for row in found]

    def went_live_at(self, service: str) -> dict[str, float]:
        with self._read() as conn:
            found = conn.execute(
                f"SELECT version, {_WENT_LIVE} FROM versions WHERE service = %s",  # noqa: S608
                (service,),
            ).fetchall()
        return {str(version): float(at) for version, at in found}

    def mark_baked(self, service: str, version: str, at: float) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                """UPDATE versions SET baked_at = %s
                   WHERE service = %s AND version = %s AND baked_at IS NULL AND NOT bad""",
                (at, service, version),
            )
            return cursor.rowcount > 0

    def mark_bad(self, service: str, version: str, reason: str) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                """UPDATE versions SET bad = true, bad_reason = %s
                   WHERE service = %s AND version = %s""",
                (reason, service, version),
            )
            return cursor.rowcount > 0

    def last_known_good(self, service: str, exclude: str | None = None) -> VersionRecord | None:
        with self._read() as conn:
            # Only fixed fragments are formatted in; values travel as parameters.
            row = conn.execute(
                f"""SELECT {rows.VERSION_COLUMNS} FROM versions
                    WHERE service = %(service)s AND baked_at IS NOT NULL AND NOT bad
                      AND (%(exclude)s::text IS NULL OR version <> %(exclude)s::text)
                    ORDER BY {_WENT_LIVE} DESC, baked_at DESC, version DESC
                    LIMIT 1""",  # noqa: S608
                {"service": service, "exclude": exclude},
            ).fetchone()
        return None if row is None else rows.version_record(row)

    def version_changes(self, service: str, limit: int = 100) -> list[VersionChange]:
        rows.check_limit(limit)
        with self._read() as conn:
            found = conn.execute(
                f"SELECT {rows.VERSION_CHANGE_COLUMNS} FROM version_changes "  # noqa: S608
                "WHERE service = %s ORDER BY id DESC LIMIT %s",
                (service, limit),
            ).fetchall()
        return [rows.version_change(row) for row in found]
