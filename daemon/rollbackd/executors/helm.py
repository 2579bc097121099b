"""``helm``: ``helm rollback RELEASE [REVISION]``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rollbackd.executors.base import ExecutorSpec


class HelmExecutor(ExecutorSpec):
    type: Literal["helm"]
    release: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None
    revision: int | None = Field(default=None, ge=1, description="default: the previous one")
    wait: bool = True
    kube_context: str | None = None
