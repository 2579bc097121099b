"""PostgreSQL tables ``leases`` and ``members``: the :class:`LeaseStore` (per-service
leases with fencing epochs, and the live daemons), shared by every daemon on the database.

The clock is the server's ``clock_timestamp()`` (the time the statement reads it, where
``now()`` would be the transaction's start), as unix seconds, never a daemon's: read once
per statement in the ``clock`` CTE, so that one statement judges by one instant.

Correct under concurrency by single statements, not by this process's write lock (which
serialises one daemon's writes only): ``acquire`` is one ``INSERT ... ON CONFLICT DO
UPDATE ... WHERE``, and ``renew``/``release`` are one ``UPDATE ... WHERE`` each. Under READ
COMMITTED, a statement that finds its row locked by another daemon's transaction waits for
it, then re-checks its WHERE against the row as that transaction left it: two racing
acquirers never both win. A heartbeat writes its member row in one ``INSERT ... ON CONFLICT
DO UPDATE ... WHERE`` too, so that of two processes given one member name only the one whose
row is live keeps it.

A lease row is never deleted: its epoch is the highest ever given for the service, so
that a later tenure can pass it. A release expires the row instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

from rollbackd.core.model import Lease
from rollbackd.store.errors import MemberTakenError, StoreError
from rollbackd.store.interfaces import LeaseStore
from rollbackd.store.postgres.connections import Connection
from rollbackd.store.postgres.database import Database
from rollbackd.store.rows import check_name, check_ttl, lease

CLOCK = "extract(epoch FROM clock_timestamp())::double precision"
"""The server's clock as unix seconds, at the moment it is read."""

_WITH_CLOCK = f"WITH clock AS (SELECT {CLOCK} AS now)"

LEASE_COLUMNS = "service, holder, epoch, acquired_at, expires_at"

# The same tenure only when the holder renews its own live lease; any other change (a new
# holder, or the same one after expiry or release) is a new tenure with a higher epoch, so
# that whatever was begun under the old one is fenced off.
_SAME_TENURE = "held.holder = excluded.holder AND held.expires_at > excluded.acquired_at"

_ACQUIRE = f"""
    {_WITH_CLOCK}
    INSERT INTO leases AS held ({LEASE_COLUMNS})
    SELECT %(service)s, %(holder)s, 1, clock.now, clock.now + %(ttl)s::double precision
    FROM clock
    ON CONFLICT (service) DO UPDATE SET
        holder = excluded.holder,
        epoch = CASE WHEN {_SAME_TENURE} THEN held.epoch ELSE held.epoch + 1 END,
        acquired_at = CASE WHEN {_SAME_TENURE} THEN held.acquired_at
                           ELSE excluded.acquired_at END,
        expires_at = excluded.expires_at
    WHERE held.expires_at <= excluded.acquired_at OR held.holder = excluded.holder
    RETURNING {LEASE_COLUMNS}"""  # noqa: S608

_ACQUIRE_MANY = f"""
    {_WITH_CLOCK}
    INSERT INTO leases AS held ({LEASE_COLUMNS})
    SELECT wanted.service, %(holder)s, 1, clock.now, clock.now + %(ttl)s::double precision
    FROM clock, unnest(%(services)s::text[]) AS wanted(service)
    ORDER BY wanted.service
    ON CONFLICT (service) DO UPDATE SET
        holder = excluded.holder,
        epoch = CASE WHEN {_SAME_TENURE} THEN held.epoch ELSE held.epoch + 1 END,
        acquired_at = CASE WHEN {_SAME_TENURE} THEN held.acquired_at
                           ELSE excluded.acquired_at END,
        expires_at = excluded.expires_at
    WHERE held.expires_at <= excluded.acquired_at OR held.holder = excluded.holder
    RETURNING {LEASE_COLUMNS}"""  # noqa: S608

_RENEW = f"""
    {_WITH_CLOCK}
    UPDATE leases SET expires_at = clock.now + %(ttl)s::double precision FROM clock
    WHERE holder = %(holder)s AND service = ANY(%(services)s::text[])
      AND expires_at > clock.now
    RETURNING leases.service, leases.holder, leases.epoch, leases.acquired_at,
              leases.expires_at"""  # noqa: S608

