"""A real PostgreSQL server for tests, in a temporary directory of its own.

:class:`PostgresServer` runs Debian's ``initdb`` and ``pg_ctl`` (found on PATH or under
``/usr/lib/postgresql/*/bin``) on a free TCP port of 127.0.0.1, with no unix socket, and
password authentication (``scram-sha-256``) for every connection: a store that forgot its
password cannot connect. initdb refuses to run as root, so under root the server runs as
the ``postgres`` user (``runuser``) and its directory belongs to that user; the directory
is made with ``tempfile`` (not pytest's ``tmp_path``, whose parents only root may enter).

``create_role`` and ``create_database`` are administration over the superuser's own
connection; a test's store connects as the role ``rollbackd``, with :attr:`password` (also
in :attr:`password_file`, as a daemon's ``[store] password_file`` names it).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from support.prometheus import free_port

SUPERUSER = "postgres"
ROLE = "rollbackd"
"""The role a store connects as: it owns the test databases, and is not a superuser."""
SERVICE_USER = "postgres"
"""The operating-system user the server runs as when the tests run as root."""
BINARY_GLOB = "/usr/lib/postgresql/*/bin"

_LOG_TAIL_LINES = 40
_RUNNING: weakref.WeakSet[PostgresServer] = weakref.WeakSet()


class PostgresError(RuntimeError):
    """PostgreSQL is missing, did not start, or refused an administrative command."""


def find_binary(name: str) -> str | None:
    """``name`` on PATH, else in the newest ``/usr/lib/postgresql/<major>/bin``: Debian
    puts the server's programs there, and on PATH only ``psql`` and friends."""
    found = shutil.which(name)
    if found:
        return found
    directories = sorted(glob.glob(BINARY_GLOB), key=_major, reverse=True)
    for directory in directories:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _major(directory: str) -> int:
    name = Path(directory).parent.name
    return int(name) if name.isdigit() else 0


def _required_binary(name: str) -> str:
    found = find_binary(name)
    if found is None:
        raise PostgresError(
            f"PostgreSQL's {name!r} is neither on PATH nor in {BINARY_GLOB} "
            "(Debian package: postgresql; bash scripts/setup.sh installs it)"
        )
    return found


@dataclass(frozen=True)
class Database:
    """One database on the test server, owned by :data:`ROLE`."""

    name: str
    url: str
    """A libpq URI without a password, as ``[store] url`` holds it."""
    password: str = field(repr=False)
    password_file: Path


class PostgresServer:
    """``postgres`` started by ``pg_ctl`` in its own temporary directory, on its own port.

    Use it as a context manager (started inside, stopped and removed after), or call
    :meth:`start`, :meth:`stop` and :meth:`close`. :meth:`stop` keeps the data, so a
    :meth:`start` afterwards is a restart on the same port.
    """

    def __init__(self, *, port: int | None = None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="rollbackd-postgres-"))
        self.data_dir = self.workdir / "data"
        self.log_file = self.workdir / "postgres.log"
        self.port = port if port is not None else free_port()
        self.password = secrets.token_urlsafe(18)
        """The password of :data:`ROLE`."""
        self.password_file = self.workdir / "rollbackd.password"
        self._superuser_password = secrets.token_urlsafe(18)
        self._as_service_user = os.geteuid() == 0
        self._initialised = False
        self._started = False
        self._role_made = False
        self._databases = 0
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._started

    def start(self, timeout: float = 60.0) -> None:
        """initdb on the first start, then ``pg_ctl start -w``: it returns once the server
        accepts connections, or fails with the log's tail."""
        if self._started:
            raise PostgresError("PostgreSQL is already running")
        if not self._initialised:
            self._initdb()
        self._run(
            [
                _required_binary("pg_ctl"),
                "start",
                "-w",
                "-t",
                str(int(timeout)),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''",
            ],
            what="pg_ctl start",
        )
        self._started = True
        _RUNNING.add(self)
        if not self._role_made:
            self._create_role()

    def stop(self) -> None:
        """``pg_ctl stop -m fast -w``: connections are ended, the data is kept."""
        if not self._started:
            return
        self._run(
            [_required_binary("pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.data_dir)],
            what="pg_ctl stop",
        )
        self._started = False
        _RUNNING.discard(self)

    def close(self) -> None:
        """Stop, and remove the temporary directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        if not self.log_file.exists():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    # --- administration ----------------------------------------------------------------

    def url(self, database: str, *, user: str = ROLE) -> str:
        """A libpq URI for ``database`` on this server, without a password."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def admin(self, database: str = "postgres") -> psycopg.Connection[TupleRow]:
        """A superuser connection in autocommit (CREATE DATABASE runs outside a
        transaction); close it after use."""
        return psycopg.connect(
            self.url(database, user=SUPERUSER),
            password=self._superuser_password,
            autocommit=True,
            connect_timeout=10,
        )

    def create_database(self, name: str | None = None) -> Database:
        """A new, empty database owned by :data:`ROLE`; ``name`` defaults to a fresh one."""
        if name is None:
            self._databases += 1
            name = f"test_{self._databases}_{secrets.token_hex(3)}"
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(ROLE)
                )
            )
        return Database(name, self.url(name), self.password, self.password_file)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any connection still open to it."""
        with self.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    # --- internals ---------------------------------------------------------------------

    def _initdb(self) -> None:
        superuser_password = self.workdir / "superuser.password"
        superuser_password.write_text(self._superuser_password + "\n")
        if self._as_service_user:
            shutil.chown(self.workdir, SERVICE_USER, SERVICE_USER)
            shutil.chown(superuser_password, SERVICE_USER, SERVICE_USER)
        try:
            self._run(
                [
                    _required_binary("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    "--pwfile",
                    str(superuser_password),
                    "--auth",
                    "scram-sha-256",
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                    "--no-sync",  # a test server's data need not survive a power cut
                ],
                what="initdb",
            )
        finally:
            superuser_password.unlink(missing_ok=True)
        self._initialised = True

    def _create_role(self) -> None:
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(ROLE), sql.Literal(self.password)
                )
            )
        self._role_made = True

    def _run(self, command: list[str], *, what: str) -> None:
        if self._as_service_user:
            command = ["runuser", "-u", SERVICE_USER, "--", *command]
        result = subprocess.run(
            command,
            cwd=self.workdir,  # the service user may not enter the caller's directory
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise PostgresError(
                f"{what} failed with status {result.returncode}:\n{result.stdout}"
                f"{result.stderr}\nserver log tail:\n{self.log_tail()}"
            )


@atexit.register
def _stop_leftovers() -> None:
    """A server left running by an interrupted run would keep its port and directory."""
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.close()
