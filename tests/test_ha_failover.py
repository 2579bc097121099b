"""Failover keeps the promises of one daemon: two real ``rollbackd run`` daemons share one
real PostgreSQL (``lease_time = "3s"``), and the one holding the service is SIGKILLed at the
worst moment.

- While its executor runs: the executor (its own process group) survives the daemon, as it
  would on a real machine, and finishes the switch; the other daemon takes the service over
  and verifies the rollback — it never starts an executor itself.
- While an approval waits: the other daemon takes the service over with the rollback still
  pending; approved through it, the executor runs once, under its epoch.

State is read from the database; who holds what from the ``leases`` table (live by the
database's clock) and each daemon's ``/metrics``. Waiting is bounded polling, never a sleep.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rollbackd.runtime.leases import assign
from support.configs import write_config
from support.daemon_process import TOKEN, TOKEN_ENV, alert_service, executions, run_cli, set_mode
from support.fake_service import FakeService
from support.ha import (
    GATED_DEPLOY,
    Daemon,
    await_holder,
    await_rows,
    checkout_rules,
    events,
    metric,
    rows,
    steps,
    store_section,
)
from support.postgres import Database
from support.prometheus import PrometheusFactory, ScrapeTarget, poll

pytestmark = [pytest.mark.faults]

MEMBERS = ("daemon-a", "daemon-b")
AS_ALICE = {"USER": "alice", TOKEN_ENV: TOKEN}


@pytest.fixture
def runs() -> Iterator[list[int]]:
    """Pids of executors a killed daemon left running: their groups are killed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


# -- who holds what ------------------------------------------------------------------


def holder_and_standby(service: str, daemons: dict[str, Daemon]) -> tuple[Daemon, Daemon]:
    """The daemon the fair split gives ``service`` to while both live, and the other: the
    one that ends up holding it (the first to start may take it, then hand it back)."""
    [owner] = [m for m, held in assign([service], list(daemons)).items() if held]
    [other] = [m for m in daemons if m != owner]
    return daemons[owner], daemons[other]


# -- 1. the holder killed while its executor runs ----------------------------------------


@pytest.mark.prometheus
def test_holder_killed_while_its_executor_runs_the_rollback_runs_once_and_is_verified(
    tmp_path: Path,
    postgres_database: Database,
    prometheus_factory: PrometheusFactory,
    fake_service: FakeService,
    runs: list[int],
) -> None:
    prometheus = prometheus_factory(targets=[ScrapeTarget(fake_service.address)])
    prometheus.wait_for('app_build_info{service="checkout", version="1.0.0"}')
    script, log, gate = tmp_path / "gated_deploy.py", tmp_path / "runs.jsonl", tmp_path / "gate"
    script.write_text(GATED_DEPLOY)
    rules = {"checkout": checkout_rules(f"{fake_service.url}/control", script, log, gate)}
    daemons: dict[str, Daemon] = {}
    for member in MEMBERS:
        directory = tmp_path / member
        directory.mkdir()
        extra = store_section(postgres_database, member)
        daemons[member] = Daemon(
            write_config(directory, prometheus.url, rules, extra=extra), member
        )
    holder, standby = holder_and_standby("checkout", daemons)
    try:
        for daemon in daemons.values():
            daemon.start()
        epoch = await_holder(postgres_database, "checkout", holder, [standby])
        await_rows(
            postgres_database,
            [holder, standby],
            "SELECT version FROM versions WHERE service = 'checkout' AND baked_at IS NOT NULL",
        )

        fake_service.update(version="2.0.0", error_ratio=0.5)
        poll(lambda: len(executions(log)) == 1, timeout=30, what="the holder's executor to start")
        [started] = executions(log)
        runs.append(int(started["pid"]))
        assert started["ppid"] == holder.pid, "the holder started the executor"
        assert started["version"] == "1.0.0"
        assert started["env"]["ROLLBACKD_FENCING_TOKEN"] == str(epoch)
        [(rollback_id, state)] = rows(postgres_database, "SELECT id, state FROM rollbacks")
        assert state == "running"

        holder.kill()
        os.kill(started["pid"], 0)  # the executor outlived its daemon
        gate.touch()  # it switches the service back to 1.0.0 and exits

        later_epoch = await_holder(postgres_database, "checkout", standby, [])
        assert later_epoch > epoch
        [(outcome,)] = await_rows(
            postgres_database,
            [standby],
            "SELECT outcome FROM rollbacks WHERE id = %s AND state = 'succeeded'",
            rollback_id,
        )
        assert fake_service.version == "1.0.0"
        assert outcome == "after a restart: version reads 1.0.0; checks held for 2s"
        with standby.http() as http:
            answer = http.get(f"/api/v1/rollbacks/{rollback_id}")
        assert answer.status_code == 200, answer.text
        assert answer.json()["state"] == "succeeded"
        # The executor's step, cut short by the kill, is closed as interrupted by the new
        # holder; its verification proves the rollback took effect.
        assert [s[:3] for s in steps(postgres_database, rollback_id)] == [
            ("rollback", True, False),
            ("verify", True, True),
        ]
        assert events(postgres_database, rollback_id) == ["rollback.started", "rollback.succeeded"]

        # The new holder goes on judging the service (its own evaluations counted from the
        # takeover) and starts nothing: one run in all, by the daemon killed.
        evaluated = metric(standby, "rollbackd_check_evaluations_total")
        poll(
            lambda: metric(standby, "rollbackd_check_evaluations_total") >= evaluated + 3,
            timeout=30,
            what="the new holder to evaluate checkout 3 more times",
        )
        standby.assert_alive()
        assert [run["ppid"] for run in executions(log)] == [holder.pid]
        assert rows(postgres_database, "SELECT count(*) FROM rollbacks") == [(1,)]
        assert rows(postgres_database, "SELECT state FROM rollbacks") == [("succeeded",)]
    finally:
        for daemon in daemons.values():
            daemon.stop()


