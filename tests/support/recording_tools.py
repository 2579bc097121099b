"""Recording fakes of command-line tools (``kubectl``, ``helm``, ``git``) put first on ``PATH``.

No cluster exists in tests, and the runners call their tools by name, so a test puts an
executable of the same name into a directory at the front of ``PATH``. Each call appends one
JSON line (argv, cwd, environment) to a log next to it, then does what the test said:

* by default: exit 0, print nothing (``respond()`` changes the default);
* ``fail_next(code, stderr)`` / ``respond_next(...)``: a one-time answer for the next call (or
  the next call whose argv contains ``when``), used in order;
* ``pass_through=True``: after recording, run the real program of that name (found on ``PATH``
  when the tool is made), so a wrapped ``git`` is recorded and still works;
* ``before``: commands run just before answering, e.g. another clone pushing to the remote
  right before the runner's own push.

The fake is a Python script whose answers are files in its state directory, so nothing but
the files it reads links a test to the process the runner started.

Use the fixture::

    def test_x(recording_tool: RecordingToolFactory) -> None:
        kubectl = recording_tool("kubectl")
        kubectl.fail_next(1, "error: not found")
        ...
        assert kubectl.calls == [["rollout", "undo", "deployment/checkout"]]

A test module imports ``recording_tool`` from here (pytest then finds the fixture).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_SCRIPT = """\
#!{python} -I
import json, os, subprocess, sys
from pathlib import Path

state = Path({state!r})
argv = sys.argv[1:]
with open(state / "calls.jsonl", "a", encoding="utf-8") as log:
    log.write(json.dumps({{"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}}) + "\\n")

answer = None
for entry in sorted((state / "queue").iterdir()):
    candidate = json.loads(entry.read_text(encoding="utf-8"))
    if candidate.get("when") is None or candidate["when"] in argv:
        entry.unlink()
        answer = candidate
        break
if answer is None:
    answer = json.loads((state / "default.json").read_text(encoding="utf-8"))

for command in answer.get("before", []):
    # Its output would be mistaken for the tool's; it goes to the log instead.
    with open(state / "before.log", "a", encoding="utf-8") as out:
        subprocess.run(command, check=True, stdout=out, stderr=out)

real = {real!r}
if answer.get("pass_through") and real:
    os.execv(real, [real, *argv])
sys.stdout.write(answer.get("stdout", ""))
sys.stderr.write(answer.get("stderr", ""))
sys.exit(answer.get("exit", 0))
"""


@dataclass(frozen=True)
class Call:
    """One recorded invocation."""

    argv: list[str]
    """The arguments after the program name."""
    cwd: str
    env: dict[str, str]


class RecordingTool:
    """A fake ``name`` in ``directory``; see the module docstring."""

    def __init__(self, directory: Path, name: str, *, pass_through: bool = False) -> None:
        self.name = name
        self.directory = directory
        self.path = directory / name
        self.state = directory / f".{name}.state"
        real = shutil.which(name) if pass_through else None
        if pass_through and real is None:
            pytest.skip(f"the real {name!r} is not on PATH")
        self.real = real
        (self.state / "queue").mkdir(parents=True)
        (self.state / "calls.jsonl").touch()
        self._numbers = itertools.count()
        self.respond(pass_through=pass_through)
        self.path.write_text(
            _SCRIPT.format(python=sys.executable, state=str(self.state), real=real or ""),
            encoding="utf-8",
        )
        self.path.chmod(0o755)

    @property
    def records(self) -> list[Call]:
        lines = (self.state / "calls.jsonl").read_text(encoding="utf-8").splitlines()
        return [Call(**json.loads(line)) for line in lines if line]

    @property
    def calls(self) -> list[list[str]]:
        """The argv (without the program name) of every call so far, in order."""
        return [call.argv for call in self.records]

    def respond(
        self, code: int = 0, stdout: str = "", stderr: str = "", *, pass_through: bool = False
    ) -> None:
        """How every call without a one-time answer is answered."""
        answer = _answer(code, stdout, stderr, pass_through=pass_through)
        (self.state / "default.json").write_text(json.dumps(answer), encoding="utf-8")

    def respond_next(
        self,
        code: int = 0,
        stdout: str = "",
        stderr: str = "",
        *,
        when: str | None = None,
        before: Sequence[Sequence[str]] = (),
        pass_through: bool = False,
    ) -> None:
        """A one-time answer for the next call, or the next whose argv contains ``when``."""
        answer = _answer(code, stdout, stderr, pass_through=pass_through)
        answer["when"] = when
        answer["before"] = [list(command) for command in before]
        entry = self.state / "queue" / f"{next(self._numbers):06d}.json"
        entry.write_text(json.dumps(answer), encoding="utf-8")

    def fail_next(self, code: int = 1, stderr: str = "", *, when: str | None = None) -> None:
        self.respond_next(code, "", stderr, when=when)

    def before_next(self, when: str, *commands: Sequence[str]) -> None:
        """Run ``commands`` just before the next call whose argv contains ``when``, then pass
        it through to the real program."""
        self.respond_next(when=when, before=commands, pass_through=True)


def _answer(code: int, stdout: str, stderr: str, *, pass_through: bool) -> dict[str, Any]:
    return {"exit": code, "stdout": stdout, "stderr": stderr, "pass_through": pass_through}


RecordingToolFactory = Callable[..., RecordingTool]


def install(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put ``directory`` first on ``PATH`` for the rest of the test."""
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture
def recording_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RecordingToolFactory:
    """``recording_tool("kubectl")`` makes a recording fake and puts it first on ``PATH``;
    ``recording_tool("git", pass_through=True)`` records the real git."""
    directory = tmp_path / "recording-bin"
    directory.mkdir()
    tools: dict[str, RecordingTool] = {}

    def make(name: str, *, pass_through: bool = False) -> RecordingTool:
        if name not in tools:
            # Before PATH changes: a pass-through tool must find the real program, not itself.
            tools[name] = RecordingTool(directory, name, pass_through=pass_through)
            if len(tools) == 1:
                install(directory, monkeypatch)
        return tools[name]

    return make
