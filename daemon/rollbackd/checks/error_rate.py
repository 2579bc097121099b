"""``error_rate``: error requests over all requests, ignored below ``min_rate``."""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar, Literal

from pydantic import Field

from rollbackd.checks.base import (
    CheckSpec,
    Comparison,
    Matchers,
    MetricName,
    Query,
    Threshold,
    capped,
    ratio,
    series,
    sum_by,
)
from rollbackd.core.durations import Duration, format_duration


class ErrorRateCheck(CheckSpec):
    type: Literal["error_rate"]
    groups_by_version: ClassVar[bool] = True
    metric: MetricName = "http_requests_total"
    selector: Matchers = ""
    errors: Matchers = Field(description='matchers that pick the failed requests: code=~"5.."')
    above: float = Field(gt=0, lt=1, description="the error ratio, 0.05 for 5%")
    window: Duration = timedelta(minutes=1)
    min_rate: float = Field(default=0.0, ge=0, description="requests/s below which no verdict")

    def threshold(self) -> Threshold:
        return Threshold(Comparison.ABOVE, self.above)

    def queries(self, by: str | None = None, *, window_cap: timedelta | None = None) -> list[Query]:
        window = capped(self.window, window_cap)
        traffic = sum_by(
            by, f"rate({series(self.metric, self.selector)}[{format_duration(window)}])"
        )
        return [
            Query("value", ratio(self.metric, self.selector, self.errors, window, by)),
            Query("traffic", traffic),
        ]

    def rate_window(self) -> timedelta:
        return self.window

    def value_name(self) -> str:
        return "error ratio"

    def format_value(self, value: float) -> str:
        return f"{value:.2%}"
