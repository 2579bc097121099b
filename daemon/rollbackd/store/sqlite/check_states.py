"""SQLite table ``check_states``: the :class:`CheckStateStore`. The state column is
``store/check_state_codec.py``'s JSON, which this module never reads inside."""

from __future__ import annotations

from rollbackd.core.model import StoredCheckState
from rollbackd.store import rows
from rollbackd.store.interfaces import CheckStateStore
from rollbackd.store.sqlite.database import Database


class SQLiteCheckStates(Database, CheckStateStore):
    def check_states(self) -> dict[tuple[str, str], StoredCheckState]:
        with self._read() as conn:
            found = conn.execute(
                f"SELECT {rows.CHECK_STATE_COLUMNS} FROM check_states"  # noqa: S608
            ).fetchall()
        states = [rows.check_state(row) for row in found]
        return {(state.service, state.check): state for state in states}

    def save_check_state(self, service: str, check: str, state: str, at: float) -> None:
        # The table's json_valid CHECK refuses text that is not JSON.
        with self._write() as conn:
            conn.execute(
                """INSERT INTO check_states (service, check_name, state, updated_at)
                   VALUES (?, ?, ?, ?)
                   ON CONFLICT (service, check_name) DO UPDATE SET
                       state = excluded.state, updated_at = excluded.updated_at""",
                (service, check, state, at),
            )

    def delete_check_state(self, service: str, check: str) -> None:
        with self._write() as conn:
            conn.execute(
                "DELETE FROM check_states WHERE service = ? AND check_name = ?", (service, check)
            )
