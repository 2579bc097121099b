"""What every executor shares: its spec's common keys, what it is given, what it returns.

An executor is one way of putting the previous version back (a command, an HTTP call,
kubectl, helm, ...). Each type is one module in this package holding its spec (the keys of a
``[[rollback]]`` or ``[canary] abort`` entry) and its runner, a subclass of
:class:`Executor`. The pipeline only ever sees :class:`Executor` and :class:`StepResult`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import timedelta
from typing import Generic, Self, TypeVar

from pydantic import model_validator

from rollbackd.config.strict import Strict
from rollbackd.core.durations import Duration
from rollbackd.core.version_names import is_valid_version
from rollbackd.executors.placeholders import check_templates


class ExecutorSpec(Strict):
    timeout: Duration = timedelta(minutes=5)

    def templates(self) -> list[str]:
        """Every text in this spec that may hold placeholders."""
        return []

    def needs_target(self) -> bool:
        """Whether this executor needs a ``to_version`` (``kubectl rollout undo`` does not)."""
        return any("{to_version}" in text for text in self.templates())

    @model_validator(mode="after")
    def _known_placeholders(self) -> Self:
        problem = check_templates(self.templates())
        if problem:
            raise ValueError(problem)
        return self


class UnsafeValueError(ValueError):
    """A placeholder value failed its check; nothing was run."""


@dataclass(frozen=True)
class RollbackContext:
    """What an executor is told about the rollback it performs."""

    service: str
    from_version: str | None
    to_version: str | None
    reason: str
    rollback_id: str
    canary: bool = False
    fencing_token: int | None = None
    """The lease epoch the rollback runs under (it only grows), so that a deploy tool
    keeping its own state can refuse a writer older than the last it saw; None with no
    lease (one daemon alone): an empty placeholder."""

    def check(self) -> None:
        """Refuse versions that could steer a path or an argument somewhere unintended."""
        for name, value in (("from_version", self.from_version), ("to_version", self.to_version)):
            # Versions come from metric and alert labels: outside input.
            if value is not None and not is_valid_version(value):
                raise UnsafeValueError(f"{name} {value[:64]!r} is not a safe version string")

    def placeholders(self) -> dict[str, str]:
        return {
            "service": self.service,
            "from_version": self.from_version or "",
            "to_version": self.to_version or "",
            "reason": self.reason,
            "rollback_id": self.rollback_id,
            "canary": "true" if self.canary else "false",
            "fencing_token": "" if self.fencing_token is None else str(self.fencing_token),
        }

    def environment(self) -> dict[str, str]:
        """``ROLLBACKD_SERVICE``, ``ROLLBACKD_TO_VERSION``, ..., ``ROLLBACKD_FENCING_TOKEN``:
        the placeholders as variables."""
        return {f"ROLLBACKD_{key.upper()}": value for key, value in self.placeholders().items()}


@dataclass(frozen=True)
class StepResult:
    """The outcome of one executor run, as it goes into the audit record."""

    ok: bool
    summary: str
    """One line: ``exit 0``, ``HTTP 202``, ``timed out after 5m, process group killed``."""
    stdout_tail: str = ""
    stderr_tail: str = ""
    duration: float = 0.0
    timed_out: bool = False
    command: tuple[str, ...] = ()
    """The argv that ran (or ``("POST", url)``), for the audit record; secrets never."""


SpecT = TypeVar("SpecT", bound=ExecutorSpec)


class Executor(abc.ABC, Generic[SpecT]):
    """Runs one spec. ``run`` never raises for an ordinary failure: it returns
    ``StepResult(ok=False, ...)`` with the reason; only a bug raises."""

    def __init__(self, spec: SpecT) -> None:
        self.spec = spec

    @abc.abstractmethod
    async def run(self, context: RollbackContext) -> StepResult: ...

    def describe(self) -> str:
        """A short name for logs and the audit record: ``command /usr/local/bin/deploy``."""
        return str(getattr(self.spec, "type", type(self.spec).__name__))
