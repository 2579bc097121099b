"""``symlink``: atomically repoint ``current`` to ``versions/<to_version>``, then restart."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rollbackd.executors.base import ExecutorSpec


class SymlinkExecutor(ExecutorSpec):
    type: Literal["symlink"]
    link: str = Field(min_length=1, description="the `current` symlink, /srv/app/current")
    versions_dir: str = Field(min_length=1, description="holds one directory per version")
    restart: list[str] = Field(
        default_factory=list,
        description='argv run after the switch: ["systemctl", "restart", "app"]',
    )

    def templates(self) -> list[str]:
        return list(self.restart)

    def needs_target(self) -> bool:
        return True
