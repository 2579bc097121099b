"""``argo_rollouts``: abort a canary, or undo a Rollout, with the kubectl plugin."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rollbackd.executors.base import ExecutorSpec


class ArgoRolloutsExecutor(ExecutorSpec):
    type: Literal["argo_rollouts"]
    rollout: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    action: Literal["abort", "undo"] = "abort"
    namespace: str | None = None
    context: str | None = None
