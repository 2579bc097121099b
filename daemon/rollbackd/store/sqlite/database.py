"""The SQLite file under the store: its connections, pragmas and transactions.

Durability: WAL with ``synchronous=FULL``. With NORMAL a WAL database stays
consistent, but a power loss or kernel crash may drop the transactions committed just
before it. Those are the ones that matter most here: a lost "rollback started" record
weakens the cooldown and max-rollbacks guards after a host reboot, and an audit log
that forgets the last thing the daemon did to production is not one to trust. The
daemon writes a handful of small transactions per check interval, so an fsync per
commit costs little.

Connections: one for writes, guarded by the write lock, since SQLite allows one writer
at a time anyway; and a pool of read connections, one per read in flight, so that a read
never waits behind a write's fsync (WAL lets readers see the last committed state beside
a writer). A write blocks while it holds the lock (an fsync at most), so async code calls
it through :class:`~rollbackd.store.writer.StoreWriter`; reads are direct calls. Every
write runs in ``BEGIN IMMEDIATE``, which takes SQLite's write lock up front, so a second
process on the same file (the CLI, a second daemon by mistake) waits out the busy timeout
instead of failing half-way through.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

from rollbackd.store.errors import StoreError
from rollbackd.store.sqlite import migrations

BUSY_TIMEOUT = 5.0
"""Seconds a write waits for another connection's write lock before it fails."""


class Database:
    """The connections to one database file. ``path`` is the file itself; its directory
    must exist (it is the daemon's state_dir, whose ownership is not ours to decide).
    Opening brings the schema up to date."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = _open_writer(path)
        self._write_failure: str | None = None
        """Why the last write failed (disk full, I/O error), until a write succeeds."""
        # Guards the two below only, never held while SQLite works.
        self._readers_lock = threading.Lock()
        self._idle_readers: list[sqlite3.Connection] = []
        self._closed = False

    @property
    def path(self) -> Path:
        return self._path

    @property
    def location(self) -> str:
        return str(self._path)

    def close(self) -> None:
        """Close every connection; later calls raise StoreError. Safe to call twice. A read
        in flight meanwhile finishes, and its connection is closed when it is handed back."""
        with self._readers_lock:
            self._closed = True
            idle, self._idle_readers = self._idle_readers, []
        for conn in idle:
            conn.close()
        with self._write_lock:
            if self._writer is None:
                return
            conn, self._writer = self._writer, None
            try:
                # Cheap, and keeps the query planner's statistics current for next start.
                conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            finally:
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
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def writable(self, timeout: float = 1.0) -> bool:
        """A cheap readiness probe: can a write transaction start now, and, if the last
        write failed, does a real write succeed again? False when the store is closed,
        read-only, full or failing, busy in this process past ``timeout``, or
        write-locked by another process past the busy timeout."""
        if not self._write_lock.acquire(timeout=timeout):
            return False
        try:
            conn = self._writer
            if conn is None:
                return False
            try:
                # BEGIN IMMEDIATE takes the write lock without writing, so it proves the
                # file is writable and not held by another process, at no fsync.
                conn.execute("BEGIN IMMEDIATE")
                if self._write_failure is None:
                    conn.execute("ROLLBACK")
                    return True
                # The lock does not prove there is room: after a failed write only a
                # committed write does. Rewriting the header's user_version unchanged is
                # the smallest one there is.
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                conn.execute(f"PRAGMA user_version = {version}")
                self._commit(conn)
                self._write_failure = None
                return True
            except sqlite3.Error:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                return False
        finally:
            self._write_lock.release()

    @property
    def write_failure(self) -> str | None:
        """Why the last write failed, or None once a write (or ``writable``) succeeds."""
        return self._write_failure

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read connection of its own for the body: it takes no lock a write holds."""
        conn = self._take_reader()
        try:
            yield conn
        except sqlite3.Error as error:
            raise StoreError(f"state database {self._path}: {error}") from error
        finally:
            self._give_back(conn)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back when the body raises."""
        with self._write_lock:
            conn = self._writer
            if conn is None:
                raise self._closed_error()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    self._commit(conn)
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            except sqlite3.IntegrityError as error:
                # A constraint said no: the database works, the write was refused.
                raise StoreError(f"state database {self._path}: {error}") from error
            except sqlite3.Error as error:
                self._write_failure = str(error)
                raise StoreError(f"state database {self._path}: {error}") from error
            self._write_failure = None

    def _commit(self, conn: sqlite3.Connection) -> None:
        """Commit the write transaction: where a write waits for the disk (the fsync).
        One small method, so that a benchmark can wrap it to play a slow disk."""
        conn.execute("COMMIT")

    def _take_reader(self) -> sqlite3.Connection:
        with self._readers_lock:
            if self._closed:
                raise self._closed_error()
            if self._idle_readers:
                return self._idle_readers.pop()
        # Opened outside the lock: opening touches the file. The pool grows to the most
        # reads ever in flight at once, which the daemon's thread count bounds.
        return _open_reader(self._path)

    def _give_back(self, conn: sqlite3.Connection) -> None:
        with self._readers_lock:
            if not self._closed:
                self._idle_readers.append(conn)
                return
        conn.close()

    def _closed_error(self) -> StoreError:
        return StoreError(f"state database {self._path} is closed")


def _connect(path: Path) -> sqlite3.Connection:
    try:
        # isolation_level=None: the module must not open transactions behind our back;
        # every write says BEGIN IMMEDIATE itself. timeout sets SQLite's busy timeout.
        # check_same_thread=False: a connection is used by one thread at a time (the write
        # lock, the pool), not always the same one.
        return sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as error:
        raise StoreError(f"cannot open state database {path}: {error}") from error


def _open_writer(path: Path) -> sqlite3.Connection:
    """The write connection, with the file in WAL mode and its schema up to date."""
    conn = _connect(path)
    try:
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if mode.lower() != "wal":
            # WAL needs shared memory beside the file; network filesystems may refuse it.
            raise StoreError(
                f"state database {path}: SQLite refused WAL mode (journal mode is {mode}); "
                "put state_dir on a local filesystem"
            )
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrations.migrate(conn, path)
    except sqlite3.Error as error:
        conn.close()
        raise StoreError(f"state database {path}: {error}") from error
    except BaseException:
        conn.close()
        raise
    return conn


def _open_reader(path: Path) -> sqlite3.Connection:
    """A read connection. The file is in WAL mode already (the writer made it so, and the
    mode is kept in the file); query_only makes a write slipped onto a read path fail
    loudly instead of bypassing the write lock."""
    conn = _connect(path)
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as error:
        conn.close()
        raise StoreError(f"state database {path}: {error}") from error
    return conn
