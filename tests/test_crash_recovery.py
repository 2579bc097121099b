"""A daemon killed with SIGKILL while an executor runs: after restart the executor is not
run again, and the record is complete. Run as a user runs it: `rollbackd run` processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.configs import write_config
from support.fake_service import FakeService
from support.prometheus import PrometheusServer, ScrapeTarget, poll

pytestmark = pytest.mark.prometheus

DEPLOY = str(Path(__file__).parent / "support" / "deploy.py")


def rules(control: str, log: Path, *flags: str) -> str:
    argv = [sys.executable, DEPLOY, control, "{to_version}", "--log", str(log), *flags]
    return f"""
[service]
name = "checkout"
version_query = 'max by (version) (app_build_info{{service="checkout"}})'
version_label = "version"
bake_time = "2s"

[[rollback]]
type = "command"
argv = {json.dumps(argv)}
timeout = "10m"

[verify]
window = "2s"
version_timeout = "10s"

[[check]]
name = "errors"
type = "error_rate"
selector = 'service="checkout"'
errors = 'code=~"5.."'
above = 0.1
window = "10s"
breaches = 2
interval = "1s"
"""


class Daemon:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.db = config.parent / "state" / "state.db"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.config.parent / f"daemon-{self.starts}.log").open("wb")
        env = {**os.environ, "ROLLBACKD_TEST_TOKEN": "t"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rollbackd", "run", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def rows(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        if not self.db.exists():
            return []
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as conn:
            try:
                return list(conn.execute(sql, params))
            except sqlite3.OperationalError:
                return []  # not migrated yet

    def await_rows(
        self, sql: str, *params: object, timeout: float = 40.0
    ) -> list[tuple[object, ...]]:
        found: list[tuple[object, ...]] = []

        def ready() -> bool:
            nonlocal found
            assert self.process is not None and self.process.poll() is None, "daemon died"
            found = self.rows(sql, *params)
            return bool(found)

        poll(ready, timeout=timeout, interval=0.1)
        return found


@pytest.fixture
def runs() -> Iterator[list[int]]:
    """Pids of executors left running by a killed daemon, killed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def executions(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def scenario(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service: FakeService,
    *flags: str,
) -> tuple[Daemon, Path]:
    """Start the daemon on a healthy 1.0.0, let it bake, release a bad 2.0.0, and wait until
    the rollback's executor has started."""
    prometheus = prometheus_factory(targets=[ScrapeTarget(fake_service.address)])
    prometheus.wait_for('app_build_info{service="checkout", version="1.0.0"}')
    log = tmp_path / "deploys.jsonl"
    config = write_config(
        tmp_path, prometheus.url, {"checkout": rules(f"{fake_service.url}/control", log, *flags)}
    )
    daemon = Daemon(config)
    daemon.start()
    daemon.await_rows("SELECT version FROM versions WHERE baked_at IS NOT NULL")
    fake_service.update(version="2.0.0", error_ratio=0.5)
    daemon.await_rows("SELECT id FROM rollback_steps WHERE kind = 'rollback'")
    poll(lambda: len(executions(log)) == 1, timeout=20)
    return daemon, log


async def test_sigkill_while_the_executor_runs_never_runs_it_again(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service: FakeService,
    runs: list[int],
) -> None:
    daemon, log = scenario(tmp_path, prometheus_factory, fake_service, "--hang")
    try:
        [executed] = executions(log)
        runs.append(int(executed["pid"]))  # type: ignore[arg-type]
        daemon.kill()
        [(state,)] = daemon.rows("SELECT state FROM rollbacks")
        assert state == "running"

        daemon.start()
        [(rollback_id, outcome)] = daemon.await_rows(
            "SELECT id, outcome FROM rollbacks WHERE state = 'interrupted'"
        )
        assert "version reads '2.0.0', not '1.0.0'" in str(outcome)
        assert "not re-run, a person must decide" in str(outcome)
        # The check fires again on the still-bad release: recorded, never executed.
        daemon.await_rows("SELECT id FROM rollback_triggers WHERE rollback_id = ?", rollback_id)
        assert len(executions(log)) == 1
        [executor, verify] = daemon.rows(
            "SELECT kind, finished_at, ok, summary FROM rollback_steps WHERE rollback_id = ? "
            "ORDER BY id",
            rollback_id,
        )
        assert executor[0] == "rollback" and executor[1] is not None and executor[2] == 0
        assert executor[3] == "interrupted: the daemon stopped while this ran"
        assert verify[0] == "verify" and verify[2] == 0
        assert str(verify[3]).startswith("version reads '2.0.0', not '1.0.0'")
        kinds = [
            k
            for (k,) in daemon.rows(
                "SELECT type FROM events WHERE rollback_id = ? ORDER BY id", rollback_id
            )
        ]
        assert kinds == ["rollback.started", "rollback.failed"]
        [(frozen,)] = daemon.rows("SELECT frozen FROM service_state")
        assert frozen == 1
    finally:
        daemon.stop()


async def test_sigkill_after_the_switch_verifies_instead_of_rerunning(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service: FakeService,
    runs: list[int],
) -> None:
    daemon, log = scenario(tmp_path, prometheus_factory, fake_service, "--hang-after")
    try:
        [executed] = executions(log)
        runs.append(int(executed["pid"]))  # type: ignore[arg-type]
        poll(lambda: fake_service.version == "1.0.0", timeout=20)
        daemon.kill()
        daemon.start()
        [(rollback_id,)] = daemon.await_rows("SELECT id FROM rollbacks WHERE state = 'succeeded'")
        assert len(executions(log)) == 1
        steps = daemon.rows(
            "SELECT kind, ok FROM rollback_steps WHERE rollback_id = ? ORDER BY id", rollback_id
        )
        # The executor's step ends as interrupted (it never reported); verification proves
        # the rollback took effect.
        assert steps == [("rollback", 0), ("verify", 1)]
    finally:
        daemon.stop()
