"""The operator commands (SPEC §1) as a user runs them, each a real `rollbackd` process,
against a real `rollbackd run` listening on a real port: status, history, rollback,
approve, reject, pause, resume, release; and the errors people meet (daemon down, wrong
token, refused input)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.configs import write_config
from support.daemon_process import (
    TOKEN,
    TOKEN_ENV,
    DaemonProcess,
    alert_service,
    executions,
    run_cli,
    set_mode,
)
from support.prometheus import free_port

AS_ALICE = {"USER": "alice", TOKEN_ENV: TOKEN}


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "runs.jsonl"


@pytest.fixture
def config(tmp_path: Path, log: Path) -> Path:
    """Three services judged by alerts; only api's executor needs a target version. In
    approve mode, so that alerts leave rollbacks waiting for a person."""
    path = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        {
            "api": alert_service("api", log, alertname="ApiDown"),
            "web": alert_service("web", log, alertname="WebDown", target=False),
            "db": alert_service("db", log, alertname="DbDown", target=False),
            "cache": alert_service("cache", log, alertname="CacheDown", executor_args=["--fail"]),
        },
    )
    set_mode(path, "approve")
    return path


@pytest.fixture
def daemon(config: Path) -> Iterator[DaemonProcess]:
    with DaemonProcess(config) as running:
        yield running


def cli(config: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """``rollbackd ARGS -c CONFIG`` as alice, who can read the token."""
    return run_cli(*args, "-c", str(config), env=env or AS_ALICE)


def ok(result: Any) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}{result.stderr}"
    return str(result.stdout)


def failed(result: Any, code: int = 1) -> str:
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}"
    assert result.stdout == ""
    lines = str(result.stderr).strip().splitlines()
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    return lines[0]


def test_status_and_history_of_a_fresh_daemon(config: Path, daemon: DaemonProcess) -> None:
    out = ok(cli(config, "status"))
    assert f"rollbackd 0.1.0 at {daemon.url}: mode approve" in out
    assert "automatic rollbacks: on" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["api"][1:] == ["-", "-", "-", "on", "alerts", "only", "(1)"]
    assert "no rollback in flight" in out
    document = json.loads(ok(cli(config, "status", "--json")))
    assert [s["name"] for s in document["services"]] == ["api", "cache", "db", "web"]
    assert ok(cli(config, "history")).strip() == "no rollbacks"
    assert json.loads(ok(cli(config, "history", "--json"))) == {"rollbacks": []}


def test_release_then_a_manual_rollback_then_its_history(
    config: Path, daemon: DaemonProcess, log: Path
) -> None:
    first = ok(cli(config, "release", "api", "1.0.0", "--meta", "commit=abc123"))
    assert first.strip() == "api: release 1.0.0 recorded"
    assert ok(cli(config, "release", "api", "2.0.0")).strip() == (
        "api: release 2.0.0 recorded (was 1.0.0)"
    )
    assert "already the current version" in ok(cli(config, "release", "api", "2.0.0"))
    assert daemon.rows("SELECT meta FROM versions WHERE version = '1.0.0'") == [
        ('{"commit":"abc123"}',)
    ]

    started = ok(cli(config, "rollback", "api", "--to", "1.0.0", "--reason", "p99 doubled"))
    assert started.splitlines()[0] == "rollback 1 of api started: 2.0.0 -> 1.0.0"
    daemon.await_rows("SELECT id FROM rollbacks WHERE state = 'succeeded'")
    assert [run["argv"] for run in executions(log)] == [["1.0.0"]]

    table = ok(cli(config, "history")).splitlines()
    assert table[0].split() == [
        "ID", "CREATED", "SERVICE", "CHANGE", "STATE", "SOURCE", "REASON", "OUTCOME"
    ]  # fmt: skip
    assert table[1].split()[:8] == [
        "1", table[1].split()[1], "api", "2.0.0", "->", "1.0.0", "succeeded", "manual"
    ]  # fmt: skip
    assert "(alice)  p99 doubled" in table[1]
    [rollback] = json.loads(ok(cli(config, "history", "--json", "--service", "api")))["rollbacks"]
    assert rollback["trigger"]["requested_by"] == "alice"
    assert [s["kind"] for s in rollback["steps"]] == ["rollback", "verify"]
    assert json.loads(ok(cli(config, "history", "--json", "--service", "web"))) == {"rollbacks": []}


def test_a_refused_manual_rollback_says_why_and_exits_1(
    config: Path, daemon: DaemonProcess
) -> None:
    # No release has baked: there is no last known good to go back to.
    result = cli(config, "rollback", "api", "--reason", "bad")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        "rollbackd rollback: refused: no version to roll back to: "
        "no version has baked into a last known good yet"
    )
    assert "  target: no version to roll back to" in result.stderr


def test_approve_and_reject_rollbacks_waiting_for_a_person(
    config: Path, daemon: DaemonProcess, log: Path
) -> None:
    alerts = [
        {
            "status": "firing",
            "labels": {"alertname": name},
            "annotations": {},
            "startsAt": "2030-01-01T00:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "",
            "fingerprint": fingerprint,
        }
        for name, fingerprint in (("WebDown", "00000000000000aa"), ("DbDown", "00000000000000bb"))
    ]
    payload = {
        "version": "4",
        "receiver": "rollbackd",
        "status": "firing",
        "alerts": alerts,
        "groupKey": "{}",
    }
    with daemon.http() as http:
        answer = http.post("/api/v1/alertmanager", json=payload).json()
    web_id, db_id = (a["rollback_id"] for a in answer["alerts"])

    status = ok(cli(config, "status"))
    assert f"rollback {web_id} waits for approval: rollbackd approve {web_id}" in status
    assert f"rollback {db_id} waits for approval: rollbackd approve {db_id}" in status

    approved = ok(cli(config, "approve", str(web_id)))
    assert approved.startswith(f"rollback {web_id} of web approved by alice: running")
    daemon.await_rows("SELECT id FROM rollbacks WHERE id = ? AND state = 'succeeded'", web_id)
    assert len(executions(log)) == 1
    again = failed(cli(config, "approve", str(web_id)))
    assert again == f"rollbackd approve: rollback {web_id} is succeeded, not pending"

    rejected = ok(cli(config, "reject", str(db_id), "--reason", "a blip"))
    assert rejected.strip() == f"rollback {db_id} of db rejected by alice: it will not run"
    assert daemon.rows("SELECT state, outcome, decided_by FROM rollbacks WHERE id = ?", db_id) == [
        ("rejected", "rejected by alice: a blip", "alice")
    ]
    assert failed(cli(config, "approve", "999")) == "rollbackd approve: no rollback 999"
    assert len(executions(log)) == 1


def test_pause_and_resume(config: Path, daemon: DaemonProcess) -> None:
    assert ok(cli(config, "pause", "api")).strip() == (
        "automatic rollbacks of api paused; checks keep running and reporting"
    )
    status = ok(cli(config, "status"))
    assert any(line.split()[:1] == ["api"] and "paused" in line for line in status.splitlines())
    assert "every service" in ok(cli(config, "pause", "--all"))
    assert "automatic rollbacks: PAUSED for every service" in ok(cli(config, "status"))
    resumed = ok(cli(config, "resume", "api"))
    assert "still paused by 'pause --all'" in resumed
    ok(cli(config, "resume", "--all"))
    assert "automatic rollbacks: on" in ok(cli(config, "status"))
    assert daemon.rows("SELECT scope FROM pauses") == []
    who = daemon.rows("SELECT data FROM events WHERE type = 'service.paused'")
    assert all(json.loads(data)["by"] == "alice" for (data,) in who) and len(who) == 2
    # Neither a service nor --all: argparse's usage error.
    assert run_cli("pause", "-c", str(config), env=AS_ALICE).returncode == 2
    assert failed(cli(config, "pause", "nope")) == (
        "rollbackd pause: unknown service 'nope'; services: api, cache, db, web"
    )


def test_resume_thaws_a_service_a_failed_rollback_froze(
    config: Path, daemon: DaemonProcess
) -> None:
    # cache's executor fails: the rollback fails and the pipeline freezes the service.
    ok(cli(config, "rollback", "cache", "--to", "1.0.0", "--reason", "bad"))
    daemon.await_rows("SELECT frozen FROM service_state WHERE service = 'cache' AND frozen = 1")
    status = ok(cli(config, "status"))
    assert "cache is frozen: rollback 1 failed: every executor of the rollback chain" in status
    assert "after a look: rollbackd resume cache" in status
    assert "FROZEN" in next(line for line in status.splitlines() if line.startswith("cache"))
    resumed = ok(cli(config, "resume", "cache"))
    assert "cache was frozen: thawed" in resumed
    assert daemon.rows("SELECT frozen FROM service_state WHERE service = 'cache'") == [(0,)]


def test_invalid_input_gets_the_servers_message(config: Path, daemon: DaemonProcess) -> None:
    bad = failed(cli(config, "rollback", "api", "--to", "1.0/../x", "--reason", "x"))
    assert bad.startswith("rollbackd rollback: to_version: String should match pattern")
    assert failed(cli(config, "release", "nope", "1.0")) == (
        "rollbackd release: unknown service 'nope'; services: api, cache, db, web"
    )
    meta = failed(cli(config, "release", "api", "1.0", "--meta", "novalue"))
    assert meta == "rollbackd release: --meta 'novalue': expected key=value"


def test_an_unreachable_daemon_is_said_so(tmp_path: Path, log: Path) -> None:
    port = free_port()  # nothing listens there
    down = tmp_path / "down"
    down.mkdir()
    config = write_config(
        down, "http://127.0.0.1:9", {"api": alert_service("api", log, alertname="A")}
    )
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    for command in (
        ["status"],
        ["history"],
        ["rollback", "api", "--reason", "x"],
        ["approve", "1"],
        ["reject", "1"],
        ["pause", "api"],
        ["resume", "--all"],
        ["release", "api", "1.0"],
    ):
        line = failed(cli(config, *command))
        assert line == (
            f"rollbackd {command[0]}: cannot reach rollbackd at http://127.0.0.1:{port}: "
            "connection refused — is it running?"
        )


def test_a_daemon_on_port_0_that_is_not_running(config: Path) -> None:
    line = failed(cli(config, "status"))
    assert line.startswith("rollbackd status: [server].listen is '127.0.0.1:0'")
    assert line.endswith("cannot be read: is rollbackd running? Or give --url")


def test_a_wrong_or_missing_token(config: Path, daemon: DaemonProcess, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    line = failed(run_cli("status", "--url", daemon.url, "--token-file", str(wrong)))
    assert line == (
        f"rollbackd status: rollbackd at {daemon.url} refused the token: check "
        "[server].token_file (or --token-file)"
    )
    right = tmp_path / "token"
    right.write_text(TOKEN + "\n")
    ok(run_cli("status", "--url", daemon.url, "--token-file", str(right)))
    # The config names the token's variable; without it the command says where it looked.
    missing = failed(cli(config, "status", env={"USER": "alice", TOKEN_ENV: ""}))
    assert missing == (
        f"rollbackd status: API token: environment variable {TOKEN_ENV} is not set "
        f"(from {config}; or give --token-file)"
    )
    assert failed(run_cli("status", "--url", daemon.url, "--token-file", str(tmp_path / "x")))


def test_a_url_that_is_not_rollbackd(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        line = failed(run_cli("status", "--url", url, "--token-file", str(token)))
    finally:
        server.shutdown()
        server.server_close()
    assert line == (
        f"rollbackd status: {url} answered 404 without rollbackd's JSON: is that rollbackd?"
    )
