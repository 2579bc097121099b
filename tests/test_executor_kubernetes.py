"""The kubernetes executor against a recording fake ``kubectl`` (no cluster here): the exact
argv of each action and option, failures, unsafe versions, and the shared ProgramSteps."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from rollbackd.executors.base import RollbackContext
from rollbackd.executors.kubernetes import KubernetesExecutor, KubernetesRun
from rollbackd.executors.steps import tool_timeout
from support.recording_tools import RecordingToolFactory, recording_tool

__all__ = ["recording_tool"]  # the fixture, imported for pytest

CONTEXT = RollbackContext(
    service="checkout",
    from_version="2.0.0",
    to_version="1.0.0",
    reason="error-rate above 0.05 for 1m",
    rollback_id="rb-42",
)


def spec(**fields: Any) -> KubernetesExecutor:
    return KubernetesExecutor.model_validate(
        {"type": "kubernetes", "resource": "deployment/checkout", **fields}
    )


def frozen_clock() -> float:
    # The time left is then always the whole timeout, so --timeout=<N>s is predictable.
    return 1000.0


def run_of(executor: KubernetesExecutor) -> KubernetesRun:
    return KubernetesRun(executor, clock=frozen_clock)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(
            {},
            [
                ["rollout", "undo", "deployment/checkout"],
                ["rollout", "status", "deployment/checkout", "--timeout=290s"],
            ],
            id="undo-wait",
        ),
        pytest.param(
            {"wait": False}, [["rollout", "undo", "deployment/checkout"]], id="undo-no-wait"
        ),
        pytest.param(
            {"namespace": "shop", "wait": False},
            [["-n", "shop", "rollout", "undo", "deployment/checkout"]],
            id="undo-namespace",
        ),
        pytest.param(
            {"context": "prod", "kubeconfig": "/etc/kube/config", "namespace": "shop"},
            [
                [
                    *("--context", "prod", "--kubeconfig", "/etc/kube/config", "-n", "shop"),
                    *("rollout", "undo", "deployment/checkout"),
                ],
                [
                    *("--context", "prod", "--kubeconfig", "/etc/kube/config", "-n", "shop"),
                    *("rollout", "status", "deployment/checkout", "--timeout=290s"),
                ],
            ],
            id="undo-all-options",
        ),
        pytest.param(
            {"context": "prod", "wait": False, "timeout": "1m"},
            [["--context", "prod", "rollout", "undo", "deployment/checkout"]],
            id="undo-context",
        ),
        pytest.param(
            {"timeout": "1m"},
            [
                ["rollout", "undo", "deployment/checkout"],
                ["rollout", "status", "deployment/checkout", "--timeout=54s"],
            ],
            id="undo-short-timeout",
        ),
        pytest.param(
            {"action": "set_image", "container": "app", "image": "registry/checkout:{to_version}"},
            [
                ["set", "image", "deployment/checkout", "app=registry/checkout:1.0.0"],
                ["rollout", "status", "deployment/checkout", "--timeout=290s"],
            ],
            id="set-image-wait",
        ),
        pytest.param(
            {
                "action": "set_image",
                "container": "app",
                "image": "registry/{service}:{to_version}",
                "namespace": "shop",
                "kubeconfig": "/k",
                "wait": False,
            },
            [
                [
                    *("--kubeconfig", "/k", "-n", "shop", "set", "image"),
                    *("deployment/checkout", "app=registry/checkout:1.0.0"),
                ]
            ],
            id="set-image-options",
        ),
        pytest.param(
            {"action": "set_image", "container": "app", "image": "registry/checkout:stable"},
            [
                ["set", "image", "deployment/checkout", "app=registry/checkout:stable"],
                ["rollout", "status", "deployment/checkout", "--timeout=290s"],
            ],
            id="set-image-fixed",
        ),
    ],
)
async def test_exact_argv(
    recording_tool: RecordingToolFactory, fields: dict[str, Any], expected: list[list[str]]
) -> None:
    kubectl = recording_tool("kubectl")
    result = await run_of(spec(**fields)).run(CONTEXT)
    assert result.ok, result.summary
    assert kubectl.calls == expected
    # The audit record holds each argv, the later ones after "&&".
    flat: list[str] = []
    for argv in expected:
        flat += [*(["&&"] if flat else []), "kubectl", *argv]
    assert result.command == tuple(flat)


async def test_summary_names_each_program(recording_tool: RecordingToolFactory) -> None:
    recording_tool("kubectl")
    result = await run_of(spec()).run(CONTEXT)
    assert result.summary == (
        "kubectl rollout undo deployment/checkout: exit 0; rollout status: exit 0"
    )
    assert not result.timed_out


async def test_undo_needs_no_target(recording_tool: RecordingToolFactory) -> None:
    kubectl = recording_tool("kubectl")
    context = RollbackContext(
        service="checkout", from_version="2.0.0", to_version=None, reason="r", rollback_id="rb"
    )
    result = await run_of(spec(wait=False)).run(context)
    assert result.ok
    assert kubectl.calls == [["rollout", "undo", "deployment/checkout"]]


async def test_set_image_without_target_runs_nothing(recording_tool: RecordingToolFactory) -> None:
    kubectl = recording_tool("kubectl")
    context = RollbackContext(
        service="checkout", from_version="2.0.0", to_version=None, reason="r", rollback_id="rb"
    )
    executor = spec(action="set_image", container="app", image="registry/checkout:{to_version}")
    result = await run_of(executor).run(context)
    assert not result.ok
    assert "to_version" in result.summary
    assert kubectl.calls == []


async def test_undo_failure_skips_status(recording_tool: RecordingToolFactory) -> None:
    kubectl = recording_tool("kubectl")
    kubectl.fail_next(1, 'Error from server (NotFound): deployments.apps "checkout" not found\n')
    result = await run_of(spec()).run(CONTEXT)
    assert not result.ok
    assert result.summary == (
        "kubectl rollout undo deployment/checkout: exit 1: "
        'Error from server (NotFound): deployments.apps "checkout" not found'
    )
    assert "not found" in result.stderr_tail
    assert kubectl.calls == [["rollout", "undo", "deployment/checkout"]]


async def test_status_failure_fails_the_step(recording_tool: RecordingToolFactory) -> None:
    kubectl = recording_tool("kubectl")
    kubectl.respond_next(0, "deployment.apps/checkout rolled back\n")
    kubectl.respond_next(
        1,
        "Waiting for deployment rollout to finish: 1 of 3 updated replicas are available...\n",
        "error: timed out waiting for the condition\n",
    )
    result = await run_of(spec()).run(CONTEXT)
    assert not result.ok
    assert result.summary == (
        "kubectl rollout undo deployment/checkout: exit 0; "
        "rollout status: exit 1: error: timed out waiting for the condition"
    )
    # Both programs' output, each under its command.
    assert "$ kubectl rollout undo deployment/checkout\ndeployment.apps/checkout rolled back\n" in (
        result.stdout_tail
    )
    assert "1 of 3 updated replicas" in result.stdout_tail
    assert "timed out waiting" in result.stderr_tail


@pytest.mark.parametrize("field", ["from_version", "to_version"])
@pytest.mark.parametrize("value", ["1.0.0; rm -rf /", "../../etc", "--all", "1.0.0\n", ""])
async def test_unsafe_versions_run_nothing(
    recording_tool: RecordingToolFactory, field: str, value: str
) -> None:
    kubectl = recording_tool("kubectl")
    versions = {"from_version": "2.0.0", "to_version": "1.0.0", field: value}
    context = RollbackContext(
        service="checkout",
        from_version=versions["from_version"],
        to_version=versions["to_version"],
        reason="r",
        rollback_id="rb",
    )
    executor = spec(action="set_image", container="app", image="registry/checkout:{to_version}")
    for run in (run_of(executor), run_of(spec())):
        result = await run.run(context)
        assert not result.ok
        assert result.summary.startswith("refused:")
    assert kubectl.calls == []


async def test_missing_kubectl_is_an_ordinary_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    result = await run_of(spec()).run(CONTEXT)
    assert not result.ok
    assert result.summary.startswith("kubectl rollout undo deployment/checkout: cannot run kubectl")


async def test_environment_is_minimal(
    recording_tool: RecordingToolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubectl = recording_tool("kubectl")
    monkeypatch.setenv("ROLLBACKD_API_TOKEN", "secret-token")
    monkeypatch.setenv("KUBECONFIG", "/etc/rollbackd/kubeconfig")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    await run_of(spec(wait=False)).run(CONTEXT)
    env = kubectl.records[0].env
    assert "ROLLBACKD_API_TOKEN" not in env
    assert env["KUBECONFIG"] == "/etc/rollbackd/kubeconfig"
    assert env["KUBERNETES_SERVICE_HOST"] == "10.0.0.1"
    assert "secret-token" not in str(env)


async def test_time_used_shortens_the_status_timeout(
    recording_tool: RecordingToolFactory,
) -> None:
    kubectl = recording_tool("kubectl")

    def clock() -> float:
        return 100.0 * len(kubectl.calls)  # each kubectl call takes 100 of the 300 seconds

    result = await KubernetesRun(spec(), clock=clock).run(CONTEXT)
    assert result.ok
    assert kubectl.calls[1][-1] == "--timeout=190s"


async def test_no_time_left_means_status_never_starts(
    recording_tool: RecordingToolFactory,
) -> None:
    kubectl = recording_tool("kubectl")

    def clock() -> float:
        return 301.0 * len(kubectl.calls)  # the undo takes longer than the whole timeout

    result = await KubernetesRun(spec(), clock=clock).run(CONTEXT)
    assert not result.ok
    assert result.timed_out
    assert "rollout status: not started: the 5m timeout was used up" in result.summary
    assert kubectl.calls == [["rollout", "undo", "deployment/checkout"]]


@pytest.mark.parametrize(
    ("seconds", "expected"), [(300, 290), (60, 54), (5, 4), (1, 1), (0.2, 1), (3600, 3590)]
)
def test_tool_timeout_leaves_a_margin(seconds: float, expected: int) -> None:
    assert tool_timeout(seconds) == expected


def test_runner_of_the_spec() -> None:
    executor = spec()
    assert isinstance(executor.runner(), KubernetesRun)
    assert executor.runner().spec is executor


@pytest.mark.parametrize(
    "fields",
    [
        {"action": "set_image", "container": "app"},
        {"action": "set_image", "image": "x:{to_version}"},
        {"image": "x:{to_version}"},
        {"action": "set_image", "container": "app", "image": "x:{version}"},
    ],
)
def test_invalid_specs(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        spec(**fields)


async def test_a_hanging_kubectl_is_killed_at_the_timeout(
    recording_tool: RecordingToolFactory,
) -> None:
    kubectl = recording_tool("kubectl")
    kubectl.respond_next(before=[["sleep", "60"]])
    result = await KubernetesRun(spec(timeout="200ms")).run(CONTEXT)
    assert not result.ok
    assert result.timed_out
    assert result.summary == (
        "kubectl rollout undo deployment/checkout: timed out (200ms in all); process group killed"
    )
