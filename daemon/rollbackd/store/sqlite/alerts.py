"""SQLite table ``alerts``: the :class:`AlertStore` of what Alertmanager delivered."""

from __future__ import annotations

from collections.abc import Sequence

from rollbackd.core.model import AlertDraft, StoredAlert
from rollbackd.store import rows
from rollbackd.store.interfaces import AlertStore
from rollbackd.store.sqlite.database import Database


class SQLiteAlerts(Database, AlertStore):
    def record_alerts(
        self, drafts: Sequence[AlertDraft], received_at: float
    ) -> list[tuple[StoredAlert, bool]]:
        results: list[tuple[StoredAlert, bool]] = []
        with self._write() as conn:
            for draft in drafts:
                conn.execute(
                    """INSERT INTO alerts (
                            fingerprint, status, starts_at, ends_at, alertname, labels,
                            annotations, generator_url, receiver, group_key, received_at,
                            last_received_at, matched_service, handled_at, outcome)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT (fingerprint, starts_at, status) DO UPDATE SET
                           deliveries = deliveries + 1,
                           last_received_at = max(last_received_at, excluded.received_at)""",
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
                    ),
                )
                row = conn.execute(
                    f"{rows.ALERT_SELECT} WHERE fingerprint = ? AND starts_at = ? AND status = ?",
                    (draft.fingerprint, draft.starts_at, draft.status),
                ).fetchone()
                alert = rows.alert(row)
                # Every conflict adds a delivery, so one delivery means this call inserted it.
                results.append((alert, alert.deliveries == 1))
        return results

    def set_alert_handled(
        self, alert_id: int, at: float, outcome: str, rollback_id: int | None = None
    ) -> None:
        with self._write() as conn:
            conn.execute(
                """UPDATE alerts SET handled_at = ?, outcome = ?, rollback_id = ?
                   WHERE id = ?""",
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
            where.append("matched_service = ?")
            params.append(service)
        if since is not None:
            where.append("received_at >= ?")
            params.append(since)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._read() as conn:
            found = conn.execute(
                f"{rows.ALERT_SELECT} {clause} ORDER BY id DESC LIMIT ?", (*params, limit)
            ).fetchall()
        return [rows.alert(row) for row in found]

    def firing_alerts(self, service: str, limit: int = 1000) -> list[StoredAlert]:
        rows.check_limit(limit)
        with self._read() as conn:
            # Only the fixed column list is formatted in; values travel as parameters.
            found = conn.execute(
                f"""{rows.ALERT_SELECT} WHERE matched_service = ? AND status = 'firing'
                    AND NOT EXISTS (
                        SELECT 1 FROM alerts AS r
                        WHERE r.fingerprint = alerts.fingerprint
                          AND r.starts_at = alerts.starts_at AND r.status = 'resolved')
                    ORDER BY id DESC LIMIT ?""",  # noqa: S608
                (service, limit),
            ).fetchall()
        return [rows.alert(row) for row in found]

    def unhandled_alerts(self, services: Sequence[str], limit: int = 100) -> list[StoredAlert]:
        rows.check_limit(limit)
        if not services:
            return []
        marks = ", ".join("?" for _ in services)
        with self._read() as conn:
            # Only placeholders are formatted in; values travel as parameters.
            found = conn.execute(
                f"""{rows.ALERT_SELECT}
                    WHERE handled_at IS NULL AND matched_service IN ({marks})
                    ORDER BY id LIMIT ?""",
                (*services, limit),
            ).fetchall()
        return [rows.alert(row) for row in found]
