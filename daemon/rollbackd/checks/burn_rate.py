"""``burn_rate``: multiwindow, multi-burn-rate SLO alerting (the Google SRE workbook's
recipe, as Sloth and Pyrra generate it).

Burn rate = error ratio / error budget (1 - objective). A tier fires when both its long
and its short window burn faster than the tier's factor: the long window proves the burn
is significant, the short one that it is still happening.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timedelta
from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from rollbackd.checks.base import (
    CheckSpec,
    Matchers,
    MetricName,
    Query,
    Reading,
    Threshold,
    capped,
    ratio,
)
from rollbackd.config.strict import Strict
from rollbackd.core.durations import Duration, format_duration
from rollbackd.core.samples import Labels, QueryResult

# (long window, short window, share of the period's error budget spent in the long window)
_DEFAULT_TIERS = (
    (timedelta(hours=1), timedelta(minutes=5), 0.02),
    (timedelta(hours=6), timedelta(minutes=30), 0.05),
)


class BurnTier(Strict):
    long: Duration
    short: Duration
    factor: float = Field(gt=0, description="burn rate above which this tier fires, 14.4 say")

    @model_validator(mode="after")
    def _short_within_long(self) -> Self:
        if self.short >= self.long:
            raise ValueError("the short window must be shorter than the long one")
        return self

    @property
    def label(self) -> str:
        return f"{format_duration(self.long)}/{format_duration(self.short)}"


def _objective(value: object) -> object:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f'expected a ratio such as 0.999 or "99.9%", got: {value!r}') from None
    return value


class BurnRateCheck(CheckSpec):
    type: Literal["burn_rate"]
    groups_by_version: ClassVar[bool] = True
    metric: MetricName = "http_requests_total"
    selector: Matchers = ""
    errors: Matchers
    objective: float = Field(gt=0, lt=1, description='the SLO, 0.999 or "99.9%"')
    period: Duration = timedelta(days=30)
    tiers: list[BurnTier] | None = Field(
        default=None,
        min_length=1,
        description="default: 1h/5m at 14.4x and 6h/30m at 6x, scaled to `period`",
    )

    @model_validator(mode="before")
    @classmethod
    def _percent_objective(cls, data: object) -> object:
        if isinstance(data, dict) and "objective" in data:
            data = {**data, "objective": _objective(data["objective"])}
        return data

    @model_validator(mode="after")
    def _tiers_within_period(self) -> Self:
        for tier in self.effective_tiers():
            if tier.long > self.period:
                raise ValueError(f"tier {tier.label} is longer than the period")
        return self

    @property
    def budget(self) -> float:
        return 1 - self.objective

    def effective_tiers(self) -> list[BurnTier]:
        if self.tiers:
            return self.tiers
        return [
            BurnTier.model_construct(
                long=long, short=short, factor=round(share * (self.period / long), 4)
            )
            for long, short, share in _DEFAULT_TIERS
        ]

    def threshold(self) -> Threshold | None:
        return None

    def windows(self) -> list[timedelta]:
        found: list[timedelta] = []
        for tier in self.effective_tiers():
            for window in (tier.long, tier.short):
                if window not in found:
                    found.append(window)
        return found

    def queries(self, by: str | None = None, *, window_cap: timedelta | None = None) -> list[Query]:
        # The role keeps the configured window: ``read`` finds each tier's long and short
        # answers by it, even when the cap makes both windows the same length.
        return [
            Query(
                f"burn {format_duration(window)}",
                f"{ratio(self.metric, self.selector, self.errors, capped(window, window_cap), by)}"
                f" / {self.budget:g}",
            )
            for window in self.windows()
        ]

    def rate_window(self) -> timedelta:
        # Worst case: the tier with the shortest long window must see its long window
        # burn past the factor.
        return min(tier.long for tier in self.effective_tiers())

    def read(self, results: Mapping[str, QueryResult]) -> dict[Labels, Reading]:
        """Per series: each tier burns when its long AND short windows are both above its
        factor. The value is the worst tier's severity: min(long, short) / factor, so a value
        above 1 means that tier fires."""
        burns: dict[Labels, dict[timedelta, float]] = {}
        for window in self.windows():
            for sample in results[f"burn {format_duration(window)}"].samples:
                burns.setdefault(sample.labels, {})[window] = sample.value
        readings: dict[Labels, Reading] = {}
        for labels, by_window in burns.items():
            worst: tuple[float, str] | None = None
            for tier in self.effective_tiers():
                long, short = (
                    by_window.get(tier.long, math.nan),
                    by_window.get(tier.short, math.nan),
                )
                if math.isnan(long) or math.isnan(short):
                    continue
                severity = min(long, short) / tier.factor
                text = (
                    f"burn {long:.3g}x over {format_duration(tier.long)} and {short:.3g}x over "
                    f"{format_duration(tier.short)} against {tier.factor:g}x"
                )
                if worst is None or severity > worst[0]:
                    worst = (severity, text)
            if worst is None:
                readings[labels] = Reading(math.nan, detail="no burn rate in some window")
            else:
                readings[labels] = Reading(worst[0], breach=worst[0] > 1, detail=worst[1])
        return readings

    def value_name(self) -> str:
        return "burn severity"
