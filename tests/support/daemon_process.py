"""rollbackd for API tests: its parts in this process (``InProcessDaemon``, the app called
through httpx's ASGI transport), or ``rollbackd run`` as a real process listening on a real
port (``DaemonProcess``), and the command line run as a user runs it (``run_cli``).

Waiting is always bounded polling on something observable (a file, a row, an answer),
never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
from prometheus_client import CollectorRegistry

from rollbackd.api.app import create_app
from rollbackd.api.server import ADDRESS_FILE
from rollbackd.config.loader import load
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.control import Control
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.store.sqlite import Store
from support.configs import write_config
from support.prometheus import poll

RECORD = str(Path(__file__).parent / "record_run.py")
TOKEN = "operator-token-0123456789"
TOKEN_ENV = "ROLLBACKD_TEST_TOKEN"


def recorder(log: Path, *, target: bool = True, extra: Sequence[str] = ()) -> str:
    """A [[rollback]] command executor that appends one JSON line per run to ``log``.
    Without ``target`` its argv names no {to_version}, so a rollback needs no last known
    good version."""
    argv = [sys.executable, RECORD, str(log), *(["{to_version}"] if target else []), *extra]
    return f'[[rollback]]\ntype = "command"\nargv = {json.dumps(argv)}\ntimeout = "20s"\n'


def alert_service(
    name: str,
    log: Path,
    *,
    alertname: str,
    matchers: Sequence[str] = (),
    target: bool = True,
    executor_args: Sequence[str] = (),
    header: str = "",
    body: str = "",
) -> str:
    """A rule file for a service judged by Alertmanager alerts only. ``executor_args``
    go to record_run.py (``--fail``: the executor fails)."""
    return f"""
[service]
name = "{name}"
rollback_window = "1h"
{header}

{recorder(log, target=target, extra=executor_args)}

[verify]
window = "100ms"

[[alert]]
alertname = "{alertname}"
matchers = {json.dumps(list(matchers))}

{body}
"""


def _complete(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` to its end from sync code, whether or not this thread already runs an
    event loop (an async test's): on a thread, and a loop, of its own."""
    with ThreadPoolExecutor(max_workers=1) as thread:
        thread.submit(asyncio.run, work).result()


def executions(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def set_mode(config: Path, mode: str) -> None:
    """Set ``[daemon] mode``, replacing the one the file already sets, if any."""
    lines = [line for line in config.read_text().splitlines() if not line.startswith("mode = ")]
    text = "\n".join(lines) + "\n"
    config.write_text(text.replace("[daemon]\n", f'[daemon]\nmode = "{mode}"\n', 1))


class InProcessDaemon:
    """The daemon's parts and its API app in this process. Prometheus is never asked (the
    services have no checks); /readyz's probe of it reports it unreachable."""

    def __init__(
        self,
        directory: Path,
        rules: Mapping[str, str],
        *,
        mode: str = "auto",
        extra: str = "",
        token: str = TOKEN,
        max_body: int = 64 * 1024,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config = write_config(directory, "http://127.0.0.1:9", dict(rules), extra=extra)
        set_mode(config, mode)
        self.loaded = load(config)
        self.store = Store(directory / "state.db")
        self.engine = Engine(
            self.loaded, PrometheusClient(self.loaded.config.prometheus), self.store
        )
        self.pipeline = Pipeline(self.engine)
        self.registry = CollectorRegistry()
        self.token = token

        async def unreachable() -> bool:
            return False

        self.app = create_app(
            control=Control(self.pipeline),
            registry=self.registry,
            token=token,
            max_body=max_body,
            prometheus_ready=unreachable,
        )

    def client(self, token: str | None = TOKEN) -> httpx.AsyncClient:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://rollbackd.test",
            headers=headers,
        )

    def release(self, service: str, version: str, *, at: float, bake: bool = True) -> None:
        """A release as CI records it; with ``bake`` it bakes into the last known good.
        Callable from sync code and from async tests alike (the tracker is async)."""

        async def record() -> None:
            await self.engine.versions.record_release(service, version, at)
            if bake:
                await self.engine.versions.update_bake(service, at, True, timedelta(seconds=1))
                await self.engine.versions.update_bake(service, at + 5, True, timedelta(seconds=1))

        _complete(record())

    def close(self) -> None:
        self.store.close()


class DaemonProcess:
    """``rollbackd run -c CONFIG`` as a subprocess. The config listens on port 0; the real
    address is read from ``<state_dir>/api.address``, which the daemon writes once it
    listens (and which the CLI reads the same way)."""

    def __init__(
        self, config: Path, *, token: str = TOKEN, env: Mapping[str, str] | None = None
    ) -> None:
        self.config = config
        self.token = token
        self.state_dir = config.parent / "state"
        self.db = self.state_dir / "state.db"
        self.address_file = self.state_dir / ADDRESS_FILE
        self.env = {**os.environ, TOKEN_ENV: token, **dict(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = config.parent / "daemon.log"
        self.url = ""

    def start(self, timeout: float = 30.0) -> None:
        self.address_file.unlink(missing_ok=True)  # a killed daemon's would look current
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rollbackd", "run", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

        def listening() -> bool:
            self.assert_alive()
            return self.address_file.exists()

        poll(listening, timeout=timeout, what=f"rollbackd to listen (log: {self.log})")
        self.url = "http://" + self.address_file.read_text().strip()

        def healthy() -> bool:
            self.assert_alive()
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        poll(healthy, timeout=timeout, what="/healthz to answer 200")

    def assert_alive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        assert code is None, f"rollbackd exited with {code}:\n{self.log_tail()}"

    def log_tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def http(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token or self.token}"},
            timeout=10,
        )

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        if not self.db.exists():
            return []
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as conn:
            try:
                return list(conn.execute(sql, params))
            except sqlite3.OperationalError:
                return []  # not migrated yet

    def await_rows(
        self, sql: str, *params: object, timeout: float = 30.0, what: str = ""
    ) -> list[tuple[Any, ...]]:
        found: list[tuple[Any, ...]] = []

        def ready() -> bool:
            nonlocal found
            self.assert_alive()
            found = self.rows(sql, *params)
            return bool(found)

        poll(ready, timeout=timeout, interval=0.1, what=what or sql)
        return found


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``rollbackd ARGS`` as a user runs it, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "rollbackd", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **dict(env or {})},
        timeout=timeout,
        check=False,
    )
