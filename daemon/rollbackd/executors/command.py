"""``command``: run a program with placeholders in its argv; never through a shell."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rollbackd.executors.base import (
    Executor,
    ExecutorSpec,
    RollbackContext,
    StepResult,
    UnsafeValueError,
)
from rollbackd.executors.placeholders import substitute
from rollbackd.executors.process import base_environment, run_process


class CommandExecutor(ExecutorSpec):
    type: Literal["command"]
    argv: list[str] = Field(min_length=1, description="program and arguments, no shell")
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict, description="extra environment")

    def templates(self) -> list[str]:
        return [*self.argv, *self.env.values()]

    def runner(self) -> CommandRun:
        return CommandRun(self)


class CommandRun(Executor[CommandExecutor]):
    """Runs the spec's argv with placeholders substituted element by element.

    The program's environment is :func:`base_environment` (``PATH``, ``HOME``, ``LANG``),
    the ``ROLLBACKD_*`` variables, then the spec's ``env``; the rest of the daemon's
    environment, which may hold API tokens, is not passed on.
    """

    async def run(self, context: RollbackContext) -> StepResult:
        try:
            context.check()
        except UnsafeValueError as exc:
            return StepResult(ok=False, summary=f"refused: {exc}; nothing was run")
        values = context.placeholders()
        argv = [substitute(arg, values) for arg in self.spec.argv]
        env = {
            **base_environment(),
            **context.environment(),
            **{key: substitute(value, values) for key, value in self.spec.env.items()},
        }
        result = await run_process(
            argv, env=env, cwd=self.spec.cwd, timeout=self.spec.timeout.total_seconds()
        )
        return result.step_result()

    def describe(self) -> str:
        return f"command {self.spec.argv[0]}"
