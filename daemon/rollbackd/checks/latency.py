"""``latency``: a quantile of a Prometheus histogram, in seconds."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Annotated, ClassVar, Literal, Self

from pydantic import AfterValidator, Field, model_validator

from rollbackd.checks.base import (
    CheckSpec,
    Comparison,
    Matchers,
    MetricName,
    Query,
    Threshold,
    capped,
    series,
    sum_by,
)
from rollbackd.core.durations import Duration, Seconds, format_duration


def _bound(value: float) -> float:
    if math.isnan(value):
        raise ValueError("a bucket bound is a number or inf, not nan")
    return value


Bound = Annotated[float, Field(allow_inf_nan=True), AfterValidator(_bound)]
"""A histogram's bucket bound: the last one is +Inf."""


class LatencyCheck(CheckSpec):
    type: Literal["latency"]
    groups_by_version: ClassVar[bool] = True
    metric: MetricName = Field(description="the histogram's base name, without _bucket")
    selector: Matchers = ""
    quantile: float = Field(default=0.99, gt=0, lt=1)
    above: Seconds
    window: Duration = timedelta(minutes=1)
    min_rate: float = Field(default=0.0, ge=0)
    buckets: list[Bound] | None = Field(
        default=None,
        description="the histogram's bucket bounds, when known, so `rollbackd check` can "
        "reject a threshold the quantile can never exceed",
    )

    @model_validator(mode="after")
    def _threshold_within_buckets(self) -> Self:
        if self.metric.endswith("_bucket"):
            raise ValueError(
                f"metric is the histogram's base name: use {self.metric.removesuffix('_bucket')!r}"
            )
        if self.buckets:
            finite = [b for b in self.buckets if b != float("inf")]
            if finite and self.above >= max(finite):
                # histogram_quantile never reads above the largest finite bound.
                raise ValueError(
                    f"above = {self.above:g}s can never be exceeded: the largest finite bucket "
                    f"of {self.metric} is {max(finite):g}s, and histogram_quantile never "
                    "reports more"
                )
        return self

    def threshold(self) -> Threshold:
        return Threshold(Comparison.ABOVE, self.above)

    def queries(self, by: str | None = None, *, window_cap: timedelta | None = None) -> list[Query]:
        w = format_duration(capped(self.window, window_cap))
        group = f"le, {by}" if by else "le"
        buckets = f"sum by ({group}) (rate({series(self.metric + '_bucket', self.selector)}[{w}]))"
        count = sum_by(by, f"rate({series(self.metric + '_count', self.selector)}[{w}])")
        return [
            Query("value", f"histogram_quantile({self.quantile:g}, {buckets})"),
            Query("traffic", count),
        ]

    def rate_window(self) -> timedelta:
        return self.window

    def value_name(self) -> str:
        return f"p{self.quantile * 100:g} latency"

    def format_value(self, value: float) -> str:
        return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.3g}s"
