"""SQLite tables ``service_state`` and ``pauses``: the :class:`ServiceStateStore` (current
version, bake clock, paused and frozen flags, pause scopes)."""

from __future__ import annotations

from rollbackd.core.model import ServiceState
from rollbackd.store import rows
from rollbackd.store.interfaces import ServiceStateStore
from rollbackd.store.sqlite.database import Database


class SQLiteServices(Database, ServiceStateStore):
    def service_state(self, service: str) -> ServiceState | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {rows.SERVICE_STATE_COLUMNS} FROM service_state "  # noqa: S608
                "WHERE service = ?",
                (service,),
            ).fetchone()
        return None if row is None else rows.service_state(row)

    def service_states(self) -> list[ServiceState]:
        with self._read() as conn:
            found = conn.execute(
                f"SELECT {rows.SERVICE_STATE_COLUMNS} FROM service_state "  # noqa: S608
                "ORDER BY service"
            ).fetchall()
        return [rows.service_state(row) for row in found]

    def set_healthy_since(self, service: str, at: float | None) -> None:
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
        reason = reason if frozen else None
        with self._write() as conn:
            conn.execute(
                """INSERT INTO service_state (service, frozen, frozen_reason) VALUES (?, ?, ?)
                   ON CONFLICT (service) DO UPDATE SET
                       frozen = excluded.frozen, frozen_reason = excluded.frozen_reason""",
                (service, int(frozen), reason),
            )

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
        with self._read() as conn:
            return {row[0] for row in conn.execute("SELECT scope FROM pauses")}
