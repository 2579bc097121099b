"""PostgreSQL table ``alerts``: the :class:`AlertStore` of what Alertmanager delivered.

A re-sent alert is one ``INSERT ... ON CONFLICT DO UPDATE`` on its (fingerprint,
starts_at, status) key: atomic, so two daemons receiving the same delivery count it twice
and store it once."""

from __future__ import annotations

from collections.abc import Sequence

from rollbackd.core.model import AlertDraft, StoredAlert
from rollbackd.store import rows
from rollbackd.store.errors import StoreError
from rollbackd.store.interfaces import AlertStore
from rollbackd.store.postgres.database import Database
from rollbackd.store.postgres.handoffs import notify

_UPSERT_ALERT = f"""
    INSERT INTO alerts (
        fingerprint, status, starts_at, ends_at, alertname, labels, annotations,
        generator_url, receiver, group_key, received_at, last_received_at, matched_service,
        handled_at, outcome)
    VALUES (%s, %s, %s, %s, %s, %s::json, %s::json, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (fingerprint, starts_at, status) DO UPDATE SET
        deliveries = alerts.deliveries + 1,
        last_received_at = greatest(alerts.last_received_at, excluded.received_at)
    RETURNING {rows.ALERT_COLUMNS}"""  # noqa: S608


class PostgresAlerts(Database, AlertStore):
    def record_alerts(
        self, drafts: Sequence[AlertDraft], received_at: float
    ) -> list[tuple[StoredAlert, bool]]:
        results: list[tuple[StoredAlert, bool]] = []
        if not drafts:
            return results
        params = [
            (
                draft.fingerprint,
                draft.status,
                draft.starts_at,
                draft.ends_at,
                draft.alertname,
                rows.dump_json(draft.labels),
                rows.dump_json(draft.annotations),
                draft.generator_url,
                draft.receiver,
                draft.group_key,
                received_at,
                received_at,
                draft.matched_service,
                None if draft.needs_handling else received_at,
                draft.outcome,
            )
            for draft in drafts
        ]
        with self._write() as conn, conn.cursor() as cursor:
            # One statement per alert, sent together (psycopg pipelines executemany): one
            # round trip for the delivery, not one per alert.
            cursor.executemany(_UPSERT_ALERT, params, returning=True)
            while True:
                row = cursor.fetchone()
                if row is None:
                    raise StoreError("PostgreSQL returned no row for an upserted alert")
                alert = rows.alert(row)
                # Every conflict adds a delivery, so one delivery means this call inserted it.
                results.append((alert, alert.deliveries == 1))
                if not cursor.nextset():
                    break
            if any(alert.handled_at is None for alert, _ in results):
                # The service's holder may be another daemon: it looks at once.
                notify(conn)
        return results

    def set_alert_handled(
        self, alert_id: int, at: float, outcome: str, rollback_id: int | None = None
    ) -> None:
        with self._write() as conn:
            conn.execute(
                """UPDATE alerts SET handled_at = %s, outcome = %s, rollback_id = %s
                   WHERE id = %s""",
                (at, outcome, rollback_id, alert_id),
            )

    def alerts(
        self,
        service: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[StoredAlert]:
        rows.check_limit(limit)
        where: list[str] = []
        params: list[object] = []
        if service is not None:
            where.append("matched_service = %s")
            params.append(service)
        if since is not None:
            where.append("received_at >= %s")
            params.append(since)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._read() as conn:
            found = conn.execute(
                f"{rows.ALERT_SELECT} {clause} ORDER BY id DESC LIMIT %s", (*params, limit)
            ).fetchall()
        return [rows.alert(row) for row in found]

    def firing_alerts(self, service: str, limit: int = 1000) -> list[StoredAlert]:
        rows.check_limit(limit)
        with self._read() as conn:
            # Only the fixed column list is formatted in; values travel as parameters.
            found = conn.execute(
                f"""{rows.ALERT_SELECT} WHERE matched_service = %s AND status = 'firing'
                    AND NOT EXISTS (
                        SELECT 1 FROM alerts AS r
                        WHERE r.fingerprint = alerts.fingerprint
                          AND r.starts_at = alerts.starts_at AND r.status = 'resolved')
                    ORDER BY id DESC LIMIT %s""",  # noqa: S608
                (service, limit),
            ).fetchall()
        return [rows.alert(row) for row in found]

    def unhandled_alerts(self, services: Sequence[str], limit: int = 100) -> list[StoredAlert]:
        rows.check_limit(limit)
        if not services:
            return []
        with self._read() as conn:
            found = conn.execute(
                f"""{rows.ALERT_SELECT}
                    WHERE handled_at IS NULL AND matched_service = ANY(%s::text[])
                    ORDER BY id LIMIT %s""",
                (list(services), limit),
            ).fetchall()
        return [rows.alert(row) for row in found]
