"""SQLite tables ``leases`` and ``members``: the :class:`LeaseStore` (per-service leases
with fencing epochs, and the live daemons).

One SQLite file is one machine's, so on SQLite there is only ever one daemon; the leases
work all the same, so the runtime needs no second path. The clock is SQLite's own
(``julianday('now')``, read inside the write transaction), never the daemon's, as on
PostgreSQL. Every decision (free, expired, held by whom, a member name taken by another
process) is read and written inside one ``BEGIN IMMEDIATE`` transaction, which no other
connection can interleave with.

A lease row is never deleted: its epoch is the highest ever given for the service, so
that a later tenure can pass it. A release expires the row instead.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from rollbackd.core.model import Lease
from rollbackd.store.errors import MemberTakenError
from rollbackd.store.interfaces import LeaseStore
from rollbackd.store.rows import check_name, check_ttl, lease
from rollbackd.store.sqlite.database import Database

CLOCK = "(julianday('now') - 2440587.5) * 86400.0"
"""SQLite's clock as unix seconds (millisecond resolution); constant within a statement."""

LEASE_COLUMNS = "service, holder, epoch, acquired_at, expires_at"


def _now(conn: sqlite3.Connection) -> float:
    return float(conn.execute(f"SELECT {CLOCK}").fetchone()[0])


class SQLiteLeases(Database, LeaseStore):
    def heartbeat(self, member: str, ttl: float, instance: str) -> list[str]:
        check_name("member", member)
        check_name("instance", instance)
        check_ttl(ttl)
        with self._write() as conn:
            now = _now(conn)
            known = conn.execute(
                "SELECT instance, expires_at FROM members WHERE member = ?", (member,)
            ).fetchone()
            if known is not None and known[0] != instance and float(known[1]) > now:
                raise MemberTakenError(member, self.location, expires_at=float(known[1]), now=now)
            conn.execute(
                """INSERT INTO members (member, expires_at, instance) VALUES (?, ?, ?)
                   ON CONFLICT (member) DO UPDATE SET
                       expires_at = excluded.expires_at, instance = excluded.instance""",
                (member, now + ttl, instance),
            )
            # The dead are forgotten, so that the table holds the live members only,
            # however many member ids restarts make up.
            conn.execute("DELETE FROM members WHERE expires_at <= ?", (now,))
            found = conn.execute("SELECT member FROM members ORDER BY member").fetchall()
        return [row[0] for row in found]

    def acquire(self, service: str, holder: str, ttl: float) -> Lease | None:
        check_name("service", service)
        check_name("holder", holder)
        check_ttl(ttl)
        with self._write() as conn:
            return _acquire(conn, service, holder, ttl, _now(conn))

    def acquire_many(self, services: Sequence[str], holder: str, ttl: float) -> list[Lease]:
        check_name("holder", holder)
        check_ttl(ttl)
        names = sorted(set([services] if isinstance(services, str) else services))
        for service in names:
            check_name("service", service)
        if not names:
            return []
        with self._write() as conn:
            now = _now(conn)  # one instant for the whole batch, as on PostgreSQL
            won = [_acquire(conn, service, holder, ttl, now) for service in names]
        return [held for held in won if held is not None]

    def renew(self, holder: str, services: Sequence[str], ttl: float) -> list[Lease]:
        check_name("holder", holder)
        check_ttl(ttl)
        names = [services] if isinstance(services, str) else list(services)
        if not names:
            return []
        marks = ", ".join("?" * len(names))
        with self._write() as conn:
            now = _now(conn)
            found = conn.execute(
                f"""UPDATE leases SET expires_at = ?
                    WHERE holder = ? AND expires_at > ? AND service IN ({marks})
                    RETURNING {LEASE_COLUMNS}""",  # noqa: S608
                (now + ttl, holder, now, *names),
            ).fetchall()
        return sorted((lease(row) for row in found), key=lambda held: held.service)

    def release(self, service: str, holder: str) -> bool:
        check_name("service", service)
        check_name("holder", holder)
        with self._write() as conn:
            now = _now(conn)
            cursor = conn.execute(
                """UPDATE leases SET expires_at = ?
                   WHERE service = ? AND holder = ? AND expires_at > ?""",
                (now, service, holder, now),
            )
            return cursor.rowcount > 0

    def leases(self) -> list[Lease]:
        with self._read() as conn:
            found = conn.execute(
                f"SELECT {LEASE_COLUMNS} FROM leases ORDER BY service"  # noqa: S608
            ).fetchall()
        return [lease(row) for row in found]

    def live_leases(self) -> list[Lease]:
        with self._read() as conn:
            found = conn.execute(
                f"""SELECT {LEASE_COLUMNS} FROM leases WHERE expires_at > {CLOCK}
                    ORDER BY service"""  # noqa: S608
            ).fetchall()
        return [lease(row) for row in found]

    def holds(self, service: str, holder: str, epoch: int) -> bool:
        with self._read() as conn:
            row = conn.execute(
                f"""SELECT 1 FROM leases WHERE service = ? AND holder = ? AND epoch = ?
                    AND expires_at > {CLOCK}""",  # noqa: S608
                (service, holder, epoch),
            ).fetchone()
        return row is not None


def _acquire(
    conn: sqlite3.Connection, service: str, holder: str, ttl: float, now: float
) -> Lease | None:
    """One acquire inside the caller's write transaction, judged at ``now``."""
    row = conn.execute(
        f"SELECT {LEASE_COLUMNS} FROM leases WHERE service = ?",  # noqa: S608
        (service,),
    ).fetchone()
    current = None if row is None else lease(row)
    if current is None:
        conn.execute(
            f"INSERT INTO leases ({LEASE_COLUMNS}) VALUES (?, ?, 1, ?, ?)",  # noqa: S608
            (service, holder, now, now + ttl),
        )
        return Lease(service, holder, 1, now, now + ttl)
    live = current.expires_at > now
    if live and current.holder != holder:
        return None
    if live:
        # The holder's own live lease: a renewal, the same tenure.
        epoch, acquired_at = current.epoch, current.acquired_at
    else:
        epoch, acquired_at = current.epoch + 1, now
    conn.execute(
        """UPDATE leases SET holder = ?, epoch = ?, acquired_at = ?, expires_at = ?
           WHERE service = ?""",
        (holder, epoch, acquired_at, now + ttl, service),
    )
    return Lease(service, holder, epoch, acquired_at, now + ttl)
