"""SQLite table ``events``: the :class:`EventStore`, the audit log."""

from __future__ import annotations

from collections.abc import Sequence

from rollbackd.core.model import Event
from rollbackd.store import rows
from rollbackd.store.errors import StoreError
from rollbackd.store.interfaces import EventStore
from rollbackd.store.sqlite.database import Database


class SQLiteEvents(Database, EventStore):
    def add_event(self, event: Event) -> int:
        if not event.type:
            raise ValueError("an event needs a type")
        data = rows.dump_json(event.data)
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
        rows.check_limit(limit)
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
            f"SELECT {rows.EVENT_COLUMNS} FROM events "  # noqa: S608
            f"{clause} ORDER BY id DESC LIMIT ?"
        )
        with self._read() as conn:
            found = conn.execute(sql, (*params, limit)).fetchall()
        return [rows.event(row) for row in found]
