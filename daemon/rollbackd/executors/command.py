"""``command``: run a program with placeholders in its argv; never through a shell."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rollbackd.executors.base import ExecutorSpec


class CommandExecutor(ExecutorSpec):
    type: Literal["command"]
    argv: list[str] = Field(min_length=1, description="program and arguments, no shell")
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict, description="extra environment")

    def templates(self) -> list[str]:
        return [*self.argv, *self.env.values()]
