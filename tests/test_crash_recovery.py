"""The daemon killed with SIGKILL in each state of a rollback (waiting for approval, its
executor running, verifying): after a restart no executor runs twice, the record is
complete, and approvals still pending survive (or expire if their time ran out while the
daemon was down). Run as a user runs it: `rollbackd run` processes."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.configs import checkout_rules, write_config
from support.daemon_process import (
    TOKEN,
    TOKEN_ENV,
    DaemonProcess,
    alert_service,
    executions,
    run_cli,
    set_mode,
)
from support.fake_service import FakeService
from support.prometheus import PrometheusServer, ScrapeTarget, poll

pytestmark = [pytest.mark.prometheus, pytest.mark.faults]


class Daemon(DaemonProcess):
    """``rollbackd run`` as a process (its API listening), killed without warning."""

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def runs() -> Iterator[list[int]]:
    """Pids of executors left running by a killed daemon, killed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def scenario(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service: FakeService,
    *flags: str,
    **verify: str,
) -> tuple[Daemon, Path]:
    """Start the daemon on a healthy 1.0.0, let it bake, release a bad 2.0.0, and wait until
    the rollback's executor has started."""
    prometheus = prometheus_factory(targets=[ScrapeTarget(fake_service.address)])
    prometheus.wait_for('app_build_info{service="checkout", version="1.0.0"}')
    log = tmp_path / "deploys.jsonl"
    config = write_config(
        tmp_path,
        prometheus.url,
        {"checkout": checkout_rules(f"{fake_service.url}/control", log, *flags, **verify)},
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
    # The version never comes back: recovery gives up after version_timeout.
    daemon, log = scenario(
        tmp_path, prometheus_factory, fake_service, "--hang", version_timeout="3s"
    )
    try:
        [executed] = executions(log)
        runs.append(int(executed["pid"]))
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
        runs.append(int(executed["pid"]))
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


async def test_sigkill_while_verifying_completes_the_verification_never_reruns(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service: FakeService,
) -> None:
    # A verify window long enough to find the rollback verifying and kill the daemon there.
    daemon, log = scenario(tmp_path, prometheus_factory, fake_service, verify_window="3s")
    try:
        # Verifying: its state and its step, both written, the step not finished.
        [(rollback_id,)] = daemon.await_rows(
            "SELECT r.id FROM rollbacks r JOIN rollback_steps s ON s.rollback_id = r.id "
            "WHERE r.state = 'verifying' AND s.kind = 'verify' AND s.finished_at IS NULL"
        )
        daemon.kill()
        assert fake_service.version == "1.0.0"  # the executor switched it, then exited
        assert daemon.rows("SELECT state FROM rollbacks") == [("verifying",)]
        before = daemon.rows(
            "SELECT kind, finished_at IS NOT NULL, ok FROM rollback_steps WHERE rollback_id = ? "
            "ORDER BY id",
            rollback_id,
        )
        assert before == [("rollback", 1, 1), ("verify", 0, None)]

        daemon.start()
        [(outcome, finished)] = daemon.await_rows(
            "SELECT outcome, finished_at FROM rollbacks WHERE id = ? AND state = 'succeeded'",
            rollback_id,
        )
        assert len(executions(log)) == 1
        assert finished is not None
        assert outcome == "after a restart: version reads 1.0.0; checks held for 3s"
        # One executor step; the verification the kill cut short stays on record as
        # interrupted, and the one after the restart proves the rollback took effect.
        steps = daemon.rows(
            "SELECT kind, finished_at IS NOT NULL, ok, summary FROM rollback_steps "
            "WHERE rollback_id = ? ORDER BY id",
            rollback_id,
        )
        assert [s[:3] for s in steps] == [("rollback", 1, 1), ("verify", 1, 0), ("verify", 1, 1)]
        assert steps[1][3] == "interrupted: the daemon stopped while this ran"
        assert steps[2][3] == "version reads 1.0.0; checks held for 3s"
        assert events(daemon, rollback_id) == ["rollback.started", "rollback.succeeded"]
        assert daemon.rows("SELECT count(*) FROM rollbacks") == [(1,)]
        assert daemon.rows("SELECT frozen FROM service_state WHERE frozen = 1") == []
    finally:
        daemon.stop()


# -- waiting for approval: a service judged by Alertmanager alerts, in approve mode ----------

AS_ALICE = {"USER": "alice", TOKEN_ENV: TOKEN}


def events(daemon: DaemonProcess, rollback_id: int) -> list[str]:
    found = daemon.rows("SELECT type FROM events WHERE rollback_id = ? ORDER BY id", rollback_id)
    return [kind for (kind,) in found]


def approval_daemon(directory: Path, log: Path, *, approval_timeout: str) -> Daemon:
    """A daemon in approve mode whose service ``web`` is rolled back on alert WebDown by an
    executor that records each run in ``log``."""
    config = write_config(
        directory,
        "http://127.0.0.1:9",
        {"web": alert_service("web", log, alertname="WebDown", target=False)},
    )
    set_mode(config, "approve")
    text = config.read_text()
    config.write_text(
        text.replace("[daemon]\n", f'[daemon]\napproval_timeout = "{approval_timeout}"\n', 1)
    )
    return Daemon(config)


def deliver(daemon: DaemonProcess, fingerprint: str = "00000000000000aa") -> dict[str, Any]:
    """Alertmanager delivers a firing WebDown; the webhook's answer for it."""
    payload = {
        "version": "4",
        "receiver": "rollbackd",
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "WebDown"},
                "annotations": {"summary": "web is down"},
                "startsAt": "2030-01-01T00:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": fingerprint,
            }
        ],
        "groupKey": "{}",
    }
    with daemon.http() as http:
        response = http.post("/api/v1/alertmanager", json=payload)
    assert response.status_code == 200, response.text
    [alert] = response.json()["alerts"]
    return dict(alert)


