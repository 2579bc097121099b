"""What Prometheus answered, as typed values: the shared language of the client, the
evaluator and the state machine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

Labels = tuple[tuple[str, str], ...]
"""A series' labels, sorted by name: hashable, so it can key per-series state."""


def labels_of(mapping: dict[str, str]) -> Labels:
    return tuple(sorted(mapping.items()))


def format_labels(labels: Labels) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in labels) + "}"


class ResultType(StrEnum):
    VECTOR = "vector"
    SCALAR = "scalar"
    MATRIX = "matrix"


@dataclass(frozen=True)
class Sample:
    """One value of one series. ``value`` may be NaN or +-Inf, as Prometheus sends them."""

    labels: Labels
    value: float
    timestamp: float

    @property
    def is_nan(self) -> bool:
        return math.isnan(self.value)

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)


@dataclass(frozen=True)
class Series:
    """A range query's series: its samples in time order."""

    labels: Labels
    samples: tuple[tuple[float, float], ...]
    """(timestamp, value) pairs."""


@dataclass(frozen=True)
class QueryResult:
    """An instant query's answer. Empty ``samples`` means Prometheus found no series."""

    expr: str
    result_type: ResultType
    samples: tuple[Sample, ...]
    warnings: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not self.samples


@dataclass(frozen=True)
class RangeResult:
    expr: str
    series: tuple[Series, ...]


class Verdict(StrEnum):
    """What one evaluation of one series says. Kept apart on purpose: only BREACH (or a
    check's explicit ``on_no_data``/``on_error = "breach"``) can ever fire a check."""

    OK = "ok"
    BREACH = "breach"
    NO_DATA = "no_data"
    """Empty answer, NaN, or traffic below ``min_rate``: nothing to judge."""
    ERROR = "error"
    """The query failed: Prometheus down, hung, overloaded, or the answer was garbage."""