# -- 2. the holder killed while an approval waits -----------------------------------------


def approval_config(directory: Path, database: Database, member: str, log: Path) -> Path:
    """Approve mode; ``web`` is rolled back on the alert WebDown by an executor that logs
    each run in ``log`` (support/record_run.py)."""
    directory.mkdir()
    rules = {"web": alert_service("web", log, alertname="WebDown", target=False)}
    config = write_config(
        directory, "http://127.0.0.1:9", rules, extra=store_section(database, member)
    )
    set_mode(config, "approve")
    text = config.read_text()
    config.write_text(text.replace("[daemon]\n", '[daemon]\napproval_timeout = "30m"\n', 1))
    return config


def deliver(daemon: Daemon) -> dict[str, Any]:
    """Alertmanager delivers a firing WebDown to ``daemon``; the webhook's answer for it."""
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
                "fingerprint": "00000000000000aa",
            }
        ],
        "groupKey": "{}",
    }
    with daemon.http() as http:
        response = http.post("/api/v1/alertmanager", json=payload)
    assert response.status_code == 200, response.text
    [alert] = response.json()["alerts"]
    return dict(alert)


def test_holder_killed_while_an_approval_waits_the_other_daemon_keeps_it_and_runs_it_once(
    tmp_path: Path, postgres_database: Database
) -> None:
    log = tmp_path / "runs.jsonl"
    daemons = {
        member: Daemon(approval_config(tmp_path / member, postgres_database, member, log), member)
        for member in MEMBERS
    }
    holder, standby = holder_and_standby("web", daemons)
    try:
        for daemon in daemons.values():
            daemon.start()
        epoch = await_holder(postgres_database, "web", holder, [standby])
        alert = deliver(holder)
        assert alert["outcome"].startswith("pending_approval"), alert
        rollback_id = alert["rollback_id"]
        assert rows(postgres_database, "SELECT id, state FROM rollbacks") == [
            (rollback_id, "pending")
        ]

        holder.kill()
        later_epoch = await_holder(postgres_database, "web", standby, [])
        assert later_epoch > epoch

        # Still waiting for a person, as the new holder tells it; nothing ran.
        with standby.http() as http:
            pending = http.get("/api/v1/rollbacks", params={"state": "pending"}).json()
        assert [r["id"] for r in pending["rollbacks"]] == [rollback_id]
        assert pending["rollbacks"][0]["steps"] == []
        assert executions(log) == []

        approved = run_cli("approve", str(rollback_id), "-c", str(standby.config), env=AS_ALICE)
        assert approved.returncode == 0, approved.stderr
        assert approved.stdout.startswith(f"rollback {rollback_id} of web approved by alice")
        [(outcome, decided_by)] = await_rows(
            postgres_database,
            [standby],
            "SELECT outcome, decided_by FROM rollbacks WHERE id = %s AND state = 'succeeded'",
            rollback_id,
        )
        assert (outcome, decided_by) == ("checks held for 0.1s", "alice")
        [run] = executions(log)
        assert run["env"]["ROLLBACKD_FENCING_TOKEN"] == str(later_epoch), "run by the new holder"
        assert [s[:3] for s in steps(postgres_database, rollback_id)] == [
            ("rollback", True, True),
            ("verify", True, True),
        ]
        assert events(postgres_database, rollback_id) == [
            "rollback.pending",
            "rollback.started",
            "rollback.succeeded",
        ]
        assert rows(postgres_database, "SELECT count(*) FROM rollbacks") == [(1,)]
    finally:
        for daemon in daemons.values():
            daemon.stop()
