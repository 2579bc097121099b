"""run_process against real programs: exit codes, timeouts that kill the whole process group,
programs that ignore SIGTERM, output floods, cancellation, programs that cannot start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollbackd.executors.process import ProcessResult, base_environment, run_process

ENV = base_environment()


def is_gone(pid: int) -> bool:
    """No such process, or only a zombie left waiting for its (new) parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    """Wait for ``pid`` to exit, by its pidfd (readable on exit), not by polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], seconds)
        return bool(readable)
    finally:
        os.close(fd)


def pids(text: str) -> list[int]:
    return [int(line) for line in text.split()]


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids a test leaves running on purpose; killed at teardown."""
    started: list[int] = []
    yield started
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_exit_zero_with_output() -> None:
    result = await run_process(["sh", "-c", "echo out; echo err >&2"], env=ENV, timeout=10)
    assert result.ok
    assert result.returncode == 0
    assert result.stdout_tail == "out\n"
    assert result.stderr_tail == "err\n"
    assert not result.timed_out
    assert result.error is None
    assert result.argv == ("sh", "-c", "echo out; echo err >&2")
    assert result.summary() == "exit 0"


async def test_exit_code_reported() -> None:
    result = await run_process(["sh", "-c", "exit 3"], env=ENV, timeout=10)
    assert not result.ok
    assert result.returncode == 3
    assert result.summary() == "exit 3"
    step = result.step_result()
    assert not step.ok
    assert step.summary == "exit 3"
    assert step.command == ("sh", "-c", "exit 3")


async def test_killed_by_signal_reported() -> None:
    result = await run_process(["sh", "-c", "kill -KILL $$"], env=ENV, timeout=10)
    assert not result.ok
    assert result.returncode == -signal.SIGKILL
    assert result.summary() == "killed by SIGKILL"


async def test_program_not_found() -> None:
    result = await run_process(["/nonexistent/deploy", "x"], env=ENV, timeout=10)
    assert not result.ok
    assert result.returncode is None
    assert result.error == "cannot run /nonexistent/deploy: No such file or directory"
    assert result.summary() == result.error


async def test_program_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "deploy"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    result = await run_process([str(script)], env=ENV, timeout=10)
    assert not result.ok
    assert result.error == f"cannot run {script}: Permission denied"


