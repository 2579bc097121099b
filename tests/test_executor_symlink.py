"""The symlink executor on real directories: switching versions atomically, refusing versions
and links it must not touch, and the restart command after the switch."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rollbackd.executors.base import RollbackContext
from rollbackd.executors.symlink import SymlinkExecutor, SymlinkRun


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """/srv/app-like tree: versions/1.0.0, versions/1.1.0 and current -> versions/1.1.0."""
    for version in ("1.0.0", "1.1.0"):
        (tmp_path / "versions" / version).mkdir(parents=True)
        (tmp_path / "versions" / version / "VERSION").write_text(version)
    (tmp_path / "current").symlink_to(tmp_path / "versions" / "1.1.0")
    return tmp_path


def context(to_version: str | None = "1.0.0", **changes: Any) -> RollbackContext:
    values: dict[str, Any] = {
        "service": "web",
        "from_version": "1.1.0",
        "to_version": to_version,
        "reason": "5xx above 2%",
        "rollback_id": "rb-3",
    }
    values.update(changes)
    return RollbackContext(**values)


def spec(app: Path, **changes: Any) -> SymlinkExecutor:
    return SymlinkExecutor.model_validate(
        {
            "type": "symlink",
            "link": str(app / "current"),
            "versions_dir": str(app / "versions"),
            **changes,
        }
    )


def current(app: Path) -> str:
    return (app / "current" / "VERSION").read_text()


async def test_switches_to_the_target_version(app: Path) -> None:
    result = await spec(app).runner().run(context("1.0.0"))
    assert result.ok, result
    assert current(app) == "1.0.0"
    assert Path(os.readlink(app / "current")) == (app / "versions" / "1.0.0").resolve()
    assert result.summary.startswith(f"{app / 'current'} -> ")
    assert "1.0.0" in result.summary
    assert "(was " in result.summary


async def test_switches_back_and_forth(app: Path) -> None:
    runner = spec(app).runner()
    for version in ("1.0.0", "1.1.0", "1.0.0"):
        result = await runner.run(context(version))
        assert result.ok, result
        assert current(app) == version
    # No temporary links left behind.
    assert sorted(p.name for p in app.iterdir()) == ["current", "versions"]


async def test_link_created_when_missing(app: Path) -> None:
    (app / "current").unlink()
    result = await spec(app).runner().run(context("1.0.0"))
    assert result.ok, result
    assert current(app) == "1.0.0"


READER = """
import os, sys
link, stop = sys.argv[1], sys.argv[2]
failures = reads = 0
print("ready", flush=True)
while not os.path.exists(stop):
    try:
        os.readlink(link)
        open(os.path.join(link, "VERSION")).read()
        reads += 1
    except OSError:
        failures += 1
