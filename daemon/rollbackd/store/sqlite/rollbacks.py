"""SQLite tables ``rollbacks``, ``rollback_steps`` and ``rollback_triggers``: the
:class:`RollbackStore`.

A fenced write checks the service's lease inside its own ``BEGIN IMMEDIATE`` transaction,
by SQLite's clock (as ``leases.py``): no other connection can move the lease in between."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence

from rollbackd.core.model import (
    Fence,
    JSONValue,
    Rollback,
    RollbackDraft,
    RollbackState,
    Step,
    Trigger,
)
from rollbackd.store import rows
from rollbackd.store.errors import ConflictError, FencedError, StoreError
from rollbackd.store.interfaces import RollbackStore
from rollbackd.store.sqlite.database import Database
from rollbackd.store.sqlite.leases import CLOCK


def _check_fence(conn: sqlite3.Connection, service: str, fence: Fence | None) -> None:
    """FencedError unless ``fence`` (when given) holds ``service``'s live lease now; run
    inside the write's transaction, so the check and the write are one step."""
    if fence is None:
        return
    row = conn.execute(
        f"""SELECT 1 FROM leases WHERE service = ? AND holder = ? AND epoch = ?
            AND expires_at > {CLOCK}""",  # noqa: S608
        (service, fence.holder, fence.epoch),
    ).fetchone()
    if row is None:
        raise FencedError(
            f"service {service!r}: {fence.holder!r} does not hold its lease with epoch "
            f"{fence.epoch} now"
        )


