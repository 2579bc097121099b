"""The state directory fails under the daemon: full, or read-only. Nothing is acted on that
cannot be recorded. Real filesystems: a tiny tmpfs mounted for the test (needs root, as CI
runs; skipped elsewhere)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rollbackd.config.loader import load
from rollbackd.core.model import RollbackState
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.pipeline import Pipeline, Trigger
from rollbackd.runtime.runner import Runner
from rollbackd.store.sqlite import Store
from support.configs import write_config
from support.daemon_process import DaemonProcess, alert_service, executions
from support.hostile_http import Recorded, RecordingServer, Reply, success

pytestmark = pytest.mark.faults

RECORD = str(Path(__file__).parent / "support" / "record_run.py")


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "state"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def pipeline_on(state: Path, tmp_path: Path) -> tuple[Pipeline, Path]:
    runs = tmp_path / "runs.jsonl"
    argv = [sys.executable, RECORD, str(runs), "{to_version}"]
    rules = (
        '[service]\nname = "api"\n'
        f'[[rollback]]\ntype = "command"\nargv = {json.dumps(argv)}\n'
        '[verify]\nwindow = "100ms"\n[[alert]]\nalertname = "ApiDown"\n'
    )
    loaded = load(write_config(tmp_path, "http://127.0.0.1:9", {"api": rules}))
    store = Store(state / "state.db")
    engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), store)
    await engine.versions.record_release("api", "1.0.0", 1000.0)
    store.mark_baked("api", "1.0.0", 1001.0)
    await engine.versions.record_release("api", "2.0.0", 2000.0)
    return Pipeline(engine), runs


def trigger() -> Trigger:
    return Trigger(
        service="api", source="alert", reason="ApiDown", at=2010.0, breach_started=2005.0
    )


def webhook_payload(alertname: str, fingerprint: str) -> dict[str, Any]:
    """One firing alert, delivered as Alertmanager delivers it."""
    return {
        "version": "4",
        "receiver": "rollbackd",
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": alertname},
                "annotations": {},
                "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": fingerprint,
            }
        ],
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.test",
        "groupKey": "{}:{}",
        "truncatedAlerts": 0,
    }


def fill(directory: Path) -> None:
    # Unbuffered: a buffer left half-written by the full disk would fail again at close.
    with (directory / "ballast").open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()


async def test_full_state_directory_acts_on_nothing(tiny_fs: Path, tmp_path: Path) -> None:
    pipeline, runs = await pipeline_on(tiny_fs, tmp_path)
    fill(tiny_fs)
    submitted = await pipeline.submit(trigger())
    await pipeline.wait_idle()
    assert submitted.outcome == "unrecorded"
    assert "state store failed" in submitted.reason
    assert not runs.exists()
    pipeline.store.close()


async def test_read_only_state_directory_refuses_to_start(tiny_fs: Path, tmp_path: Path) -> None:
    pipeline, _ = await pipeline_on(tiny_fs, tmp_path)
    pipeline.store.close()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    config = tmp_path / "config.toml"
    config.write_text(config.read_text().replace('state_dir = "state"', f'state_dir = "{tiny_fs}"'))
    result = subprocess.run(
        [sys.executable, "-m", "rollbackd", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "ROLLBACKD_TEST_TOKEN": "t"},
    )
    assert result.returncode == 1
    assert "rollbackd: cannot open the state store: state database" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_running_daemon_acknowledges_nothing_it_could_not_store(
    tiny_fs: Path, tmp_path: Path
) -> None:
    """`rollbackd run` with its state on a 1 MiB filesystem that fills up under it: the
    webhook answers 503 (so Alertmanager retries), nothing runs, the daemon says so and stays
    up; once there is room again the same delivery, re-sent, is stored and rolls the service
    back once."""
    log = tmp_path / "runs.jsonl"
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        {"web": alert_service("web", log, alertname="WebDown", target=False)},
    )
    daemon = DaemonProcess(config)
    assert daemon.state_dir == tiny_fs
    delivery = webhook_payload("WebDown", "00000000000000aa")
    with daemon, daemon.http() as api:
        fill(tiny_fs)
        full = api.post("/api/v1/alertmanager", json=delivery)
        assert full.status_code == 503, full.text
        assert full.json()["detail"].startswith("alerts not stored, retry: state database")
        assert "disk is full" in full.json()["detail"]
        assert api.get("/healthz").status_code == 200  # up, and saying why it cannot act
        ready = api.get("/readyz")
        assert ready.status_code == 503
        store = ready.json()["checks"]["store"]
        assert store["ok"] is False and "disk is full" in store["detail"]
        assert executions(log) == []

        # Room again. (Read-only under a running daemon cannot be staged: the kernel refuses
        # to remount a filesystem read-only while the database is open for writing.)
        (tiny_fs / "ballast").unlink()
        assert api.get("/readyz").json()["checks"]["store"]["ok"] is True
        retried = api.post("/api/v1/alertmanager", json=delivery)
        assert retried.status_code == 200, retried.text
        [answer] = retried.json()["alerts"]
        assert answer["new"] is True
        daemon.await_rows("SELECT id FROM rollbacks WHERE state = 'succeeded'")
        assert len(executions(log)) == 1
        assert daemon.rows("SELECT count(*) FROM alerts") == [(1,)]
    assert "alerts not stored: Alertmanager will retry" in daemon.log.read_text()


async def test_a_breach_seen_while_the_disk_is_full_is_acted_on_once_there_is_room(
    tiny_fs: Path, tmp_path: Path
) -> None:
    """A check fires while nothing can be recorded: no rollback then (the pipeline refuses
    what it cannot record), and the firing is not forgotten either: it is handed over again
    on every evaluation while the check still fires, so once there is room the bad release
    is rolled back, once."""
    runs = tmp_path / "runs.jsonl"
    argv = [sys.executable, RECORD, str(runs)]
    rules = (
        '[service]\nname = "api"\nrollback_window = "1h"\n'
        f'[[rollback]]\ntype = "command"\nargv = {json.dumps(argv)}\n'
        '[verify]\nwindow = "100ms"\n'
        '[[check]]\nname = "errors"\ntype = "query"\nquery = "error_ratio"\nabove = 0.1\n'
        'breaches = 2\ninterval = "1s"\n'
    )

    def error_ratio(_request: Recorded, _n: int) -> Reply:
        # 0.5 until the rollback has run, then 0: the rollback cured it.
        return success([{"metric": {}, "value": [1, "0" if runs.exists() else "0.5"]}])

    with RecordingServer(error_ratio) as prometheus:
        loaded = load(write_config(tmp_path, prometheus.url, {"api": rules}))
        store = Store(tiny_fs / "state.db")
        engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), store)
        pipeline = Pipeline(engine)
        runner = Runner(engine, pipeline.on_fire)
        try:
            now = time.time()
            await engine.versions.record_release("api", "2.0.0", now - 60)
            fill(tiny_fs)
            for at in (now, now + 1, now + 2):
                [evaluation] = await runner.tick(at)
                assert evaluation.state.firing or at == now
            await pipeline.wait_idle()
            assert not runs.exists()
            assert store.rollbacks() == []

            (tiny_fs / "ballast").unlink()
            await runner.tick(now + 3)
            await pipeline.wait_idle()
            [rollback] = store.rollbacks()
            assert rollback.state is RollbackState.SUCCEEDED
            # Handed over, it is not handed over again: the next evaluations add nothing.
            await runner.tick(now + 4)
            await pipeline.wait_idle()
            assert len(runs.read_text().splitlines()) == 1
            assert store.triggers(rollback.id) == []
        finally:
            store.close()
            engine.client.close()
