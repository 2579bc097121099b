"""The helm executor against a recording fake ``helm``: exact argv, failures, unsafe versions."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from rollbackd.executors.base import RollbackContext
from rollbackd.executors.helm import HelmExecutor, HelmRun
from support.recording_tools import RecordingToolFactory, recording_tool

__all__ = ["recording_tool"]  # the fixture, imported for pytest

CONTEXT = RollbackContext(
    service="checkout",
    from_version="2.0.0",
    to_version="1.0.0",
    reason="error-rate above 0.05 for 1m",
    rollback_id="rb-42",
)


def spec(**fields: Any) -> HelmExecutor:
    return HelmExecutor.model_validate({"type": "helm", "release": "checkout", **fields})


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({}, ["rollback", "checkout", "--wait", "--timeout", "290s"], id="defaults"),
        pytest.param({"wait": False}, ["rollback", "checkout", "--timeout", "290s"], id="no-wait"),
        pytest.param(
            {"revision": 7}, ["rollback", "checkout", "7", "--wait", "--timeout", "290s"], id="rev"
        ),
        pytest.param(
            {"namespace": "shop", "timeout": "10m"},
            ["rollback", "checkout", "-n", "shop", "--wait", "--timeout", "590s"],
            id="namespace",
        ),
        pytest.param(
            {"kube_context": "prod", "wait": False, "timeout": "1m"},
            ["rollback", "checkout", "--kube-context", "prod", "--timeout", "54s"],
            id="context",
        ),
        pytest.param(
            {"revision": 3, "namespace": "shop", "kube_context": "prod"},
            [
                *("rollback", "checkout", "3", "-n", "shop", "--kube-context", "prod"),
                *("--wait", "--timeout", "290s"),
            ],
            id="everything",
        ),
    ],
)
async def test_exact_argv(
    recording_tool: RecordingToolFactory, fields: dict[str, Any], expected: list[str]
) -> None:
    helm = recording_tool("helm")
    result = await spec(**fields).runner().run(CONTEXT)
    assert result.ok, result.summary
    assert helm.calls == [expected]
    assert result.command == ("helm", *expected)


async def test_summary(recording_tool: RecordingToolFactory) -> None:
    recording_tool("helm")
    result = await spec(revision=7).runner().run(CONTEXT)
    assert result.summary == "helm rollback checkout 7: exit 0"


async def test_needs_no_target(recording_tool: RecordingToolFactory) -> None:
    helm = recording_tool("helm")
    context = RollbackContext(
        service="checkout", from_version=None, to_version=None, reason="r", rollback_id="rb"
    )
    assert not spec().needs_target()
    result = await spec().runner().run(context)
    assert result.ok
    assert len(helm.calls) == 1


async def test_failure_propagates(recording_tool: RecordingToolFactory) -> None:
    helm = recording_tool("helm")
    helm.fail_next(1, "Error: release: not found\n")
    result = await spec().runner().run(CONTEXT)
    assert not result.ok
    assert result.summary == "helm rollback checkout: exit 1: Error: release: not found"
    assert result.stderr_tail == "Error: release: not found\n"


@pytest.mark.parametrize("field", ["from_version", "to_version"])
async def test_unsafe_versions_run_nothing(
    recording_tool: RecordingToolFactory, field: str
) -> None:
    helm = recording_tool("helm")
    versions = {"from_version": "2.0.0", "to_version": "1.0.0", field: "$(reboot)"}
    context = RollbackContext(
        service="checkout",
        from_version=versions["from_version"],
        to_version=versions["to_version"],
        reason="r",
        rollback_id="rb",
    )
    result = await spec().runner().run(context)
    assert not result.ok
    assert result.summary.startswith("refused:")
    assert helm.calls == []


async def test_environment_passes_helm_storage_not_secrets(
    recording_tool: RecordingToolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    helm = recording_tool("helm")
    monkeypatch.setenv("HELM_DRIVER", "configmap")
    monkeypatch.setenv("GITHUB_TOKEN", "secret")
    await spec().runner().run(CONTEXT)
    env = helm.records[0].env
    assert env["HELM_DRIVER"] == "configmap"
    assert "GITHUB_TOKEN" not in env


def test_describe_and_runner() -> None:
    run = spec().runner()
    assert isinstance(run, HelmRun)
    assert run.describe() == "helm rollback checkout"


@pytest.mark.parametrize("fields", [{"revision": 0}, {"release": "Checkout"}, {"release": "-x"}])
def test_invalid_specs(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        spec(**fields)
