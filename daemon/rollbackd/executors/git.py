"""``git``: GitOps. Write ``to_version`` into the manifest that names the version (or
revert the release commit), commit with the rollback id and reason, and push, so the
desired state agrees with what runs and the GitOps controller does not undo the rollback."""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import Field, model_validator

from rollbackd.executors.base import ExecutorSpec


class GitExecutor(ExecutorSpec):
    type: Literal["git"]
    repository: str = Field(min_length=1, description="URL or path of the deployment repository")
    branch: str = "main"
    action: Literal["write", "revert"] = "write"
    file: str | None = Field(default=None, description="the manifest, relative to the repository")
    match: str | None = Field(
        default=None,
        description="a regular expression with one group around the version, "
        r"'image: registry/checkout:(\S+)'",
    )
    author_name: str = "rollbackd"
    author_email: str = "rollbackd@localhost"
    message: str = "rollback {service} {from_version} -> {to_version} ({rollback_id}): {reason}"

    @model_validator(mode="after")
    def _write_needs_file_and_match(self) -> Self:
        if self.action == "write":
            if not (self.file and self.match):
                raise ValueError("action 'write' needs 'file' and 'match'")
            try:
                pattern = re.compile(self.match)
            except re.error as exc:
                raise ValueError(f"'match' is not a regular expression: {exc}") from None
            if pattern.groups != 1:
                raise ValueError(
                    f"'match' must have exactly one group around the version, has {pattern.groups}"
                )
        if self.file and (self.file.startswith("/") or ".." in self.file.split("/")):
            raise ValueError("'file' must be a path inside the repository")
        return self

    def templates(self) -> list[str]:
        return [self.message]

    def needs_target(self) -> bool:
        return self.action == "write"