class SQLiteRollbacks(Database, RollbackStore):
    def create_rollback(self, draft: RollbackDraft, *, fence: Fence | None = None) -> Rollback:
        state = RollbackState(draft.state)
        with self._write() as conn:
            _check_fence(conn, draft.service, fence)
            try:
                cursor = conn.execute(
                    """INSERT INTO rollbacks (
                            service, from_version, release_id, to_version, state, source,
                            automatic, reason, mode, trigger, guards, created_at, updated_at,
                            expires_at, outcome, finished_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        draft.service,
                        # '' rather than NULL: NULLs never collide in the unique index.
                        draft.from_version or "",
                        draft.release_id,
                        draft.to_version,
                        state.value,
                        draft.source,
                        int(draft.automatic),
                        draft.reason,
                        draft.mode,
                        rows.dump_json(draft.trigger),
                        rows.dump_json_list(draft.guards),
                        draft.at,
                        draft.at,
                        draft.expires_at,
                        draft.outcome,
                        None if state.live else draft.at,
                    ),
                )
            except sqlite3.IntegrityError as error:
                # rollbacks_one_per_release said no.
                raise ConflictError(
                    f"service {draft.service!r}: release {draft.from_version!r} already has "
                    "a pending, running or successful rollback"
                ) from error
            row = conn.execute(
                f"{rows.ROLLBACK_SELECT} WHERE id = ?", (cursor.lastrowid,)
            ).fetchone()
        return rows.rollback(row)

    def rollback(self, rollback_id: int) -> Rollback | None:
        with self._read() as conn:
            row = conn.execute(f"{rows.ROLLBACK_SELECT} WHERE id = ?", (rollback_id,)).fetchone()
        return None if row is None else rows.rollback(row)

    def rollbacks(
        self,
        service: str | None = None,
        states: Sequence[RollbackState] | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Rollback]:
        rows.check_limit(limit)
        where: list[str] = []
        params: list[object] = []
        if service is not None:
            where.append("service = ?")
            params.append(service)
        if states is not None:
            if not states:
                return []
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(RollbackState(s).value for s in states)
        if since is not None:
            where.append("created_at >= ?")
            params.append(since)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._read() as conn:
            found = conn.execute(
                f"{rows.ROLLBACK_SELECT} {clause} ORDER BY id DESC LIMIT ?", (*params, limit)
            ).fetchall()
        return [rows.rollback(row) for row in found]

    def latest_rollback(
        self, service: str, from_version: str | None, release_id: int = 0
    ) -> Rollback | None:
        with self._read() as conn:
            row = conn.execute(
                f"{rows.ROLLBACK_SELECT} WHERE service = ? AND from_version = ? "
                "AND release_id = ? ORDER BY id DESC LIMIT 1",
                (service, from_version or "", release_id),
            ).fetchone()
        return None if row is None else rows.rollback(row)

    def set_rollback_state(
        self,
        rollback_id: int,
        state: RollbackState,
        at: float,
        *,
        expected: Sequence[RollbackState] | None = None,
        outcome: str | None = None,
        decided_by: str | None = None,
        to_version: str | None = None,
        canary: bool | None = None,
        fence: Fence | None = None,
    ) -> Rollback:
        state = RollbackState(state)
        with self._write() as conn:
            # Read inside the write transaction: the check and the move are one step.
            row = conn.execute(
                "SELECT state, service FROM rollbacks WHERE id = ?", (rollback_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"no rollback {rollback_id}")
            _check_fence(conn, row[1], fence)
            current = RollbackState(row[0])
            if expected is not None and current not in expected:
                raise ConflictError(
                    f"rollback {rollback_id} is {current.value}, not "
                    f"{' or '.join(RollbackState(e).value for e in expected)}"
                )
            conn.execute(
                """UPDATE rollbacks SET
                       state = ?, updated_at = ?,
                       started_at = CASE WHEN ? = 'running' AND started_at IS NULL
                                         THEN ? ELSE started_at END,
                       finished_at = CASE WHEN ? THEN ? ELSE finished_at END,
                       outcome = coalesce(?, outcome),
                       decided_by = coalesce(?, decided_by),
                       to_version = coalesce(?, to_version),
                       canary = coalesce(?, canary)
                   WHERE id = ?""",
                (
                    state.value,
                    at,
                    state.value,
                    at,
                    int(not state.live),
                    at,
                    outcome,
                    decided_by,
                    to_version,
                    None if canary is None else int(canary),
                    rollback_id,
                ),
            )
            updated = conn.execute(
                f"{rows.ROLLBACK_SELECT} WHERE id = ?", (rollback_id,)
            ).fetchone()
        return rows.rollback(updated)

    # Triggers

    def add_trigger(
        self, rollback_id: int, at: float, source: str, detail: Mapping[str, JSONValue]
    ) -> int:
        with self._write() as conn:
            cursor = conn.execute(
                """INSERT INTO rollback_triggers (rollback_id, at, source, detail)
                   VALUES (?, ?, ?, ?)""",
                (rollback_id, at, source, rows.dump_json(detail)),
            )
            return int(cursor.lastrowid or 0)

    def triggers(self, rollback_id: int, limit: int = -1) -> list[Trigger]:
        with self._read() as conn:
            # SQLite reads LIMIT -1 as no limit.
            found = conn.execute(
                f"SELECT {rows.TRIGGER_COLUMNS} FROM rollback_triggers "  # noqa: S608
                "WHERE rollback_id = ? ORDER BY id LIMIT ?",
                (rollback_id, limit),
            ).fetchall()
        return [rows.trigger(row) for row in found]

    def count_triggers(self, rollback_id: int) -> int:
        with self._read() as conn:
            row = conn.execute(
                "SELECT count(*) FROM rollback_triggers WHERE rollback_id = ?", (rollback_id,)
            ).fetchone()
        return int(row[0])

    # Steps

    def start_step(self, rollback_id: int, kind: str, executor: str, at: float) -> int:
        with self._write() as conn:
            cursor = conn.execute(
                """INSERT INTO rollback_steps (rollback_id, kind, executor, started_at)
                   VALUES (?, ?, ?, ?)""",
                (rollback_id, kind, executor, at),
            )
            return int(cursor.lastrowid or 0)

    def finish_step(
        self,
        step_id: int,
        at: float,
        ok: bool,
        summary: str,
        stdout_tail: str = "",
        stderr_tail: str = "",
        command: Sequence[str] = (),
    ) -> None:
        with self._write() as conn:
            conn.execute(
                """UPDATE rollback_steps SET finished_at = ?, ok = ?, summary = ?,
                       stdout_tail = ?, stderr_tail = ?, command = ?
                   WHERE id = ?""",
                (
                    at,
                    int(ok),
                    summary,
                    stdout_tail,
                    stderr_tail,
                    json.dumps(list(command)),
                    step_id,
                ),
            )

    def steps(self, rollback_id: int) -> list[Step]:
        with self._read() as conn:
            found = conn.execute(
                f"SELECT {rows.STEP_COLUMNS} FROM rollback_steps "  # noqa: S608
                "WHERE rollback_id = ? ORDER BY id",
                (rollback_id,),
            ).fetchall()
        return [rows.step(row) for row in found]
