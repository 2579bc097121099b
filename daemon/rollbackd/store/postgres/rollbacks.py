"""PostgreSQL tables ``rollbacks``, ``rollback_steps`` and ``rollback_triggers``: the
:class:`RollbackStore`.

Both decisions that daemons sharing the database could race on are single statements: a
new rollback is an ``INSERT ... ON CONFLICT DO NOTHING`` on the one-per-release index (a
second daemon's insert waits for the first's to commit, then finds the conflict), and a
conditional state move is an ``UPDATE ... WHERE state = ANY(expected)``, which PostgreSQL
re-checks on the row as the other writer left it.

A fenced write first reads the service's lease ``FOR SHARE``, by the server's clock (as
``leases.py``), in the write's own transaction: another daemon's takeover (an ``UPDATE`` of
that row) waits until the write has committed, so no write lands after a takeover."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

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
from rollbackd.store.postgres.connections import Connection
from rollbackd.store.postgres.database import Database
from rollbackd.store.postgres.leases import CLOCK

# The predicate of the rollbacks_one_per_release index, which ON CONFLICT must name.
_CLAIMS_RELEASE = "state IN ('pending', 'running', 'verifying', 'succeeded')"

_INSERT_ROLLBACK = f"""
    INSERT INTO rollbacks (
        service, from_version, release_id, to_version, state, source, automatic, reason,
        mode, "trigger", guards, created_at, updated_at, expires_at, outcome, finished_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::json, %s::json, %s, %s, %s, %s, %s)
    ON CONFLICT (service, from_version, release_id) WHERE {_CLAIMS_RELEASE} DO NOTHING
    RETURNING {rows.ROLLBACK_COLUMNS}"""  # noqa: S608

_MOVE_ROLLBACK = f"""
    UPDATE rollbacks SET
        state = %(state)s, updated_at = %(at)s,
        started_at = CASE WHEN %(running)s AND started_at IS NULL
                          THEN %(at)s ELSE started_at END,
        finished_at = CASE WHEN %(finished)s THEN %(at)s ELSE finished_at END,
        outcome = coalesce(%(outcome)s::text, outcome),
        decided_by = coalesce(%(decided_by)s::text, decided_by),
        to_version = coalesce(%(to_version)s::text, to_version),
        canary = coalesce(%(canary)s::boolean, canary)
    WHERE id = %(id)s AND (%(any)s OR state = ANY(%(expected)s::text[]))
    RETURNING {rows.ROLLBACK_COLUMNS}"""  # noqa: S608


_FENCE = f"""
    SELECT 1 FROM leases
    WHERE service = %s AND holder = %s AND epoch = %s AND expires_at > {CLOCK}
    FOR SHARE"""  # noqa: S608


def _check_fence(conn: Connection, service: str, fence: Fence | None) -> None:
    """FencedError unless ``fence`` (when given) holds ``service``'s live lease now. The
    row stays share-locked until the caller's transaction ends: a takeover waits for it."""
    if fence is None:
        return
    if conn.execute(_FENCE, (service, fence.holder, fence.epoch)).fetchone() is None:
        raise FencedError(
            f"service {service!r}: {fence.holder!r} does not hold its lease with epoch "
            f"{fence.epoch} now"
        )


