"""``kubernetes``: ``kubectl rollout undo``, or set a container's image to the target version."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from rollbackd.executors.base import ExecutorSpec


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
