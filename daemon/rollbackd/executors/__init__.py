"""Executors: one module per way of putting a version back, gathered into ``Executor``."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from rollbackd.executors.argo_rollouts import ArgoRolloutsExecutor
from rollbackd.executors.base import ExecutorSpec
from rollbackd.executors.command import CommandExecutor
from rollbackd.executors.git import GitExecutor
from rollbackd.executors.helm import HelmExecutor
from rollbackd.executors.http import HttpExecutor
from rollbackd.executors.kubernetes import KubernetesExecutor
from rollbackd.executors.symlink import SymlinkExecutor

Executor = Annotated[
    CommandExecutor
    | HttpExecutor
    | KubernetesExecutor
    | HelmExecutor
    | ArgoRolloutsExecutor
    | SymlinkExecutor
    | GitExecutor,
    Field(discriminator="type"),
]

EXECUTOR_TYPES = ("command", "http", "kubernetes", "helm", "argo_rollouts", "symlink", "git")

__all__ = [
    "EXECUTOR_TYPES",
    "ArgoRolloutsExecutor",
    "CommandExecutor",
    "Executor",
    "ExecutorSpec",
    "GitExecutor",
    "HelmExecutor",
    "HttpExecutor",
    "KubernetesExecutor",
    "SymlinkExecutor",
]