class PostgresRollbacks(Database, RollbackStore):
    def create_rollback(self, draft: RollbackDraft, *, fence: Fence | None = None) -> Rollback:
        state = RollbackState(draft.state)
        params = (
            draft.service,
            # '' rather than NULL: NULLs never collide in the unique index.
            draft.from_version or "",
            draft.release_id,
            draft.to_version,
            state.value,
            draft.source,
            draft.automatic,
            draft.reason,
            draft.mode,
            rows.dump_json(draft.trigger),
            rows.dump_json_list(draft.guards),
            draft.at,
            draft.at,
            draft.expires_at,
            draft.outcome,
            None if state.live else draft.at,
        )
        with self._write() as conn:
            _check_fence(conn, draft.service, fence)
            row = conn.execute(_INSERT_ROLLBACK, params).fetchone()
            if row is None:
                # rollbacks_one_per_release said no.
                raise ConflictError(
                    f"service {draft.service!r}: release {draft.from_version!r} already has "
                    "a pending, running or successful rollback"
                )
        return rows.rollback(row)

    def rollback(self, rollback_id: int) -> Rollback | None:
        with self._read() as conn:
            row = conn.execute(f"{rows.ROLLBACK_SELECT} WHERE id = %s", (rollback_id,)).fetchone()
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
            where.append("service = %s")
            params.append(service)
        if states is not None:
            if not states:
                return []
            where.append("state = ANY(%s::text[])")
            params.append([RollbackState(s).value for s in states])
        if since is not None:
            where.append("created_at >= %s")
            params.append(since)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._read() as conn:
            found = conn.execute(
                f"{rows.ROLLBACK_SELECT} {clause} ORDER BY id DESC LIMIT %s", (*params, limit)
            ).fetchall()
        return [rows.rollback(row) for row in found]

    def latest_rollback(
        self, service: str, from_version: str | None, release_id: int = 0
    ) -> Rollback | None:
        with self._read() as conn:
            row = conn.execute(
                f"{rows.ROLLBACK_SELECT} WHERE service = %s AND from_version = %s "
                "AND release_id = %s ORDER BY id DESC LIMIT 1",
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
        params = {
            "id": rollback_id,
            "state": state.value,
            "at": at,
            "running": state is RollbackState.RUNNING,
            "finished": not state.live,
            "outcome": outcome,
            "decided_by": decided_by,
            "to_version": to_version,
            "canary": canary,
            "any": expected is None,
            "expected": [RollbackState(e).value for e in expected or ()],
        }
        with self._write() as conn:
            if fence is not None:
                owner = conn.execute(
                    "SELECT service FROM rollbacks WHERE id = %s", (rollback_id,)
                ).fetchone()
                if owner is None:
                    raise StoreError(f"no rollback {rollback_id}")
                _check_fence(conn, owner[0], fence)
            row = conn.execute(_MOVE_ROLLBACK, params).fetchone()
            if row is not None:
                return rows.rollback(row)
            # Nothing moved: say why. No row was locked, so this is the state as last
            # committed, good for the message only.
            found = conn.execute(
                "SELECT state FROM rollbacks WHERE id = %s", (rollback_id,)
            ).fetchone()
            if found is None:
                raise StoreError(f"no rollback {rollback_id}")
            raise ConflictError(
                f"rollback {rollback_id} is {RollbackState(found[0]).value}, not "
                f"{' or '.join(RollbackState(e).value for e in expected or ())}"
            )

    # Triggers

    def add_trigger(
        self, rollback_id: int, at: float, source: str, detail: Mapping[str, JSONValue]
    ) -> int:
        with self._write() as conn:
            row = conn.execute(
                """INSERT INTO rollback_triggers (rollback_id, at, source, detail)
                   VALUES (%s, %s, %s, %s::json) RETURNING id""",
                (rollback_id, at, source, rows.dump_json(detail)),
            ).fetchone()
        return _new_id(row)

    def triggers(self, rollback_id: int, limit: int = -1) -> list[Trigger]:
        with self._read() as conn:
            # LIMIT NULL is no limit, as SQLite's LIMIT -1.
            found = conn.execute(
                f"SELECT {rows.TRIGGER_COLUMNS} FROM rollback_triggers "  # noqa: S608
                "WHERE rollback_id = %s ORDER BY id LIMIT %s",
                (rollback_id, None if limit < 0 else limit),
            ).fetchall()
        return [rows.trigger(row) for row in found]

    def count_triggers(self, rollback_id: int) -> int:
        with self._read() as conn:
            row = conn.execute(
                "SELECT count(*) FROM rollback_triggers WHERE rollback_id = %s", (rollback_id,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    # Steps

    def start_step(self, rollback_id: int, kind: str, executor: str, at: float) -> int:
        with self._write() as conn:
            row = conn.execute(
                """INSERT INTO rollback_steps (rollback_id, kind, executor, started_at)
                   VALUES (%s, %s, %s, %s) RETURNING id""",
                (rollback_id, kind, executor, at),
            ).fetchone()
        return _new_id(row)

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
                """UPDATE rollback_steps SET finished_at = %s, ok = %s, summary = %s,
                       stdout_tail = %s, stderr_tail = %s, command = %s::json
                   WHERE id = %s""",
                (at, ok, summary, stdout_tail, stderr_tail, json.dumps(list(command)), step_id),
            )

    def steps(self, rollback_id: int) -> list[Step]:
        with self._read() as conn:
            found = conn.execute(
                f"SELECT {rows.STEP_COLUMNS} FROM rollback_steps "  # noqa: S608
                "WHERE rollback_id = %s ORDER BY id",
                (rollback_id,),
            ).fetchall()
        return [rows.step(row) for row in found]


def _new_id(row: Sequence[Any] | None) -> int:
    if row is None:
        raise StoreError("PostgreSQL returned no id for the new row")
    return int(row[0])
