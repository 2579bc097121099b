"""``query``: any PromQL, scalar or vector, compared ``above`` or ``below`` a number."""

from __future__ import annotations

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

    def queries(self, by: str | None = None) -> list[Query]:
        # Raw PromQL is the author's: it is run as written.
        return [Query("value", self.query.strip())]
