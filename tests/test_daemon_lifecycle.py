"""`rollbackd run` as systemd runs it: sd_notify READY/WATCHDOG/RELOADING/STOPPING, SIGHUP with
a broken rule file keeps the old rules, a fixed one brings the new check, and SIGTERM stops
a running rollback after stop_grace and marks it interrupted."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.configs import write_config
from support.prometheus import PrometheusServer, poll

pytestmark = pytest.mark.prometheus

RECORD = str(Path(__file__).parent / "support" / "record_run.py")


def watched(service: str, version: str, checks: str, header: str = "") -> str:
    query = f"label_replace(vector(1), 'version', '{version}', '', '')"
    return f'[service]\nname = "{service}"\nversion_query = "{query}"\n{header}\n{checks}'


NOTIFY_ONLY = (
    '[[check]]\nname = "{name}"\ntype = "query"\nquery = "vector({value})"\nabove = 1\n'
    'breaches = 1\ninterval = "1s"\naction = "notify"\n'
)


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(30)
        self.seen: list[dict[str, str]] = []

    def next_with(self, key: str, value: str | None = None) -> dict[str, str]:
        """Await the next message holding ``key`` (=``value``)."""
        while True:
            raw = self.sock.recv(4096).decode()
            fields = dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)
            self.seen.append(fields)
            if key in fields and (value is None or fields[key] == value):
                return fields

    def close(self) -> None:
        self.sock.close()


class Daemon:
    def __init__(self, config: Path, notify: Path) -> None:
        self.db = config.parent / "state" / "state.db"
        self.log = config.parent / "daemon.log"
        env = {
            **os.environ,
            "ROLLBACKD_TEST_TOKEN": "t",
            "NOTIFY_SOCKET": str(notify),
            "WATCHDOG_USEC": "400000",
        }
        env.pop("WATCHDOG_PID", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rollbackd", "run", "-c", str(config)],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )

    def rows(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as conn:
                return list(conn.execute(sql, params))
        except sqlite3.OperationalError:
            return []

    def await_rows(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        found: list[tuple[object, ...]] = []

        def ready() -> bool:
            nonlocal found
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            found = self.rows(sql, *params)
            return bool(found)

        poll(ready, timeout=30, interval=0.1)
        return found

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def notifications(tmp_path: Path) -> Iterator[Notifications]:
    notify = Notifications(tmp_path / "notify.sock")
    yield notify
    notify.close()


def breaches_of(daemon: Daemon, check: str) -> list[tuple[object, ...]]:
    return daemon.rows(
        "SELECT id FROM events WHERE type = 'check.breach' AND json_extract(data, '$.check') = ?",
        check,
    )


@pytest.mark.faults
def test_notify_reload_and_stop(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    notifications: Notifications,
) -> None:
    prometheus = prometheus_factory()
    config = write_config(
        tmp_path,
        prometheus.url,
        {"old": watched("old", "1.0.0", NOTIFY_ONLY.format(name="old-check", value=5))},
    )
    daemon = Daemon(config, notifications.path)
    try:
        ready = notifications.next_with("READY", "1")
        assert ready["STATUS"].startswith("1 services, 1 checks")
        notifications.next_with("WATCHDOG", "1")
        daemon.await_rows("SELECT id FROM events WHERE type = 'check.breach'")

        # A broken rule file: refused, the old rules keep running.
        new = tmp_path / "rules" / "new.toml"
        new.write_text('[service]\nname = "new"\n[[check]]\nname = broken\n')
        daemon.process.send_signal(signal.SIGHUP)
        reloading = notifications.next_with("RELOADING", "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        notifications.next_with("READY", "1")
        [(data,)] = daemon.await_rows("SELECT data FROM events WHERE type = 'config.reload_failed'")
        problems = json.loads(str(data))["problems"]
        assert any("rules/new.toml:4:8" in p for p in problems), problems
        [(seen_before,)] = daemon.await_rows("SELECT last_seen FROM versions WHERE service = 'old'")
        daemon.await_rows(
            "SELECT 1 FROM versions WHERE service = 'old' AND last_seen > ?", seen_before
        )

        # Fixed: the new service and its check run; the old check kept its state (it fired
        # once and is still firing, so no second breach event).
        new.write_text(watched("new", "2.0.0", NOTIFY_ONLY.format(name="new-check", value=7)))
        daemon.process.send_signal(signal.SIGHUP)
        notifications.next_with("RELOADING", "1")
        notifications.next_with("READY", "1")
        daemon.await_rows(
            "SELECT id FROM events WHERE type = 'check.breach' "
            "AND json_extract(data, '$.check') = 'new-check'"
        )
        assert len(breaches_of(daemon, "old-check")) == 1

        daemon.process.send_signal(signal.SIGTERM)
        notifications.next_with("STOPPING", "1")
        assert daemon.process.wait(timeout=30) == 0
    finally:
        daemon.close()


@pytest.mark.faults
def test_sigterm_stops_a_running_rollback_after_the_grace_and_leaves_it_to_the_next_start(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    notifications: Notifications,
) -> None:
    prometheus = prometheus_factory()
    runs = tmp_path / "runs.jsonl"
    argv = [sys.executable, RECORD, str(runs), "--hang"]
    rules = watched(
        "svc",
        "2.0.0",
        '[[check]]\nname = "bad"\ntype = "query"\nquery = "vector(5)"\nabove = 1\n'
        'breaches = 1\ninterval = "1s"\n',
        header=f'[[rollback]]\ntype = "command"\nargv = {json.dumps(argv)}\ntimeout = "10m"\n',
    )
    config = write_config(tmp_path, prometheus.url, {"svc": rules})
    config.write_text(config.read_text().replace("[daemon]\n", '[daemon]\nstop_grace = "1s"\n'))
    daemon = Daemon(config, notifications.path)
    try:
        notifications.next_with("READY", "1")
        poll(lambda: runs.exists() and runs.read_text().strip() != "", timeout=30)
        pid = int(json.loads(runs.read_text().splitlines()[0])["pid"])
        daemon.process.send_signal(signal.SIGTERM)
        notifications.next_with("STOPPING", "1")
        assert daemon.process.wait(timeout=30) == 0
        [(state, outcome)] = daemon.rows("SELECT state, outcome FROM rollbacks")
        # Still running on record: the next start verifies it as after a crash (it may
        # have switched the service before it was stopped), and never runs it again.
        assert state == "running"
        assert "did not finish within 1s" in str(outcome)
        assert "verified at the next start, never re-run" in str(outcome)
        [(summary,)] = daemon.rows("SELECT summary FROM rollback_steps WHERE kind = 'rollback'")
        assert str(summary).startswith("interrupted: the daemon was stopped")
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the executor's process group was killed
    finally:
        daemon.close()
