"""The argo_rollouts executor against a recording fake ``kubectl`` (the plugin is called as
``kubectl argo rollouts``): exact argv, failures, unsafe versions."""

from __future__ import annotations

from typing import Any

import pytest

from rollbackd.executors.argo_rollouts import ArgoRolloutsExecutor, ArgoRolloutsRun
from rollbackd.executors.base import RollbackContext
from support.recording_tools import RecordingToolFactory, recording_tool

__all__ = ["recording_tool"]  # the fixture, imported for pytest

CONTEXT = RollbackContext(
    service="checkout",
    from_version="2.0.0",
    to_version="1.0.0",
    reason="canary error-rate",
    rollback_id="rb-7",
    canary=True,
)


def spec(**fields: Any) -> ArgoRolloutsExecutor:
    return ArgoRolloutsExecutor.model_validate(
        {"type": "argo_rollouts", "rollout": "checkout", **fields}
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({}, ["argo", "rollouts", "abort", "checkout"], id="abort"),
        pytest.param({"action": "undo"}, ["argo", "rollouts", "undo", "checkout"], id="undo"),
        pytest.param(
            {"namespace": "shop"},
            ["argo", "rollouts", "abort", "checkout", "-n", "shop"],
            id="abort-namespace",
        ),
        pytest.param(
            {"action": "undo", "context": "prod"},
            ["argo", "rollouts", "undo", "checkout", "--context", "prod"],
            id="undo-context",
        ),
        pytest.param(
            {"action": "undo", "namespace": "shop", "context": "prod"},
            ["argo", "rollouts", "undo", "checkout", "-n", "shop", "--context", "prod"],
            id="undo-everything",
        ),
    ],
)
async def test_exact_argv(
    recording_tool: RecordingToolFactory, fields: dict[str, Any], expected: list[str]
) -> None:
    kubectl = recording_tool("kubectl")
    result = await spec(**fields).runner().run(CONTEXT)
    assert result.ok, result.summary
    assert kubectl.calls == [expected]
    assert result.command == ("kubectl", *expected)
    action = fields.get("action", "abort")
    assert result.summary == f"kubectl argo rollouts {action} checkout: exit 0"


async def test_failure_propagates(recording_tool: RecordingToolFactory) -> None:
    kubectl = recording_tool("kubectl")
    kubectl.fail_next(1, 'Error: rollouts.argoproj.io "checkout" not found\n')
    result = await spec().runner().run(CONTEXT)
    assert not result.ok
    assert result.summary == (
        'kubectl argo rollouts abort checkout: exit 1: Error: rollouts.argoproj.io "checkout" '
        "not found"
    )


async def test_missing_plugin_is_reported(recording_tool: RecordingToolFactory) -> None:
    kubectl = recording_tool("kubectl")
    # What kubectl says when kubectl-argo-rollouts is not on PATH.
    kubectl.fail_next(1, 'error: unknown command "argo" for "kubectl"\n')
    result = await spec(action="undo").runner().run(CONTEXT)
    assert not result.ok
    assert 'unknown command "argo"' in result.summary


async def test_unsafe_versions_run_nothing(recording_tool: RecordingToolFactory) -> None:
    kubectl = recording_tool("kubectl")
    context = RollbackContext(
        service="checkout", from_version="-rf", to_version="1.0.0", reason="r", rollback_id="rb"
    )
    result = await spec().runner().run(context)
    assert not result.ok
    assert result.summary.startswith("refused:")
    assert kubectl.calls == []


def test_runner() -> None:
    run = spec(action="undo").runner()
    assert isinstance(run, ArgoRolloutsRun)
    assert run.describe() == "argo_rollouts undo checkout"
