"""``kubernetes``: ``kubectl rollout undo``, or set a container's image to the target version."""

from __future__ import annotations

import time
from typing import Literal, Self

from pydantic import Field, model_validator

from rollbackd.executors.base import (
    Executor,
    ExecutorSpec,
    RollbackContext,
    StepResult,
)
from rollbackd.executors.placeholders import substitute
from rollbackd.executors.steps import (
    Clock,
    ProgramSteps,
    kube_environment,
    refuse_unsafe,
    tool_timeout,
)


class KubernetesExecutor(ExecutorSpec):
    type: Literal["kubernetes"]
    resource: str = Field(pattern=r"^[a-z]+/[a-z0-9.-]+$", description="deployment/checkout")
    namespace: str | None = None
    context: str | None = None
    kubeconfig: str | None = None
    action: Literal["undo", "set_image"] = "undo"
    container: str | None = None
    image: str | None = Field(default=None, description='"registry/checkout:{to_version}"')
    wait: bool = Field(default=True, description="wait for `kubectl rollout status`")

    @model_validator(mode="after")
    def _image_for_set_image(self) -> Self:
        if self.action == "set_image" and not (self.container and self.image):
            raise ValueError("action 'set_image' needs 'container' and 'image'")
        if self.action == "undo" and self.image:
            raise ValueError("'image' is used only with action = 'set_image'")
        return self

    def templates(self) -> list[str]:
        return [self.image] if self.image else []

    def runner(self) -> KubernetesRun:
        return KubernetesRun(self)


class KubernetesRun(Executor[KubernetesExecutor]):
    """``kubectl [--context C] [--kubeconfig K] [-n NS] rollout undo RESOURCE`` or
    ``... set image RESOURCE CONTAINER=IMAGE``, then, with ``wait``,
    ``... rollout status RESOURCE --timeout=<N>s`` with N a little less than the time left.

    ``clock`` (monotonic seconds) is there for tests, to make that N predictable.
    """

    def __init__(self, spec: KubernetesExecutor, *, clock: Clock = time.monotonic) -> None:
        super().__init__(spec)
        self._clock = clock

    def describe(self) -> str:
        return f"kubernetes {self.spec.action} {self.spec.resource}"

    def kubectl(self, *args: str) -> list[str]:
        argv = ["kubectl"]
        if self.spec.context:
            argv += ["--context", self.spec.context]
        if self.spec.kubeconfig:
            argv += ["--kubeconfig", self.spec.kubeconfig]
        if self.spec.namespace:
            argv += ["-n", self.spec.namespace]
        return [*argv, *args]

    async def run(self, context: RollbackContext) -> StepResult:
        refused = refuse_unsafe(context)
        if refused:
            return refused
        spec = self.spec
        steps = ProgramSteps(spec.timeout.total_seconds(), kube_environment(), clock=self._clock)
        if spec.action == "undo":
            first = await steps.run(
                self.kubectl("rollout", "undo", spec.resource),
                label=f"kubectl rollout undo {spec.resource}",
            )
        else:
            assert spec.container and spec.image, "the spec's validator requires both"
            if spec.needs_target() and not context.to_version:
                return StepResult(
                    ok=False,
                    summary=f"kubectl set image {spec.resource}: no target version to set "
                    "(to_version is unknown); nothing was run",
                )
            image = substitute(spec.image, context.placeholders())
            first = await steps.run(
                self.kubectl("set", "image", spec.resource, f"{spec.container}={image}"),
                label=f"kubectl set image {spec.resource} {spec.container}={image}",
            )
        if first.ok and spec.wait:
            await steps.run(
                self.kubectl(
                    "rollout",
                    "status",
                    spec.resource,
                    f"--timeout={tool_timeout(steps.remaining())}s",
                ),
                label="rollout status",
            )
        return steps.result()
