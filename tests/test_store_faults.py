"""The state directory fails under the daemon: full, or read-only. Nothing is acted on that
cannot be recorded. Real filesystems: a tiny tmpfs mounted for the test (needs root, as CI
runs; skipped elsewhere)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollbackd.engine import Engine
from rollbackd.loader import load
from rollbackd.pipeline import Pipeline, Trigger
from rollbackd.prometheus import PrometheusClient
from rollbackd.store import Store
from support.configs import write_config

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


def pipeline_on(state: Path, tmp_path: Path) -> tuple[Pipeline, Path]:
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
    engine.versions.record_release("api", "1.0.0", 1000.0)
    store.mark_baked("api", "1.0.0", 1001.0)
    engine.versions.record_release("api", "2.0.0", 2000.0)
    return Pipeline(engine), runs


def trigger() -> Trigger:
    return Trigger(
        service="api", source="alert", reason="ApiDown", at=2010.0, breach_started=2005.0
    )


def fill(directory: Path) -> None:
    with (directory / "ballast").open("wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()


async def test_full_state_directory_acts_on_nothing(tiny_fs: Path, tmp_path: Path) -> None:
    pipeline, runs = pipeline_on(tiny_fs, tmp_path)
    fill(tiny_fs)
    submitted = await pipeline.submit(trigger())
    await pipeline.wait_idle()
    assert submitted.outcome == "unrecorded"
    assert "state store failed" in submitted.reason
    assert not runs.exists()
    pipeline.store.close()


def test_read_only_state_directory_refuses_to_start(tiny_fs: Path, tmp_path: Path) -> None:
    pipeline, _ = pipeline_on(tiny_fs, tmp_path)
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
