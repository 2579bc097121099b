"""The PostgreSQL database under the store: its connections, transactions and errors.

Connections: one for writes, guarded by the write lock, so that the daemon's writes queue
in order as they do on SQLite (the writer thread sends them one at a time anyway), and a
pool of read-only connections, so that a read never waits behind a write in flight
(PostgreSQL's MVCC shows a reader the last committed state beside an open transaction).
Writes block until the server has committed, so async code calls them through
:class:`~rollbackd.store.writer.StoreWriter`; reads are direct calls.

Several daemons may share the database: the write methods are correct under concurrency
by constraints, single statements and row locks, never by this process's lock alone.

Errors: every driver error becomes a :class:`StoreError` naming the database by its URL
without a password. A write that a constraint or the data refused (a second live rollback
of a release, text that is not JSON, a deadlock with another daemon) leaves
``write_failure`` alone; any other failure of a write (server gone, disk full) sets it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import psycopg
import psycopg.errors

from rollbackd.store.errors import StoreError
from rollbackd.store.postgres import migrations
from rollbackd.store.postgres.connections import (
    READ_WAIT,
    Connection,
    Pool,
    Settings,
    set_lock_timeout,
)

RETRY_READS = 1.0
"""Seconds reads fail at once after one could not reach the server."""

PROBE_WAIT = 1.0
"""Seconds the read that tries the server again waits for a connection."""


@dataclass(frozen=True)
class _Unreachable:
    error: str
    retry_at: float
    """``time.monotonic()`` from which one read tries the server again."""


# The database works; it said no to this write.
_REFUSALS = (psycopg.IntegrityError, psycopg.DataError, psycopg.errors.TransactionRollback)


class Database:
    """The connections to one PostgreSQL database. Opening brings the schema up to date
    (several daemons opening at once migrate it once)."""

    def __init__(self, url: str, *, password: str | None = None) -> None:
        self._settings = Settings(url, password)
        self._location = self._settings.location
        self._write_lock = threading.Lock()
        self._write_failure: str | None = None
        """Why the last write failed (server gone, disk full), until a write succeeds."""
        self._closed = False
        self._unreachable: _Unreachable | None = None
        """Set while reads cannot reach the server: they fail at once until retry_at."""
        self._writer: Connection | None = self._open_writer()
        try:
            self._readers: Pool = self._settings.open_readers()
        except psycopg.Error as error:
            self._writer.close()
            raise StoreError(f"cannot open state database {self._location}: {error}") from error

    @property
    def location(self) -> str:
        return self._location

    def close(self) -> None:
        """Close every connection; later calls raise StoreError. Safe to call twice. A read
        in flight meanwhile finishes; its connection is closed when it is handed back."""
        self._closed = True
        self._readers.close()
        with self._write_lock:
            conn, self._writer = self._writer, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def schema_version(self) -> int:
        with self._read() as conn:
            return migrations.stored_version(conn)

    def writable(self, timeout: float = 1.0) -> bool:
        """A cheap readiness probe: can a write transaction start now, and, if the last
        write failed, does a real write succeed again? False when the store is closed,
        the server gone or read-only (a standby), or busy past ``timeout``."""
        if not self._write_lock.acquire(timeout=timeout):
            return False
        try:
            conn = self._writer_connection()
            # Only for this transaction: the probe must not wait on a lock for longer.
            conn.execute(
                "SELECT set_config('statement_timeout', %s, true)",
                (f"{max(1, int(timeout * 1000))}",),
            )
            read_only = conn.execute("SHOW transaction_read_only").fetchone()
            if read_only is None or read_only[0] != "off":
                conn.rollback()
                return False
            if self._write_failure is None:
                conn.rollback()
                return True
            # Only a committed write proves the server takes writes again: the smallest
            # one there is rewrites the schema version unchanged.
            migrations.touch_version_row(conn)
            self._commit(conn)
            self._write_failure = None
            return True
        except (psycopg.Error, StoreError):
            self._rollback_quietly()
            return False
        finally:
            self._write_lock.release()

    @property
    def write_failure(self) -> str | None:
        """Why the last write failed, or None once a write (or ``writable``) succeeds."""
        return self._write_failure

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A pooled read-only connection for the body: it takes no lock a write holds.

        Reads are short calls the event loop may make, so while the server is unreachable
        they fail at once instead of each waiting for a connection: for ``RETRY_READS``
        seconds after a read could not reach it, then one read tries again, waiting at
        most ``PROBE_WAIT`` (the pool reconnects meanwhile, in its own threads)."""
        if self._closed:
            raise self._closed_error()
        unreachable = self._unreachable
        if unreachable is not None and time.monotonic() < unreachable.retry_at:
            raise StoreError(f"state database {self._location}: {unreachable.error}")
        wait = READ_WAIT if unreachable is None else PROBE_WAIT
        try:
            with self._readers.connection(timeout=wait) as conn:
                yield conn
        except psycopg.OperationalError as error:
            if self._closed:
                raise self._closed_error() from error
            self._unreachable = _Unreachable(str(error), time.monotonic() + RETRY_READS)
            raise StoreError(f"state database {self._location}: {error}") from error
        except psycopg.Error as error:
            if self._closed:
                raise self._closed_error() from error
            raise StoreError(f"state database {self._location}: {error}") from error
        self._unreachable = None

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction, under the write lock: committed when the body ends,
        rolled back (and nothing of it stored) when it raises."""
        with self._write_lock:
            conn = self._writer_connection()
            try:
                yield conn
                self._commit(conn)
            except psycopg.Error as error:
                self._rollback_quietly()
                if not isinstance(error, _REFUSALS):
                    self._write_failure = str(error)
                raise StoreError(f"state database {self._location}: {error}") from error
            except BaseException:
                self._rollback_quietly()
                raise
            self._write_failure = None

    def _commit(self, conn: Connection) -> None:
        """Commit the write transaction: where a write waits for the server's fsync. One
        small method, so that a test can hold a write at its commit."""
        conn.commit()

    def _writer_connection(self) -> Connection:
        """The write connection, made anew when the old one broke (the server restarted,
        say): the schema is migrated already, so a new session needs no migration."""
        if self._closed:
            raise self._closed_error()
        conn = self._writer
        if conn is not None and not conn.broken and not conn.closed:
            return conn
        if conn is not None:
            conn.close()
        self._writer = None
        try:
            conn = self._settings.connect_writer()
            set_lock_timeout(conn)
        except psycopg.Error as error:
            self._write_failure = str(error)
            raise StoreError(f"state database {self._location}: {error}") from error
        self._writer = conn
        return conn

    def _rollback_quietly(self) -> None:
        conn = self._writer
        if conn is not None and not conn.closed:
            # A broken connection cannot roll back; it is replaced at the next write.
            with contextlib.suppress(psycopg.Error):
                conn.rollback()

    def _open_writer(self) -> Connection:
        """The write connection, with the schema up to date."""
        try:
            conn = self._settings.connect_writer()
        except psycopg.Error as error:
            raise StoreError(f"cannot open state database {self._location}: {error}") from error
        try:
            migrations.migrate(conn, self._location)
            set_lock_timeout(conn)
        except psycopg.Error as error:
            conn.close()
            raise StoreError(f"state database {self._location}: {error}") from error
        except BaseException:
            conn.close()
            raise
        return conn

    def _closed_error(self) -> StoreError:
        return StoreError(f"state database {self._location} is closed")
