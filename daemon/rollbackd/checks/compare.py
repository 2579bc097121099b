"""``compare``: is the new version worse than its baseline? Judged by a sequential test on
counts (``core/sequential.py``) rather than a threshold.

The counts are bad requests (errors, or requests slower than a histogram bucket) and all
requests, counted since the judged version went live:

- during a canary, split by the service's ``version_label`` into the canary's arm and the
  stable track's arm, counted over the same time (the concurrent test);
- otherwise the judged version's counts since the release against the service's counts in
  ``baseline_window`` just before it (the history test).

The baseline window's per-minute counts also measure how bursty the bad requests are (the
dispersion), which widens the test so that bursts are not taken for a regression.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, model_validator

from rollbackd.checks.base import (
    CheckSpec,
    DetectionTime,
    Matchers,
    MetricName,
    Query,
    Span,
    Threshold,
    series,
    sum_by,
)
from rollbackd.core.durations import Duration, Fraction, Seconds, format_duration

BLOCK = "1m"
"""The time block the dispersion is measured in."""
BLOCK_SECONDS = 60.0


def counted_until(span: Span) -> float:
    """The end of the last whole block: the counts are judged up to there, so that every
    bad request counted is in a block the dispersion has seen. A burst in the minute still
    running is judged, with its block, when the minute is over."""
    return math.floor(span.now / BLOCK_SECONDS) * BLOCK_SECONDS


def _bucket_bound(value: float) -> str:
    """A regular expression (in a PromQL string) matching the ``le`` label of the bucket
    bound ``value`` however the client library wrote it: ``0.5``, or ``1`` and ``1.0``."""
    texts = [f"{value:g}", repr(value)]
    if value == int(value):
        texts += [str(int(value)), f"{int(value)}.0"]
    unique = dict.fromkeys(t.replace(".", "\\\\.") for t in texts)
    return "|".join(unique)


class CompareCheck(CheckSpec):
    type: Literal["compare"]
    groups_by_version: ClassVar[bool] = True
    counts_since_release: ClassVar[bool] = True
    metric: MetricName = Field(
        default="http_requests_total",
        description="the request counter, or the histogram's base name with slower_than",
    )
    selector: Matchers = ""
    errors: Matchers | None = Field(
        default=None, description='matchers that pick the failed requests: code=~"5.."'
    )
    slower_than: Seconds | None = Field(
        default=None, description="count requests slower than this histogram bucket bound"
    )
    worse_by: Fraction = Field(
        default=0.2, description="the smallest regression worth a rollback, 20% by default"
    )
    confidence: float = Field(
        default=0.99,
        gt=0.5,
        lt=1,
        description="at most 1 - confidence of healthy releases are ever rolled back",
    )
    baseline_window: Duration = Field(
        default=timedelta(hours=1),
        description="the window before the release that is the baseline outside a canary",
    )
    min_rate: float = Field(default=0.0, ge=0, description="requests/s below which no verdict")

    @model_validator(mode="before")
    @classmethod
    def _no_max_increase(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("max_increase") is not None:
            raise ValueError(
                "a compare check says how much worse is too much with 'worse_by', "
                "not 'max_increase'"
            )
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if (self.errors is None) == (self.slower_than is None):
            raise ValueError(
                "set 'errors' (matchers of failed requests) or 'slower_than' (a histogram "
                "bucket bound), exactly one of them"
            )
        if self.slower_than is not None:
            if self.metric.endswith("_bucket"):
                raise ValueError(
                    "with slower_than, metric is the histogram's base name: use "
                    f"{self.metric.removesuffix('_bucket')!r}"
                )
            if not math.isfinite(self.slower_than) or self.slower_than <= 0:
                raise ValueError("slower_than must be a finite bucket bound above zero")
        if self.baseline_window < timedelta(minutes=2):
            raise ValueError("baseline_window must be at least 2m (two blocks of 1m)")
        return self

    @property
    def consecutive_breaches(self) -> int:
        """One: the test's evidence is cumulative and its bound already holds at every
        look, so waiting for more breaching evaluations adds delay, not safety."""
        return self.breaches if self.breaches is not None else 1

    @property
    def alpha(self) -> float:
        return 1 - self.confidence

    def threshold(self) -> Threshold | None:
        return None

    # -- PromQL ---------------------------------------------------------------------

    def _counts(self, by: str | None, window: str, at: str = "") -> tuple[str, str]:
        """(bad requests, all requests) over ``window`` ending ``at`` (an ``@`` modifier,
        or empty: the evaluation's moment)."""
        if self.slower_than is None:
            requests = sum_by(by, f"increase({series(self.metric, self.selector)}[{window}]{at})")
            errors = self.errors or ""
            failed = sum_by(
                by, f"increase({series(self.metric, self.selector, errors)}[{window}]{at})"
            )
            # No failed request at all may mean no error series: that is 0, not no answer.
            return f"({failed} or 0 * {requests})", requests
        requests = sum_by(
            by, f"increase({series(self.metric + '_count', self.selector)}[{window}]{at})"
        )
        bound = f'le=~"{_bucket_bound(self.slower_than)}"'
        fast = sum_by(
            by,
            f"increase({series(self.metric + '_bucket', self.selector, bound)}[{window}]{at})",
        )
        return f"({requests} - {fast})", requests

    def _blocks(self, by: str | None, window: str, at: str) -> tuple[str, str]:
        """(Pearson's statistic, number of blocks) of the 1m blocks of ``window``: with p the
        blocks' own ratio, sum((bad - p req)^2 / (p req)) = sum(bad^2 / req) / p - sum(bad).
        No bad request in the window divides by zero: no answer, and nothing is learned."""

        def over(expr: str) -> str:
            return f"sum_over_time(({expr})[{window}:{BLOCK}]{at})"

        bad, requests = self._counts(by, BLOCK)
        squares = over(f"{bad} ^ 2 / ({requests} > 0)")
        statistic = f"({squares} * {over(requests)} / {over(bad)} - {over(bad)})"
        return statistic, f"count_over_time(({requests} > 0)[{window}:{BLOCK}]{at})"

    def _queries(self, by: str | None, since: str, at: str, baseline_at: str) -> list[Query]:
        """The judged arms' counts since the release (grouped by version), the baseline
        window's totals, and for the baseline window and for each arm since the release the
        Pearson statistic of its 1m blocks and their number (the dispersion, added up by
        Prometheus)."""
        bad, requests = self._counts(by, since, at)
        window = format_duration(self.baseline_window)
        base_bad, base_requests = self._counts(None, window, baseline_at)
        spread, blocks = self._blocks(None, window, baseline_at)
        recent_spread, recent_blocks = self._blocks(by, since, at)
        return [
            Query("bad", bad),
            Query("requests", requests),
            Query("baseline bad", base_bad),
            Query("baseline requests", base_requests),
            Query("blocks", spread),
            Query("block count", blocks),
            Query("recent blocks", recent_spread),
            Query("recent block count", recent_blocks),
        ]

    def queries(self, by: str | None = None, *, window_cap: timedelta | None = None) -> list[Query]:
        """The queries' shape, for ``rollbackd check``: each evaluation fills in the time
        since the release and the release's moment (``queries_since``)."""
        return self._queries(
            by, "<since the release>", " @ <the last whole minute>", " @ <the release>"
        )

    def queries_since(self, span: Span, by: str | None = None) -> list[Query]:
        until = counted_until(span)
        counted = max(1, math.floor(until - span.since))
        return self._queries(by, f"{counted}s", f" @ {until:.3f}", f" @ {span.baseline_until:.3f}")

    # -- words ----------------------------------------------------------------------

    def value_name(self) -> str:
        if self.slower_than is None:
            return "error ratio"
        bound = self.slower_than
        return (
            f"share slower than {bound * 1000:.0f}ms"
            if bound < 1
            else f"share slower than {bound:g}s"
        )

    def format_value(self, value: float) -> str:
        return f"{value:.2%}"

    def detection_time(self) -> DetectionTime:
        return DetectionTime(
            self.interval,
            timedelta(0),
            f"none: fires as soon as the evidence for worse reaches {1 / self.alpha:.0f}:1, "
            f"looked at every {format_duration(self.interval)}",
            None,
            bounded=False,
        )
