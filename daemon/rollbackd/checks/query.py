"""``query``: any PromQL, scalar or vector, compared ``above`` or ``below`` a number."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal, Self

from pydantic import Field, model_validator

from rollbackd.checks.base import CheckSpec, Comparison, PromQL, Query, Threshold


class QueryCheck(CheckSpec):
    type: Literal["query"]
    query: PromQL = Field(min_length=1, description="PromQL; each series of a vector is judged")
    above: float | None = None
    below: float | None = None

    @model_validator(mode="after")
    def _one_threshold(self) -> Self:
        if (self.above is None) == (self.below is None):
            raise ValueError("set exactly one of 'above' or 'below'")
        return self

    def threshold(self) -> Threshold:
        if self.above is not None:
            return Threshold(Comparison.ABOVE, self.above)
        assert self.below is not None
        return Threshold(Comparison.BELOW, self.below)

    def queries(self, by: str | None = None, *, window_cap: timedelta | None = None) -> list[Query]:
        """The author's PromQL, run as written. ``window_cap`` is NOT applied: the ranges
        inside arbitrary PromQL (``[5m]``, subqueries ``[1h:1m]``, ranges in recording rules
        behind a metric name) cannot be found and shortened without a PromQL parser, and a
        guess would change what the author's query means. So during verification such a
        check still judges samples from before the switch until its own ranges have moved
        past it, and a bad release's requests in them can fail a correct rollback: keep its
        ranges short, or select only the running version's series in the query."""
        return [Query("value", self.query.strip())]
