"""What every executor spec shares.

An executor is one way of putting the previous version back (a command, an HTTP
call, kubectl, helm, ...). Each type is one module in this package holding its
spec (the keys of a ``[[rollback]]`` or ``[canary] abort`` entry).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Self

from pydantic import model_validator

from rollbackd.durations import Duration
from rollbackd.placeholders import check_templates
from rollbackd.strict import Strict


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
