"""What every check type shares: the common keys, thresholds, and the PromQL helpers.

A check type is one module in this package holding one model (a subclass of
:class:`CheckSpec`) that knows how to turn itself into PromQL
(:meth:`CheckSpec.queries`). Judging the answers is the evaluator's job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, ClassVar, Self

from pydantic import AfterValidator, Field, model_validator

from rollbackd.config.strict import Strict
from rollbackd.core.check_state import OnMissing, Policy
from rollbackd.core.durations import Duration, Fraction, format_duration
from rollbackd.core.samples import Labels, QueryResult

DEFAULT_BREACHES = 3
"""Consecutive breaching evaluations needed when a check sets neither ``for`` nor ``breaches``:
one bad scrape must never roll a release back."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_METRIC = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_STRING = r'"(?:[^"\\\n]|\\.)*"'
_MATCHER = rf"\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(?:=~|!~|!=|=)\s*{_STRING}\s*"
_MATCHERS = re.compile(rf"(?:{_MATCHER}(?:,{_MATCHER})*,?\s*)?")


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"must be 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit, "
            f"got: {value!r}"
        )
    return value


def _metric(value: str) -> str:
    if not _METRIC.fullmatch(value):
        raise ValueError(f"not a Prometheus metric name: {value!r}")
    return value


def _label(value: str) -> str:
    if not _LABEL.fullmatch(value):
        raise ValueError(f"not a Prometheus label name: {value!r}")
    return value


def _matchers(value: str) -> str:
    if not _MATCHERS.fullmatch(value):
        raise ValueError(
            "expected label matchers separated by commas, such as "
            f'\'service="checkout", code=~"5.."\' (without braces), got: {value!r}'
        )
    return value.strip().rstrip(",").strip()


def _promql(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a PromQL expression, not blank")
    return value


Name = Annotated[str, AfterValidator(_name)]
PromQL = Annotated[str, AfterValidator(_promql)]
"""A PromQL expression as its author wrote it: run as written, never blank."""
MetricName = Annotated[str, AfterValidator(_metric)]
LabelName = Annotated[str, AfterValidator(_label)]
Matchers = Annotated[str, AfterValidator(_matchers)]
"""Label matchers as written inside ``{...}``: ``'service="checkout", code=~"5.."'``."""


class Action(StrEnum):
    ROLLBACK = "rollback"
    NOTIFY = "notify"


class Direction(StrEnum):
    """Which way a relative change (``max_increase``) is bad."""

    INCREASE = "increase"
    DECREASE = "decrease"


class Comparison(StrEnum):
    ABOVE = "above"
    BELOW = "below"


@dataclass(frozen=True)
class Threshold:
    comparison: Comparison
    value: float

    def breached_by(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.comparison is Comparison.ABOVE:
            return value > self.value
        return value < self.value

    def __str__(self) -> str:
        return f"{'>' if self.comparison is Comparison.ABOVE else '<'} {self.value:g}"


@dataclass(frozen=True)
class Query:
    """One PromQL expression a check runs each evaluation, and what its answer means."""

    role: str
    """``value`` (compared with the threshold), ``traffic`` (requests/s for ``min_rate``),
    or a burn-rate window such as ``burn 1h``."""
    expr: str


@dataclass(frozen=True)
class DetectionTime:
    """The longest a check can take to fire after a release goes bad."""

    interval: timedelta
    hold: timedelta
    """``for``, or the extra evaluations that ``breaches`` needs."""
    hold_text: str
    window: timedelta | None
    """The rate window that must fill with bad samples before the condition is true."""
    bounded: bool = True
    """False for a sequential test, which fires when its evidence is strong enough: then
    ``hold_text`` says so instead of a worst case."""

    @property
    def total(self) -> timedelta:
        return self.interval + self.hold + (self.window or timedelta(0))

    def __str__(self) -> str:
        if not self.bounded:
            return self.hold_text
        parts = [self.hold_text]
        if self.window is not None:
            parts.append(f"rate window {format_duration(self.window)}")
        return f"{format_duration(self.total)} ({' + '.join(parts)})"


@dataclass(frozen=True)
class Span:
    """The stretch of time a ``compare`` check counts over: since the judged version went
    live (a canary: since it started), against the baseline window that ends at
    ``baseline_until``."""

    since: float
    """When the judged version went live (epoch seconds)."""
    now: float
    """The evaluation's moment."""
    baseline_until: float
    """The end of the baseline window: the release itself, or, when a rollback is being
    verified, the release that was rolled back (the target's own time before it)."""

    @classmethod
    def since_release(cls, since: float, now: float) -> Span:
        """Since the release at ``since``, against the window just before it."""
        return cls(since, now, since)


@dataclass(frozen=True)
class Reading:
    """One series' answer, read out of a check's query results, before judging."""

    value: float
    """NaN when there is nothing to judge."""
    traffic: float | None = None
    """Requests/s behind the value, for ``min_rate``."""
    breach: bool | None = None
    """A type's own verdict where a single threshold does not fit (burn-rate tiers);
    ``None`` means: compare ``value`` with the threshold."""
    detail: str = ""
    """Words for what was measured, where the value alone does not say it."""


def series(metric: str, *matchers: str) -> str:
    """``metric{a, b}``, leaving out empty matcher lists."""
    inside = ", ".join(m for m in matchers if m)
    return f"{metric}{{{inside}}}" if inside else metric


def sum_by(by: str | None, expr: str) -> str:
    return f"sum by ({by}) ({expr})" if by else f"sum({expr})"


def capped(window: timedelta, cap: timedelta | None) -> timedelta:
    """A range window no longer than ``cap`` (``None``: the window as configured)."""
    return window if cap is None else min(window, cap)


def ratio(metric: str, selector: str, errors: str, window: timedelta, by: str | None) -> str:
    """Error requests over all requests. Where no request failed the error series may not
    exist at all; ``or 0 * total`` turns that into 0 instead of an empty answer."""
    w = format_duration(window)
    total = sum_by(by, f"rate({series(metric, selector)}[{w}])")
    failed = sum_by(by, f"rate({series(metric, selector, errors)}[{w}])")
    return f"({failed} or 0 * {total}) / {total}"


class CheckSpec(Strict):
    """The keys every ``[[check]]`` has, whatever its type."""

    name: Name
    description: str = ""
    interval: Duration = timedelta(seconds=15)
    for_: Duration | None = Field(default=None, alias="for")
    breaches: int | None = Field(default=None, ge=1, le=1000)
    on_no_data: OnMissing = OnMissing.IGNORE
    on_error: OnMissing = OnMissing.IGNORE
    action: Action = Action.ROLLBACK
    max_increase: Fraction | None = None
    """Also breach when this much worse than the baseline (the stable track while a canary
    runs, else the last known good version)."""
    direction: Direction = Direction.INCREASE

    groups_by_version: ClassVar[bool] = False
    """Whether the type's queries split by the service's version label (``queries(by)``)."""
    counts_since_release: ClassVar[bool] = False
    """Whether the type's queries depend on when the version went live
    (``queries_since``), so that they are built afresh for every evaluation."""

    @model_validator(mode="after")
    def _for_or_breaches(self) -> Self:
        if self.for_ is not None and self.breaches is not None:
            raise ValueError("set either 'for' or 'breaches', not both")
        return self

    @property
    def consecutive_breaches(self) -> int:
        """Breaching evaluations needed to fire when no ``for`` is set."""
        return self.breaches if self.breaches is not None else DEFAULT_BREACHES

    def policy(self, *, blind_after: int = 3, error_hold: int = 3) -> Policy:
        """The state machine's share of this check's settings."""
        return Policy(
            for_=self.for_,
            breaches=self.consecutive_breaches,
            on_no_data=self.on_no_data,
            on_error=self.on_error,
            blind_after=blind_after,
            error_hold=error_hold,
        )

    def threshold(self) -> Threshold | None:
        """The absolute threshold, if the type has one (burn-rate checks have tiers)."""
        raise NotImplementedError

    def queries(self, by: str | None = None, *, window_cap: timedelta | None = None) -> list[Query]:
        """The PromQL this check runs; ``by`` is the service's version label, which splits
        the answer per version so the current version is judged by its own series.

        ``window_cap`` shortens every range window of the check to at most that long.
        Verification passes the time since the switch, so that a rolled-back release's
        requests, still inside a whole-service rate window, are not judged against the
        version now live. ``None`` (every other caller) keeps the windows as configured."""
        raise NotImplementedError

    def queries_since(self, span: Span, by: str | None = None) -> list[Query]:
        """The PromQL for one evaluation, for types that count since the release."""
        raise NotImplementedError

    def rate_window(self) -> timedelta | None:
        return None

    def read(self, results: Mapping[str, QueryResult]) -> dict[Labels, Reading]:
        """Each series of the ``value`` query, with the ``traffic`` of the same series."""
        traffic = (
            {s.labels: s.value for s in results["traffic"].samples}
            if ("traffic" in results)
            else {}
        )
        return {
            sample.labels: Reading(sample.value, traffic.get(sample.labels))
            for sample in results["value"].samples
        }

    def value_name(self) -> str:
        """What the value is, in words, for explanations."""
        return "value"

    def format_value(self, value: float) -> str:
        return f"{value:.4g}"

    def detection_time(self) -> DetectionTime:
        if self.for_ is not None:
            # Pending at the first breaching evaluation, firing at the first one
            # at least `for` later.
            steps = math.ceil(self.for_ / self.interval)
            hold = self.interval * steps
            hold_text = (
                f"interval {format_duration(self.interval)} + for {format_duration(self.for_)}"
            )
        else:
            hold = self.interval * (self.consecutive_breaches - 1)
            hold_text = (
                f"{self.consecutive_breaches} breaches x interval {format_duration(self.interval)}"
            )
        return DetectionTime(self.interval, hold, hold_text, self.rate_window())
