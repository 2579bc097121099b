"""``helm``: ``helm rollback RELEASE [REVISION]``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rollbackd.executors.base import Executor, ExecutorSpec, RollbackContext, StepResult
from rollbackd.executors.steps import (
    ProgramSteps,
    kube_environment,
    refuse_unsafe,
    tool_timeout,
)

HELM_ENVIRONMENT_KEYS = (
    # Where helm keeps its repositories and plugins, and where releases are stored: without
    # HELM_DRIVER (and its SQL connection) a release kept elsewhere is not found.
    "HELM_CACHE_HOME",
    "HELM_CONFIG_HOME",
    "HELM_DATA_HOME",
    "HELM_DRIVER",
    "HELM_DRIVER_SQL_CONNECTION_STRING",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
)
"""What ``helm`` gets on top of :func:`~rollbackd.executors.kubernetes.kube_environment`."""


class HelmExecutor(ExecutorSpec):
    type: Literal["helm"]
    release: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str | None = None
    revision: int | None = Field(default=None, ge=1, description="default: the previous one")
    wait: bool = True
    kube_context: str | None = None

    def runner(self) -> HelmRun:
        return HelmRun(self)


class HelmRun(Executor[HelmExecutor]):
    """``helm rollback RELEASE [REVISION] [-n NS] [--kube-context C] [--wait] --timeout <N>s``.

    Without a revision helm goes back to the release's previous one. N is a little less than
    the spec's timeout, so helm reports its own timeout before it is killed.
    """

    def describe(self) -> str:
        return f"helm rollback {self.spec.release}"

    def argv(self) -> list[str]:
        spec = self.spec
        argv = ["helm", "rollback", spec.release]
        if spec.revision is not None:
            argv.append(str(spec.revision))
        if spec.namespace:
            argv += ["-n", spec.namespace]
        if spec.kube_context:
            argv += ["--kube-context", spec.kube_context]
        if spec.wait:
            argv.append("--wait")
        argv += ["--timeout", f"{tool_timeout(spec.timeout.total_seconds())}s"]
        return argv

    async def run(self, context: RollbackContext) -> StepResult:
        refused = refuse_unsafe(context)
        if refused:
            return refused
        spec = self.spec
        steps = ProgramSteps(spec.timeout.total_seconds(), kube_environment(HELM_ENVIRONMENT_KEYS))
        label = f"helm rollback {spec.release}"
        if spec.revision is not None:
            label += f" {spec.revision}"
        await steps.run(self.argv(), label=label)
        return steps.result()