def cli(daemon: DaemonProcess, *args: str) -> Any:
    """``rollbackd ARGS -c CONFIG`` as alice, who can read the token."""
    return run_cli(*args, "-c", str(daemon.config), env=AS_ALICE)


async def test_sigkill_while_waiting_for_approval_keeps_it_pending(tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"
    daemon = approval_daemon(tmp_path, log, approval_timeout="30m")
    try:
        daemon.start()
        alert = deliver(daemon)
        assert alert["outcome"].startswith("pending_approval")
        rollback_id = alert["rollback_id"]
        daemon.kill()
        [(state, expires_at)] = daemon.rows("SELECT state, expires_at FROM rollbacks")
        assert state == "pending" and expires_at is not None

        daemon.start()
        # Still waiting for a person: in the store, the API and the CLI; nothing ran.
        with daemon.http() as http:
            pending = http.get("/api/v1/rollbacks", params={"state": "pending"}).json()
        assert [r["id"] for r in pending["rollbacks"]] == [rollback_id]
        assert pending["rollbacks"][0]["steps"] == []
        status = cli(daemon, "status")
        assert status.returncode == 0, status.stderr
        expected = f"rollback {rollback_id} waits for approval: rollbackd approve {rollback_id}"
        assert expected in status.stdout
        # Alertmanager re-sends the firing alert after the restart: recorded once, handled
        # once; another alert of the same release joins the rollback already waiting.
        again = deliver(daemon)
        assert (again["new"], again["deliveries"], again["rollback_id"]) == (False, 2, rollback_id)
        other = deliver(daemon, fingerprint="00000000000000bb")
        assert other["outcome"].startswith("joined") and other["rollback_id"] == rollback_id
        assert daemon.rows("SELECT state FROM rollbacks") == [("pending",)]
        assert executions(log) == []

        approved = cli(daemon, "approve", str(rollback_id))
        assert approved.returncode == 0, approved.stderr
        assert approved.stdout.startswith(f"rollback {rollback_id} of web approved by alice")
        [(outcome, decided_by, finished)] = daemon.await_rows(
            "SELECT outcome, decided_by, finished_at FROM rollbacks "
            "WHERE id = ? AND state = 'succeeded'",
            rollback_id,
        )
        assert len(executions(log)) == 1
        assert decided_by == "alice" and finished is not None
        assert outcome == "checks held for 0.1s"
        steps = daemon.rows(
            "SELECT kind, finished_at IS NOT NULL, ok FROM rollback_steps WHERE rollback_id = ? "
            "ORDER BY id",
            rollback_id,
        )
        assert steps == [("rollback", 1, 1), ("verify", 1, 1)]
        assert events(daemon, rollback_id) == [
            "rollback.pending",
            "rollback.started",
            "rollback.succeeded",
        ]
        triggers = daemon.rows(
            "SELECT source FROM rollback_triggers WHERE rollback_id = ?", rollback_id
        )
        assert triggers == [("alert",)]  # the second alert, joined
        assert daemon.rows("SELECT count(*) FROM rollbacks") == [(1,)]
    finally:
        daemon.stop()


async def test_an_approval_that_expires_while_the_daemon_is_down_never_runs(
    tmp_path: Path,
) -> None:
    log = tmp_path / "runs.jsonl"
    daemon = approval_daemon(tmp_path, log, approval_timeout="3s")
    try:
        daemon.start()
        alert = deliver(daemon)
        assert alert["outcome"].startswith("pending_approval")
        rollback_id = alert["rollback_id"]
        daemon.kill()
        [(state, expires_at)] = daemon.rows("SELECT state, expires_at FROM rollbacks")
        assert state == "pending"  # killed before its approval timed out
        # Down until its approval has timed out.
        poll(lambda: time.time() > expires_at, timeout=10, what="the approval to time out")

        daemon.start()
        [(outcome, finished, decided_by)] = daemon.await_rows(
            "SELECT outcome, finished_at, decided_by FROM rollbacks "
            "WHERE id = ? AND state = 'expired'",
            rollback_id,
        )
        assert outcome == "no decision before the approval timeout"
        assert finished is not None and decided_by is None
        assert events(daemon, rollback_id) == ["rollback.pending", "rollback.expired"]
        # Too late to approve it: nothing runs.
        approved = cli(daemon, "approve", str(rollback_id))
        assert approved.returncode == 1
        assert approved.stderr.strip() == (
            f"rollbackd approve: rollback {rollback_id} is expired, not pending"
        )
        assert daemon.rows("SELECT id FROM rollback_steps") == []
        assert executions(log) == []
    finally:
        daemon.stop()
