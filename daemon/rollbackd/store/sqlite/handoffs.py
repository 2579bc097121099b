"""SQLite table ``handoffs``: the :class:`HandoffStore`, for the contract's sake.

One daemon alone on SQLite holds every service, so it never hands a request off; the table
and these methods keep both backends to one contract (``tests/test_store_contract.py``).
``listen`` wakes nobody: no other daemon shares the file."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from rollbackd.core.model import Handoff, HandoffDraft, JSONValue
from rollbackd.store import rows
from rollbackd.store.errors import StoreError
from rollbackd.store.interfaces import HandoffStore, Listening
from rollbackd.store.sqlite.database import Database

WITHDRAWN = ""
"""``taken_by`` of a request its asker gave up on before anyone took it."""

KEPT = 86400.0
"""Seconds an answered request is kept."""


class _NoWakeups:
    def close(self) -> None:
        pass


class SQLiteHandoffs(Database, HandoffStore):
    def listen(self, wake: Callable[[], None]) -> Listening:
        return _NoWakeups()

    def hand_off(self, draft: HandoffDraft, at: float) -> int:
        with self._write() as conn:
            cursor = conn.execute(
                """INSERT INTO handoffs (service, kind, body, asked_by, asked_at)
                   VALUES (?, ?, ?, ?, ?)""",
                (draft.service, draft.kind.value, rows.dump_json(draft.body), draft.asked_by, at),
            )
            if cursor.lastrowid is None:
                raise StoreError("SQLite gave no id for a handoff")
            return int(cursor.lastrowid)

    def take_handoffs(
        self, taker: str, services: Sequence[str], at: float, limit: int = 100
    ) -> list[Handoff]:
        rows.check_limit(limit)
        rows.check_name("taker", taker)
        if not services:
            return []
        marks = ", ".join("?" for _ in services)
        # One writer at a time (BEGIN IMMEDIATE): read and mark in one transaction.
        with self._write() as conn:
            found = conn.execute(
                f"""SELECT {rows.HANDOFF_COLUMNS} FROM handoffs
                    WHERE taken_by IS NULL AND service IN ({marks})
                    ORDER BY id LIMIT ?""",  # noqa: S608
                (*services, limit),
            ).fetchall()
            ids = [int(row[0]) for row in found]
            conn.executemany(
                "UPDATE handoffs SET taken_by = ?, taken_at = ? WHERE id = ?",
                [(taker, at, i) for i in ids],
            )
        return [replace(rows.handoff(row), taken_by=taker, taken_at=at) for row in found]

    def answer_handoff(self, handoff_id: int, answer: Mapping[str, JSONValue], at: float) -> None:
        with self._write() as conn:
            conn.execute(
                """UPDATE handoffs SET answer = ?, answered_at = ?
                   WHERE id = ? AND answered_at IS NULL""",
                (rows.dump_json(answer), at, handoff_id),
            )
            conn.execute("DELETE FROM handoffs WHERE answered_at < ?", (at - KEPT,))

    def withdraw_handoff(self, handoff_id: int, at: float) -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                """UPDATE handoffs SET taken_by = ?, taken_at = ?
                   WHERE id = ? AND taken_by IS NULL""",
                (WITHDRAWN, at, handoff_id),
            )
            return cursor.rowcount == 1

    def handoff(self, handoff_id: int) -> Handoff | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {rows.HANDOFF_COLUMNS} FROM handoffs WHERE id = ?",  # noqa: S608
                (handoff_id,),
            ).fetchone()
        return None if row is None else rows.handoff(row)
