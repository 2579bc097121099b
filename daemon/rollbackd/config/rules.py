"""The rule file: one service, how to judge it, and how to put its previous version back."""

from __future__ import annotations

from datetime import timedelta
from typing import Self

from pydantic import Field, field_validator, model_validator

from rollbackd.checks import Check
from rollbackd.checks.base import Action, LabelName, Matchers, Name, PromQL
from rollbackd.config.strict import Strict
from rollbackd.core.durations import Duration
from rollbackd.core.matchers import MatcherError, parse_matchers
from rollbackd.executors import Executor


class ServiceSection(Strict):
    name: Name
    version_query: str | None = Field(
        default=None, description="PromQL whose answer carries the running version as a label"
    )
    version_label: LabelName | None = Field(
        default=None,
        description="the label that carries the version on the checks' metrics; checks then "
        "judge the current version by its own series",
    )
    rollback_window: Duration = timedelta(hours=1)
    bake_time: Duration = timedelta(minutes=10)

    @property
    def version_query_label(self) -> str:
        """The label of version_query's answer that names the version."""
        return self.version_label or "version"


class CanarySection(Strict):
    active_query: PromQL = Field(
        min_length=1,
        description="PromQL: a non-empty, non-zero answer means a canary is in progress",
    )
    abort: list[Executor] = Field(min_length=1)


class VerifySection(Strict):
    window: Duration = timedelta(minutes=2)
    version_timeout: Duration = Field(
        default=timedelta(minutes=5),
        description="how long version_query may take to read to_version",
    )


class AlertMapping(Strict):
    alertname: str = Field(min_length=1)
    matchers: list[Matchers] = Field(
        default_factory=list, description="label matchers the alert must also satisfy"
    )

    @field_validator("matchers")
    @classmethod
    def _readable(cls, matchers: list[str]) -> list[str]:
        for text in matchers:
            try:
                parse_matchers(text)
            except MatcherError as exc:
                raise ValueError(str(exc)) from None
        return matchers


class RuleFile(Strict):
    service: ServiceSection
    canary: CanarySection | None = None
    rollback: list[Executor] = Field(default_factory=list)
    verify: VerifySection = VerifySection()
    check: list[Check] = Field(default_factory=list)
    alert: list[AlertMapping] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [check.name for check in self.check]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"check names must be unique in a service: {', '.join(duplicates)}")
        rolls_back = self.alert or any(c.action is Action.ROLLBACK for c in self.check)
        if rolls_back and not self.rollback:
            raise ValueError(
                "a service whose checks or alerts may roll it back needs at least one "
                '[[rollback]] executor (or set action = "notify" on its checks)'
            )
        if not self.check and not self.alert:
            raise ValueError("a service needs at least one [[check]] or [[alert]]")
        return self

    @property
    def version_scope(self) -> str | None:
        """The label the checks group by, when judging each version by its own series."""
        return self.service.version_label
