"""``probe``: how many blackbox probes fail (``probe_success == 0``), or targets are down
(``metric = "up"``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field

from rollbackd.checks.base import (
    CheckSpec,
    Comparison,
    Matchers,
    MetricName,
    Query,
    Threshold,
    series,
)


class ProbeCheck(CheckSpec):
    type: Literal["probe"]
    metric: MetricName = Field(
        default="probe_success", description='"probe_success" (blackbox) or "up" (scrape targets)'
    )
    selector: Matchers = ""
    above: float = Field(default=0, ge=0, description="failing probes allowed")

    def threshold(self) -> Threshold:
        return Threshold(Comparison.ABOVE, self.above)

    def queries(self, by: str | None = None, *, window_cap: timedelta | None = None) -> list[Query]:
        """An instant query: it has no range window, so ``window_cap`` changes nothing."""
        # `== bool 0` counts failures and keeps an answer (0) while all pass; no
        # series at all stays an empty answer, which is "no data", not "healthy".
        # Probes do not carry the service's version, so `by` does not apply.
        return [Query("value", f"sum({series(self.metric, self.selector)} == bool 0)")]

    def value_name(self) -> str:
        return "failing targets" if self.metric == "up" else "failing probes"

    def format_value(self, value: float) -> str:
        return f"{value:g}"
