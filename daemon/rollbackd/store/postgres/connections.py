"""How the store connects to PostgreSQL: the URL without its password, and the sessions.

Two kinds of session: the write session (transactions under READ COMMITTED, which the
write methods' row locks and single statements are written for; a lock timeout, as
SQLite's busy timeout) and the read sessions of the pool (autocommit, read-only, so a
write slipped onto a read path fails loudly instead of bypassing the write lock). Both
read ``json`` columns as text: the mappers of ``rows`` parse it, as on SQLite, and a
check state comes back as the very text that was saved.

The password never enters the URL the store keeps, a message or a log: it travels as a
connection keyword only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg.types.string import TextLoader

Connection = psycopg.Connection[TupleRow]
Pool = psycopg_pool.ConnectionPool[Connection]

CONNECT_TIMEOUT = 10
"""Seconds libpq waits for the server when the URL says nothing else."""

LOCK_TIMEOUT = 5.0
"""Seconds a write waits for a row lock another daemon holds before it fails (SQLite's
busy timeout). Not applied to migrations, which wait for each other on purpose."""

READ_POOL_SIZE = 8
"""Read connections at most; a read beyond them waits for one to be handed back."""

READ_WAIT = 10.0
"""Seconds a read waits for a free read connection (or for the server) before it fails."""

RECONNECT_GIVE_UP = 2.0
"""Seconds the read pool goes on retrying one lost connection before it gives up; the next
read starts a new attempt at once. The pool's retries back off exponentially (1 s, 2 s,
4 s, ...), so a long series would leave reads failing for as long after the server is back
as the outage lasted; short series keep that to about a second."""


def redact(url: str) -> str:
    """``url`` without any password: fit for messages and logs."""
    if "://" not in url:
        # A key=value conninfo string, which libpq accepts as well as a URI.
        params = conninfo_to_dict(url)
        params.pop("password", None)
        return make_conninfo("", **params)
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}{at}{hosts}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class Settings:
    """Where the database is and how to log in. ``password`` comes from the config's
    ``password_file`` or ``password_env``; when given, it wins over one in the URL."""

    url: str
    password: str | None = None

    @property
    def location(self) -> str:
        return redact(self.url)

    def keywords(self) -> dict[str, Any]:
        """Connection keywords on top of the URL's; the URL's own settings are kept."""
        given = conninfo_to_dict(self.url)
        extra: dict[str, Any] = {}
        if self.password is not None:
            extra["password"] = self.password
        if "connect_timeout" not in given:
            extra["connect_timeout"] = CONNECT_TIMEOUT
        if "application_name" not in given:
            extra["application_name"] = "rollbackd"
        return extra

    def connect_writer(self) -> Connection:
        """A write session, not yet migrated nor given its lock timeout."""
        conn = psycopg.connect(self.url, autocommit=False, **self.keywords())
        try:
            conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            _read_json_as_text(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def open_readers(self) -> Pool:
        """The pool of read sessions, with its first connection made (or PoolTimeout)."""
        pool: Pool = psycopg_pool.ConnectionPool(
            self.url,
            kwargs={"autocommit": True, **self.keywords()},
            configure=_configure_reader,
            min_size=1,
            max_size=READ_POOL_SIZE,
            timeout=READ_WAIT,
            reconnect_timeout=RECONNECT_GIVE_UP,
            name="rollbackd-readers",
            open=False,
        )
        try:
            pool.open(wait=True, timeout=READ_WAIT)
        except BaseException:
            pool.close()
            raise
        return pool


def set_lock_timeout(conn: Connection) -> None:
    """Give the write session its lock timeout, for the session (not one transaction)."""
    conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(LOCK_TIMEOUT * 1000)}",))
    conn.commit()


def _configure_reader(conn: Connection) -> None:
    # Called by the pool on each new connection, in autocommit: the SET lasts the session.
    _read_json_as_text(conn)
    conn.execute("SET default_transaction_read_only = on")


def _read_json_as_text(conn: Connection) -> None:
    conn.adapters.register_loader("json", TextLoader)
