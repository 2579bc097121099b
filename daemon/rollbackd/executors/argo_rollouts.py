"""``argo_rollouts``: abort a canary, or undo a Rollout, with the kubectl plugin."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rollbackd.executors.base import Executor, ExecutorSpec, RollbackContext, StepResult
from rollbackd.executors.steps import ProgramSteps, kube_environment, refuse_unsafe


class ArgoRolloutsExecutor(ExecutorSpec):
    type: Literal["argo_rollouts"]
    rollout: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    action: Literal["abort", "undo"] = "abort"
    namespace: str | None = None
    context: str | None = None

    def runner(self) -> ArgoRolloutsRun:
        return ArgoRolloutsRun(self)


class ArgoRolloutsRun(Executor[ArgoRolloutsExecutor]):
    """``kubectl argo rollouts abort|undo ROLLOUT [-n NS] [--context C]``.

    The plugin (``kubectl-argo-rollouts``) must be on the daemon's ``PATH``; neither action
    waits: Argo Rollouts itself moves the traffic back.
    """

    def describe(self) -> str:
        return f"argo_rollouts {self.spec.action} {self.spec.rollout}"

    def argv(self) -> list[str]:
        spec = self.spec
        argv = ["kubectl", "argo", "rollouts", spec.action, spec.rollout]
        if spec.namespace:
            argv += ["-n", spec.namespace]
        if spec.context:
            argv += ["--context", spec.context]
        return argv

    async def run(self, context: RollbackContext) -> StepResult:
        refused = refuse_unsafe(context)
        if refused:
            return refused
        spec = self.spec
        steps = ProgramSteps(spec.timeout.total_seconds(), kube_environment())
        await steps.run(self.argv(), label=f"kubectl argo rollouts {spec.action} {spec.rollout}")
        return steps.result()
