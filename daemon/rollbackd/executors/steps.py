"""What the runners of ``kubernetes``, ``helm``, ``argo_rollouts`` and ``git`` share:
:class:`ProgramSteps` (programs run one after another against one deadline and reported as one
:class:`StepResult`), :func:`kube_environment` and :func:`refuse_unsafe`.

Programs are called by name (``kubectl``, ``helm``, ``git``) and found on the ``PATH`` of the
daemon's environment at the time of the run, so tests put recording fakes first on ``PATH``.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from rollbackd.executors.base import (
    RollbackContext,
    StepResult,
    UnsafeValueError,
)
from rollbackd.executors.process import (
    DEFAULT_TAIL_BYTES,
    ProcessResult,
    base_environment,
    format_seconds,
    run_process,
)

Clock = Callable[[], float]

KUBE_ENVIRONMENT_KEYS = (
    "KUBECONFIG",
    # kubectl running in a pod finds its API server through these (in-cluster config).
    "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
    # Where exec credential plugins (aws, gke-gcloud-auth-plugin) find their configuration:
    # names and paths, never the credentials themselves.
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "CLOUDSDK_CONFIG",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
)
"""The daemon's variables that ``kubectl`` (and ``helm``) get on top of
:func:`~rollbackd.executors.process.base_environment`; nothing else of the daemon's
environment, which may hold secrets, reaches them."""

_GIST_CHARS = 200


def kube_environment(extra_keys: Sequence[str] = ()) -> dict[str, str]:
    """The environment for ``kubectl``-like tools: ``PATH``, ``HOME``, ``LANG`` and those of
    :data:`KUBE_ENVIRONMENT_KEYS` (and ``extra_keys``) that the daemon has."""
    env = base_environment()
    for key in (*KUBE_ENVIRONMENT_KEYS, *extra_keys):
        value = os.environ.get(key)
        if value is not None:
            env[key] = value
    return env


def refuse_unsafe(context: RollbackContext) -> StepResult | None:
    """A failed :class:`StepResult` if a version in ``context`` is unsafe, else ``None``."""
    try:
        context.check()
    except UnsafeValueError as exc:
        return StepResult(ok=False, summary=f"refused: {exc}; nothing was run")
    return None


def tool_timeout(seconds: float) -> int:
    """Whole seconds for a tool's own ``--timeout`` when ``seconds`` are left.

    A little less than what is left, so that the tool gives up by itself and says why (which
    pods are not ready) before the hard timeout kills its process group and all is lost.
    """
    return max(1, math.floor(seconds - min(10.0, seconds * 0.1)))


def shorten(line: str) -> str:
    return line if len(line) <= _GIST_CHARS else line[: _GIST_CHARS - 3] + "..."


def gist(result: ProcessResult) -> str:
    """The last non-empty line of stderr (else stdout), shortened: why a program failed.
    ``hint:`` lines (git's advice on what to type next) are passed over."""
    for tail in (result.stderr_tail, result.stdout_tail):
        lines = [
            line.strip()
            for line in tail.splitlines()
            if line.strip() and not line.startswith("hint:")
        ]
        if lines:
            return shorten(lines[-1])
    return ""


Explain = Callable[[ProcessResult], str]
"""Why a program failed, in one line, from its result; :func:`gist` unless told otherwise."""


@dataclass(frozen=True)
class _Ran:
    label: str
    result: ProcessResult
    explain: Explain


class ProgramSteps:
    """Programs run one after another within one timeout, reported as one :class:`StepResult`.

    Each program gets what is left of ``timeout``; one that would start after it ran out is
    not started and counts as timed out. ``redact`` is applied to everything reported, for
    secrets that may be part of an argument (credentials in a repository URL).
    """

    def __init__(
        self,
        timeout: float,
        env: Mapping[str, str],
        *,
        clock: Clock = time.monotonic,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        self._timeout = timeout
        self._env = dict(env)
        self._clock = clock
        self._deadline = clock() + timeout
        self._started = time.monotonic()
        self._redact = redact or (lambda text: text)
        self._ran: list[_Ran] = []

    def remaining(self) -> float:
        return self._deadline - self._clock()

    async def run(
        self,
        argv: Sequence[str],
        *,
        label: str,
        cwd: str | None = None,
        explain: Explain = gist,
    ) -> ProcessResult:
        remaining = self.remaining()
        if remaining <= 0:
            result = ProcessResult(
                returncode=None,
                stdout_tail="",
                stderr_tail="",
                timed_out=True,
                duration=0.0,
                argv=tuple(argv),
                error=f"not started: the {format_seconds(self._timeout)} timeout was used up",
                timeout=self._timeout,
            )
        else:
            result = await run_process(argv, env=self._env, cwd=cwd, timeout=remaining)
        self._ran.append(_Ran(label, result, explain))
        return result

    def describe(self, ran: _Ran) -> str:
        """``kubectl rollout undo deployment/x: exit 1: error: ... not found``."""
        result = ran.result
        if result.timed_out and result.error is None:
            # The process timeout is only what was left; the spec's timeout is what to tune.
            outcome = f"timed out ({format_seconds(self._timeout)} in all); process group killed"
        else:
            outcome = result.summary()
        text = f"{ran.label}: {outcome}"
        why = "" if result.ok else ran.explain(result)
        return self._redact(f"{text}: {why}" if why else text)

    def last_failure(self) -> str:
        """The description of the last program that failed ("" if none did)."""
        for ran in reversed(self._ran):
            if not ran.result.ok:
                return self.describe(ran)
        return ""

    def result(self, *, ok: bool | None = None, summary: str | None = None) -> StepResult:
        """Everything run so far as one result; ``ok`` defaults to "every program succeeded",
        ``summary`` to each program's description, joined by ``"; "``."""
        if ok is None:
            ok = bool(self._ran) and all(ran.result.ok for ran in self._ran)
        if summary is None:
            summary = "; ".join(self.describe(ran) for ran in self._ran)
        command: list[str] = []
        for ran in self._ran:
            if command:
                # The next program ran only because the one before succeeded.
                command.append("&&")
            command.extend(ran.result.argv)
        return StepResult(
            ok=ok,
            summary=self._redact(summary),
            stdout_tail=self._redact(self._tails(lambda r: r.stdout_tail)),
            stderr_tail=self._redact(self._tails(lambda r: r.stderr_tail)),
            duration=time.monotonic() - self._started,
            timed_out=any(ran.result.timed_out for ran in self._ran),
            command=tuple(self._redact(arg) for arg in command),
        )

    def failure(self, summary: str) -> StepResult:
        """A failure that is not a program's (nothing matched, a path outside the repository)."""
        return self.result(ok=False, summary=summary)

    def _tails(self, pick: Callable[[ProcessResult], str]) -> str:
        if len(self._ran) == 1:
            return pick(self._ran[0].result)
        # Several programs: each tail under the command that wrote it, newest last, and the
        # whole cut to the size one program's tail may have.
        parts: list[str] = []
        for ran in self._ran:
            text = pick(ran.result)
            if text:
                parts.append(f"$ {shlex.join(ran.result.argv)}\n{text}")
                if not text.endswith("\n"):
                    parts.append("\n")
        return "".join(parts)[-DEFAULT_TAIL_BYTES:]
