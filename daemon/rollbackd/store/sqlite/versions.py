"""SQLite tables ``versions`` and ``version_changes``: the :class:`VersionStore` of a service's
versions and release history."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rollbackd.core.model import VersionChange, VersionRecord, VersionSource
from rollbackd.store import rows
from rollbackd.store.errors import ConflictError
from rollbackd.store.interfaces import VersionStore
from rollbackd.store.sqlite.database import Database

# When each version last went live: its latest change to it, else its first sighting.
_WENT_LIVE = """max(first_seen, coalesce(
    (SELECT max(c.at) FROM version_changes AS c
     WHERE c.service = versions.service AND c.to_version = versions.version),
    first_seen))"""


class SQLiteVersions(Database, VersionStore):
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
            # Read inside the write transaction, so nothing can change it before the write.
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
        with self._write() as conn:
            conn.execute(
                """UPDATE versions SET last_seen = max(last_seen, ?)
                   WHERE service = ? AND version = ?""",
                (at, service, version),
            )

    def touch_versions(self, seen: Sequence[tuple[str, str, float]]) -> None:
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
                f"SELECT {rows.VERSION_COLUMNS} FROM versions "  # noqa: S608
                "WHERE service = ? AND version = ?",
                (service, version),
            ).fetchone()
        return None if row is None else rows.version_record(row)

    def versions(self, service: str) -> list[VersionRecord]:
        with self._read() as conn:
            found = conn.execute(
                f"SELECT {rows.VERSION_COLUMNS} FROM versions "  # noqa: S608
                "WHERE service = ? ORDER BY first_seen, version",
                (service,),
            ).fetchall()
        return [rows.version_record(row) for row in found]

    def went_live_at(self, service: str) -> dict[str, float]:
        with self._read() as conn:
            found = conn.execute(
                f"SELECT version, {_WENT_LIVE} FROM versions WHERE service = ?",  # noqa: S608
                (service,),
            ).fetchall()
        return {str(version): float(at) for version, at in found}

    def mark_baked(self, service: str, version: str, at: float) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                """UPDATE versions SET baked_at = ?
                   WHERE service = ? AND version = ? AND baked_at IS NULL AND bad = 0""",
                (at, service, version),
            )
            return cursor.rowcount > 0

    def mark_bad(self, service: str, version: str, reason: str) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                """UPDATE versions SET bad = 1, bad_reason = ?
                   WHERE service = ? AND version = ?""",
                (reason, service, version),
            )
            return cursor.rowcount > 0

    def last_known_good(self, service: str, exclude: str | None = None) -> VersionRecord | None:
        with self._read() as conn:
            # Only fixed fragments are formatted in; values travel as parameters.
            row = conn.execute(
                f"""SELECT {rows.VERSION_COLUMNS} FROM versions
                    WHERE service = ? AND baked_at IS NOT NULL AND bad = 0
                      AND (? IS NULL OR version <> ?)
                    ORDER BY {_WENT_LIVE} DESC, baked_at DESC, version DESC
                    LIMIT 1""",  # noqa: S608
                (service, exclude, exclude),
            ).fetchone()
        return None if row is None else rows.version_record(row)

    def version_changes(self, service: str, limit: int = 100) -> list[VersionChange]:
        rows.check_limit(limit)
        with self._read() as conn:
            found = conn.execute(
                f"SELECT {rows.VERSION_CHANGE_COLUMNS} FROM version_changes "  # noqa: S608
                "WHERE service = ? ORDER BY id DESC LIMIT ?",
                (service, limit),
            ).fetchall()
        return [rows.version_change(row) for row in found]