async def test_missing_working_directory(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    result = await run_process(["true"], env=ENV, cwd=missing, timeout=10)
    assert not result.ok
    assert result.error is not None
    assert missing in result.error


async def test_working_directory_used(tmp_path: Path) -> None:
    result = await run_process(["pwd"], env=ENV, cwd=str(tmp_path), timeout=10)
    assert result.ok
    assert result.stdout_tail.strip() == str(tmp_path.resolve())


async def test_environment_is_exactly_what_is_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAEMON_API_TOKEN", "s3cret")
    env = {"PATH": ENV["PATH"], "ONLY_THIS": "yes"}
    code = "import os; print(os.environ.get('ONLY_THIS'), os.environ.get('DAEMON_API_TOKEN'))"
    result = await run_process([sys.executable, "-c", code], env=env, timeout=10)
    assert result.ok, result
    assert result.stdout_tail.split() == ["yes", "None"]


async def test_base_environment_holds_only_the_basics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAEMON_API_TOKEN", "s3cret")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = base_environment()
    assert set(env) <= {"PATH", "HOME", "LANG"}
    assert "PATH" in env
    assert env["LANG"] == "C.UTF-8"


async def test_stdin_is_empty() -> None:
    # cat would wait for ever on an inherited terminal or pipe.
    result = await run_process(["cat"], env=ENV, timeout=10)
    assert result.ok
    assert result.stdout_tail == ""


@pytest.mark.faults
async def test_timeout_kills_the_whole_process_group() -> None:
    script = "sleep 1000 & echo $!; sleep 1000 & echo $!; wait"
    result = await run_process(["sh", "-c", script], env=ENV, timeout=0.5, kill_grace=5)
    assert result.timed_out
    assert not result.ok
    assert result.summary() == "timed out after 500ms; process group killed"
    grandchildren = pids(result.stdout_tail)
    assert len(grandchildren) == 2
    for pid in grandchildren:
        assert is_gone(pid), f"grandchild {pid} survived the timeout"


@pytest.mark.faults
async def test_sigterm_ignored_then_sigkilled() -> None:
    script = "trap '' TERM; sleep 1000 & echo $!; wait"
    result = await run_process(["sh", "-c", script], env=ENV, timeout=0.3, kill_grace=0.5)
    assert result.timed_out
    assert result.returncode == -signal.SIGKILL
    (grandchild,) = pids(result.stdout_tail)
    assert is_gone(grandchild)


@pytest.mark.faults
async def test_grandchild_holding_pipes_after_timeout_cannot_hang_us() -> None:
    # The leader dies on SIGTERM; its child ignores SIGTERM and keeps stdout open.
    script = "(trap '' TERM; sleep 1000) & echo $!; sleep 1000"
    result = await run_process(["sh", "-c", script], env=ENV, timeout=0.3, kill_grace=0.5)
    assert result.timed_out
    (background,) = pids(result.stdout_tail)
    assert is_gone(background)


@pytest.mark.faults
async def test_background_process_left_after_normal_exit_does_not_hang_us(
    leftovers: list[int],
) -> None:
    # Something a restart script starts on purpose (nohup app &) is not killed, and its
    # open stdout does not keep us waiting.
    result = await run_process(
        ["sh", "-c", "sleep 1000 & echo $!"], env=ENV, timeout=30, pipe_grace=0.2
    )
    (background,) = pids(result.stdout_tail)
    leftovers.append(background)
    assert result.ok
    assert not result.timed_out
    assert not is_gone(background)


@pytest.mark.faults
async def test_output_flood_keeps_only_a_bounded_tail() -> None:
    code = (
        "import sys\n"
        "chunk = b'x' * (1 << 20)\n"
        "for _ in range(50):\n"
        "    sys.stdout.buffer.write(chunk)\n"
        "    sys.stderr.buffer.write(chunk)\n"
        "sys.stdout.buffer.write(b'END-OUT\\n')\n"
        "sys.stderr.buffer.write(b'END-ERR\\n')\n"
    )
    result = await run_process([sys.executable, "-c", code], env=ENV, timeout=60, tail_bytes=4096)
    assert result.ok, result.summary()
    assert len(result.stdout_tail) <= 4096
    assert len(result.stderr_tail) <= 4096
    assert result.stdout_tail.endswith("xxxxEND-OUT\n")
    assert result.stderr_tail.endswith("xxxxEND-ERR\n")


async def test_tail_cut_inside_a_character_still_decodes() -> None:
    code = "import sys; sys.stdout.buffer.write('é'.encode() * 100)"
    result = await run_process([sys.executable, "-c", code], env=ENV, timeout=10, tail_bytes=11)
    assert result.ok
    assert len(result.stdout_tail) <= 11
    assert result.stdout_tail.endswith("éééé")


@pytest.mark.faults
async def test_cancellation_kills_the_process_group(tmp_path: Path) -> None:
    written = tmp_path / "pids"
    script = 'sleep 1000 & echo $$ $! > "$1.tmp" && mv "$1.tmp" "$1"; wait'
    task = asyncio.create_task(
        run_process(["sh", "-c", script, "sh", str(written)], env=ENV, timeout=60)
    )
    # The file appears (atomically, by rename) once the script runs with its grandchild.
    for _ in range(400):
        if written.exists():
            break
        await asyncio.sleep(0.025)
    leader, grandchild = pids(written.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert wait_gone(leader)
    assert wait_gone(grandchild)


@pytest.mark.faults
async def test_nul_byte_in_argument_is_an_error_not_an_exception() -> None:
    result = await run_process(["echo", "a\0b"], env=ENV, timeout=10)
    assert not result.ok
    assert result.error is not None
    assert result.error.startswith("cannot run echo")


def test_summary_of_results() -> None:
    def result(**kwargs: object) -> ProcessResult:
        fields: dict[str, object] = {
            "returncode": 0,
            "stdout_tail": "",
            "stderr_tail": "",
            "timed_out": False,
            "duration": 1.0,
            "argv": ("x",),
        }
        fields.update(kwargs)
        return ProcessResult(**fields)  # type: ignore[arg-type]

    assert result().summary() == "exit 0"
    assert result(returncode=3).summary() == "exit 3"
    assert result(returncode=-15).summary() == "killed by SIGTERM"
    assert result(returncode=None, timed_out=True, timeout=300.0).summary() == (
        "timed out after 5m; process group killed"
    )
    assert result(returncode=None, error="cannot run x: nope").summary() == "cannot run x: nope"
