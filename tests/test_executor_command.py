"""The command executor against real programs: exit codes, placeholders in argv (never a shell),
the environment it passes and the one it does not, unsafe versions, timeouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from rollbackd.executors.base import RollbackContext
from rollbackd.executors.command import CommandExecutor, CommandRun

HOSTILE_REASON = "p99 > 2s; rm -rf / $(touch pwned) `touch pwned` \"q\" 's' | tee x\nline 2"


def context(**changes: Any) -> RollbackContext:
    values: dict[str, Any] = {
        "service": "checkout",
        "from_version": "1.4.0",
        "to_version": "1.3.9",
        "reason": "error rate above 1%",
        "rollback_id": "rb-42",
    }
    values.update(changes)
    return RollbackContext(**values)


def spec(argv: list[str], **changes: Any) -> CommandExecutor:
    return CommandExecutor.model_validate({"type": "command", "argv": argv, **changes})


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


async def test_exit_zero_is_success() -> None:
    result = await spec(["sh", "-c", "echo rolled back"]).runner().run(context())
    assert result.ok
    assert result.summary == "exit 0"
    assert result.stdout_tail == "rolled back\n"
    assert result.command == ("sh", "-c", "echo rolled back")
    assert not result.timed_out


@pytest.mark.parametrize("code", [1, 3, 255])
async def test_nonzero_exit_is_failure(code: int) -> None:
    result = await spec(["sh", "-c", f"echo failing >&2; exit {code}"]).runner().run(context())
    assert not result.ok
    assert result.summary == f"exit {code}"
    assert result.stderr_tail == "failing\n"


async def test_runner_is_a_command_run() -> None:
    runner = spec(["/usr/local/bin/deploy"]).runner()
    assert isinstance(runner, CommandRun)
    assert runner.describe() == "command /usr/local/bin/deploy"


async def test_placeholders_substituted_in_each_argument() -> None:
    argv = python(
        "import json, sys; print(json.dumps(sys.argv[1:]))",
        "--service={service}",
        "{from_version}..{to_version}",
        "{rollback_id}",
        "{canary}",
    )
    result = await spec(argv).runner().run(context(canary=True))
    assert result.ok, result
    assert json.loads(result.stdout_tail) == [
        "--service=checkout",
        "1.4.0..1.3.9",
        "rb-42",
        "true",
    ]
    assert result.command[3:] == ("--service=checkout", "1.4.0..1.3.9", "rb-42", "true")


@pytest.mark.faults
async def test_hostile_reason_arrives_verbatim_as_one_argument(tmp_path: Path) -> None:
    argv = python("import json, sys; print(json.dumps(sys.argv[1:]))", "{reason}", "after")
    result = await spec(argv, cwd=str(tmp_path)).runner().run(context(reason=HOSTILE_REASON))
    assert result.ok, result
    assert json.loads(result.stdout_tail) == [HOSTILE_REASON, "after"]
    assert not (tmp_path / "pwned").exists()


async def test_environment_has_rollbackd_variables_and_not_the_daemons_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "daemon-secret")
    monkeypatch.setenv("ROLLBACKD_API_TOKEN", "daemon-token")
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    runner = spec(
        python(code), env={"DEPLOY_TARGET": "{service}@{to_version}", "STATIC": "yes"}
    ).runner()
    result = await runner.run(context(reason=HOSTILE_REASON))
    assert result.ok, result
    env = json.loads(result.stdout_tail)
    assert env["ROLLBACKD_SERVICE"] == "checkout"
    assert env["ROLLBACKD_FROM_VERSION"] == "1.4.0"
    assert env["ROLLBACKD_TO_VERSION"] == "1.3.9"
    assert env["ROLLBACKD_REASON"] == HOSTILE_REASON
    assert env["ROLLBACKD_ROLLBACK_ID"] == "rb-42"
    assert env["ROLLBACKD_CANARY"] == "false"
    assert env["DEPLOY_TARGET"] == "checkout@1.3.9"
    assert env["STATIC"] == "yes"
    assert "PATH" in env
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert "ROLLBACKD_API_TOKEN" not in env
    assert "daemon-secret" not in result.stdout_tail


async def test_program_found_on_path_without_a_slash() -> None:
    result = await spec(["true"]).runner().run(context())
    assert result.ok


async def test_working_directory(tmp_path: Path) -> None:
    result = await spec(["pwd"], cwd=str(tmp_path)).runner().run(context())
    assert result.ok
    assert result.stdout_tail.strip() == str(tmp_path.resolve())


@pytest.mark.faults
@pytest.mark.parametrize("version", ["../../etc", "v1;rm", "1.0 && id", "$(id)", "a\nb"])
async def test_unsafe_version_refused_and_nothing_run(tmp_path: Path, version: str) -> None:
    marker = tmp_path / "ran"
    argv = python("import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(marker), "x")
    result = await spec(argv).runner().run(context(to_version=version))
    assert not result.ok
    assert "to_version" in result.summary
    assert "nothing was run" in result.summary
    assert result.command == ()
    assert not marker.exists()


@pytest.mark.faults
async def test_unsafe_from_version_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = await spec(["touch", str(marker)]).runner().run(context(from_version="../x"))
    assert not result.ok
    assert "from_version" in result.summary
    assert not marker.exists()


async def test_program_not_found() -> None:
    result = await spec(["/nonexistent/deploy", "{to_version}"]).runner().run(context())
    assert not result.ok
    assert result.summary == "cannot run /nonexistent/deploy: No such file or directory"


@pytest.mark.faults
async def test_hanging_command_killed_at_timeout_with_its_grandchild() -> None:
    runner = spec(["sh", "-c", "sleep 1000 & echo $!; sleep 1000"], timeout="300ms").runner()
    result = await runner.run(context())
    assert not result.ok
    assert result.timed_out
    assert result.summary == "timed out after 300ms; process group killed"
    grandchild = int(result.stdout_tail)
    try:
        stat = Path(f"/proc/{grandchild}/stat").read_text()
    except FileNotFoundError:
        return
    assert stat[stat.rfind(")") + 2] in "ZX", "the grandchild survived the timeout"
