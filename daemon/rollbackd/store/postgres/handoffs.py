"""PostgreSQL table ``handoffs``: the :class:`HandoffStore` of requests handed to a
service's holder, and the wake-ups (``NOTIFY``) that tell the other daemons to look.

A request is taken by one daemon only, however many race: ``take_handoffs`` is one
``UPDATE ... WHERE taken_by IS NULL`` over rows locked ``FOR UPDATE SKIP LOCKED``, so a
second taker skips what the first has locked and, under READ COMMITTED, re-checks
``taken_by`` of anything it waited for. A withdrawn request is marked taken by nobody
(``WITHDRAWN``), so it can never be taken afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from rollbackd.core.model import Handoff, HandoffDraft, JSONValue
from rollbackd.store import rows
from rollbackd.store.errors import StoreError
from rollbackd.store.interfaces import HandoffStore, Listening
from rollbackd.store.postgres.connections import Connection
from rollbackd.store.postgres.database import Database
from rollbackd.store.postgres.listener import Listener

CHANNEL = "rollbackd"
"""The ``LISTEN``/``NOTIFY`` channel of wake-ups (``listener.py`` listens on it)."""

WITHDRAWN = ""
"""``taken_by`` of a request its asker gave up on before anyone took it."""

KEPT = 86400.0
"""Seconds an answered request is kept (to read back, and for people looking into one)."""

_TAKE = f"""
    UPDATE handoffs SET taken_by = %(taker)s, taken_at = %(at)s
    WHERE id IN (
        SELECT id FROM handoffs
        WHERE taken_by IS NULL AND service = ANY(%(services)s::text[])
        ORDER BY id LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
      AND taken_by IS NULL
    RETURNING {rows.HANDOFF_COLUMNS}"""  # noqa: S608


def notify(conn: Connection) -> None:
    """Wake the listening daemons when this transaction commits (PostgreSQL delivers a
    notification at commit, and never for a transaction rolled back)."""
    conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))


class PostgresHandoffs(Database, HandoffStore):
    def listen(self, wake: Callable[[], None]) -> Listening:
        return Listener(self._settings, CHANNEL, wake)

    def hand_off(self, draft: HandoffDraft, at: float) -> int:
        with self._write() as conn:
            row = conn.execute(
                """INSERT INTO handoffs (service, kind, body, asked_by, asked_at)
                   VALUES (%s, %s, %s::json, %s, %s) RETURNING id""",
                (draft.service, draft.kind.value, rows.dump_json(draft.body), draft.asked_by, at),
            ).fetchone()
            if row is None:
                raise StoreError("PostgreSQL returned no id for a handoff")
            notify(conn)
        return int(row[0])

    def take_handoffs(
        self, taker: str, services: Sequence[str], at: float, limit: int = 100
    ) -> list[Handoff]:
        rows.check_limit(limit)
        rows.check_name("taker", taker)
        if not services:
            return []
        with self._write() as conn:
            found = conn.execute(
                _TAKE, {"taker": taker, "at": at, "services": list(services), "limit": limit}
            ).fetchall()
        return sorted((rows.handoff(row) for row in found), key=lambda h: h.id)

    def answer_handoff(self, handoff_id: int, answer: Mapping[str, JSONValue], at: float) -> None:
        with self._write() as conn:
            conn.execute(
                """UPDATE handoffs SET answer = %s::json, answered_at = %s
                   WHERE id = %s AND answered_at IS NULL""",
                (rows.dump_json(answer), at, handoff_id),
            )
            conn.execute("DELETE FROM handoffs WHERE answered_at < %s", (at - KEPT,))
            notify(conn)

    def withdraw_handoff(self, handoff_id: int, at: float) -> bool:
        with self._write() as conn:
            row = conn.execute(
                """UPDATE handoffs SET taken_by = %s, taken_at = %s
                   WHERE id = %s AND taken_by IS NULL RETURNING id""",
                (WITHDRAWN, at, handoff_id),
            ).fetchone()
        return row is not None

    def handoff(self, handoff_id: int) -> Handoff | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {rows.HANDOFF_COLUMNS} FROM handoffs WHERE id = %s",  # noqa: S608
                (handoff_id,),
            ).fetchone()
        return None if row is None else rows.handoff(row)