# The member's row is this process's (same instance), or dead: only then is it written.
_HEARTBEAT = """
    INSERT INTO members AS known (member, expires_at, instance)
    VALUES (%(member)s, %(expires)s, %(instance)s)
    ON CONFLICT (member) DO UPDATE SET
        expires_at = excluded.expires_at, instance = excluded.instance
    WHERE known.instance = excluded.instance OR known.expires_at <= %(now)s
    RETURNING member"""

_RELEASE = f"""
    {_WITH_CLOCK}
    UPDATE leases SET expires_at = clock.now FROM clock
    WHERE service = %(service)s AND holder = %(holder)s AND expires_at > clock.now"""  # noqa: S608


class PostgresLeases(Database, LeaseStore):
    def heartbeat(self, member: str, ttl: float, instance: str) -> list[str]:
        check_name("member", member)
        check_name("instance", instance)
        check_ttl(ttl)
        with self._write() as conn:
            # Read once for the three statements: one heartbeat judges by one instant.
            clock = conn.execute(f"SELECT {CLOCK}").fetchone()
            if clock is None:
                raise StoreError("PostgreSQL gave no time")
            now = float(clock[0])
            # One statement, so that two processes racing for one member name are judged
            # one after the other: the second waits for the first's row lock, then
            # re-checks the WHERE against the row as the first left it.
            kept = conn.execute(
                _HEARTBEAT,
                {"member": member, "expires": now + ttl, "instance": instance, "now": now},
            ).fetchone()
            if kept is None:
                self._refuse_taken(conn, member, now)
            # The dead are forgotten, so that the table holds the live members only,
            # however many member ids restarts make up. SKIP LOCKED: a row another daemon
            # is heartbeating is alive, and waiting for it could deadlock with its prune.
            conn.execute(
                """DELETE FROM members WHERE member IN (
                       SELECT member FROM members WHERE expires_at <= %s
                       FOR UPDATE SKIP LOCKED)""",
                (now,),
            )
            found = conn.execute(
                "SELECT member FROM members WHERE expires_at > %s ORDER BY member", (now,)
            ).fetchall()
        return [found_row[0] for found_row in found]

    def _refuse_taken(self, conn: Connection, member: str, now: float) -> NoReturn:
        row = conn.execute("SELECT expires_at FROM members WHERE member = %s", (member,)).fetchone()
        expires_at = now if row is None else float(row[0])
        raise MemberTakenError(member, self.location, expires_at=expires_at, now=now)

    def acquire(self, service: str, holder: str, ttl: float) -> Lease | None:
        check_name("service", service)
        check_name("holder", holder)
        check_ttl(ttl)
        with self._write() as conn:
            row = conn.execute(
                _ACQUIRE, {"service": service, "holder": holder, "ttl": float(ttl)}
            ).fetchone()
        return None if row is None else lease(row)

    def acquire_many(self, services: Sequence[str], holder: str, ttl: float) -> list[Lease]:
        check_name("holder", holder)
        check_ttl(ttl)
        names = sorted(set([services] if isinstance(services, str) else services))
        for service in names:
            check_name("service", service)
        if not names:
            return []
        # Rows are locked in service order, as by every other daemon's acquire_many: two
        # racing for overlapping sets wait for each other rather than deadlock.
        with self._write() as conn:
            found = conn.execute(
                _ACQUIRE_MANY, {"services": names, "holder": holder, "ttl": float(ttl)}
            ).fetchall()
        return sorted((lease(row) for row in found), key=lambda held: held.service)

    def renew(self, holder: str, services: Sequence[str], ttl: float) -> list[Lease]:
        check_name("holder", holder)
        check_ttl(ttl)
        names = [services] if isinstance(services, str) else list(services)
        if not names:
            return []
        with self._write() as conn:
            found = conn.execute(
                _RENEW, {"holder": holder, "services": names, "ttl": float(ttl)}
            ).fetchall()
        return sorted((lease(row) for row in found), key=lambda held: held.service)

    def release(self, service: str, holder: str) -> bool:
        check_name("service", service)
        check_name("holder", holder)
        with self._write() as conn:
            cursor = conn.execute(_RELEASE, {"service": service, "holder": holder})
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
                f"""SELECT 1 FROM leases WHERE service = %s AND holder = %s AND epoch = %s
                    AND expires_at > {CLOCK}""",  # noqa: S608
                (service, holder, epoch),
            ).fetchone()
        return row is not None
