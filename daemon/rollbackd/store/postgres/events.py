"""PostgreSQL table ``events``: the :class:`EventStore`, the audit log."""

from __future__ import annotations

from collections.abc import Sequence

from rollbackd.core.model import Event
from rollbackd.store import rows
from rollbackd.store.errors import StoreError
from rollbackd.store.interfaces import EventStore
from rollbackd.store.postgres.database import Database


class PostgresEvents(Database, EventStore):
    def add_event(self, event: Event) -> int:
        if not event.type:
            raise ValueError("an event needs a type")
        data = rows.dump_json(event.data)
        with self._write() as conn:
            row = conn.execute(
                """INSERT INTO events (at, type, service, rollback_id, data)
                   VALUES (%s, %s, %s, %s, %s::json) RETURNING id""",
                (event.at, event.type, event.service, event.rollback_id, data),
            ).fetchone()
        if row is None:
            raise StoreError("PostgreSQL gave the new event no id")
        return int(row[0])

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
            where.append("service = %s")
            params.append(service)
        if since is not None:
            where.append("at >= %s")
            params.append(since)
        if types is not None:
            # A bare string is a Sequence[str] too; read letter by letter it matches nothing.
            types = [types] if isinstance(types, str) else list(types)
            if not types:
                return []
            where.append("type = ANY(%s::text[])")
            params.append(types)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        # Only fixed fragments and placeholders are joined into the text; values travel
        # as parameters.
        sql = (
            f"SELECT {rows.EVENT_COLUMNS} FROM events "  # noqa: S608
            f"{clause} ORDER BY id DESC LIMIT %s"
        )
        with self._read() as conn:
            found = conn.execute(sql, (*params, limit)).fetchall()
        return [rows.event(row) for row in found]