print(failures, reads)
"""


async def test_link_always_resolves_while_switching(app: Path, tmp_path: Path) -> None:
    # A reader in another process (no GIL to hide a gap) races a hundred switches and must
    # never find the link missing or dangling. (Unlink-then-symlink fails this at once.)
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(app / "current"), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout is not None
    try:
        assert await asyncio.to_thread(reader.stdout.readline) == "ready\n"
        runner = spec(app).runner()
        for version in ["1.0.0", "1.1.0"] * 50:
            result = await runner.run(context(version))
            assert result.ok, result
            os.readlink(app / "current")
    finally:
        stop.touch()
        output, _ = await asyncio.to_thread(reader.communicate, timeout=30)
    failures, reads = map(int, output.split())
    assert failures == 0
    assert reads > 0


@pytest.mark.faults
async def test_symlink_leading_out_of_versions_dir_refused(app: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (app / "versions" / "evil").symlink_to(outside)
    result = await spec(app).runner().run(context("evil"))
    assert not result.ok
    assert "outside" in result.summary
    assert "nothing was changed" in result.summary
    assert current(app) == "1.1.0"


@pytest.mark.faults
@pytest.mark.parametrize("version", ["../../etc", "..", "v1;rm", "/etc", "1.0.0/../../x"])
async def test_unsafe_version_refused_and_restart_not_run(
    app: Path, tmp_path: Path, version: str
) -> None:
    marker = tmp_path / "restarted"
    restart = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w')", str(marker)]
    result = await spec(app, restart=restart).runner().run(context(version))
    assert not result.ok
    assert "to_version" in result.summary
    assert current(app) == "1.1.0"
    assert not marker.exists()


async def test_missing_version_directory_refused(app: Path) -> None:
    result = await spec(app).runner().run(context("2.0.0"))
    assert not result.ok
    assert "is not a directory" in result.summary
    assert current(app) == "1.1.0"


async def test_version_that_is_a_file_refused(app: Path) -> None:
    (app / "versions" / "notes.txt").write_text("x")
    result = await spec(app).runner().run(context("notes.txt"))
    assert not result.ok
    assert "is not a directory" in result.summary


async def test_no_target_version_refused(app: Path) -> None:
    result = await spec(app).runner().run(context(None))
    assert not result.ok
    assert "to_version" in result.summary
    assert current(app) == "1.1.0"


async def test_link_that_is_a_real_directory_refused(app: Path) -> None:
    (app / "current").unlink()
    (app / "current").mkdir()
    (app / "current" / "data").write_text("keep me")
    result = await spec(app).runner().run(context("1.0.0"))
    assert not result.ok
    assert "not a symlink" in result.summary
    assert (app / "current").is_dir()
    assert not (app / "current").is_symlink()
    assert (app / "current" / "data").read_text() == "keep me"


async def test_missing_versions_dir_refused(app: Path) -> None:
    runner = spec(app, versions_dir=str(app / "releases")).runner()
    result = await runner.run(context("1.0.0"))
    assert not result.ok
    assert "releases" in result.summary
    assert current(app) == "1.1.0"


async def test_restart_runs_with_placeholders_after_the_switch(app: Path) -> None:
    record = app / "restart.json"
    code = (
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[2:], 'env': os.environ.get('ROLLBACKD_TO_VERSION'),\n"
        "           'seen': open(os.path.join(sys.argv[3], 'VERSION')).read()},\n"
        "          open(sys.argv[1], 'w'))\n"
    )
    restart = [sys.executable, "-c", code, str(record), "{service}", str(app / "current")]
    restart.append("--version={to_version}")
    result = await spec(app, restart=restart).runner().run(context("1.0.0"))
    assert result.ok, result
    assert result.summary.endswith("; restart exit 0")
    assert result.command[-1] == "--version=1.0.0"
    recorded = json.loads(record.read_text())
    assert recorded == {
        "argv": ["web", str(app / "current"), "--version=1.0.0"],
        "env": "1.0.0",
        "seen": "1.0.0",
    }


async def test_restart_failure_fails_the_step_and_leaves_the_link_switched(app: Path) -> None:
    restart = ["sh", "-c", "echo unit failed >&2; exit 4"]
    result = await spec(app, restart=restart).runner().run(context("1.0.0"))
    assert not result.ok
    assert current(app) == "1.0.0"
    assert "link stays switched" in result.summary
    assert result.summary.endswith("restart failed: exit 4")
    assert result.stderr_tail == "unit failed\n"
    assert result.command == ("sh", "-c", "echo unit failed >&2; exit 4")


async def test_restart_that_cannot_start_reported(app: Path) -> None:
    result = await spec(app, restart=["/nonexistent/restart"]).runner().run(context("1.0.0"))
    assert not result.ok
    assert current(app) == "1.0.0"
    assert "cannot run /nonexistent/restart" in result.summary


async def test_restart_timeout(app: Path) -> None:
    runner = spec(app, restart=["sleep", "1000"], timeout="300ms").runner()
    result = await runner.run(context("1.0.0"))
    assert not result.ok
    assert result.timed_out
    assert current(app) == "1.0.0"
    assert "timed out" in result.summary


def test_runner_and_describe(app: Path) -> None:
    runner = spec(app).runner()
    assert isinstance(runner, SymlinkRun)
    assert runner.describe() == f"symlink {app / 'current'}"
