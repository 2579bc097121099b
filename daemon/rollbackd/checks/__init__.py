"""Check types: one module each, gathered here into the ``Check`` union of the rule file."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from rollbackd.checks.base import CheckSpec, DetectionTime, Query, Threshold
from rollbackd.checks.burn_rate import BurnRateCheck
from rollbackd.checks.compare import CompareCheck
from rollbackd.checks.error_rate import ErrorRateCheck
from rollbackd.checks.latency import LatencyCheck
from rollbackd.checks.probe import ProbeCheck
from rollbackd.checks.query import QueryCheck

Check = Annotated[
    ErrorRateCheck | LatencyCheck | ProbeCheck | BurnRateCheck | QueryCheck | CompareCheck,
    Field(discriminator="type"),
]

CHECK_TYPES = ("error_rate", "latency", "probe", "burn_rate", "query", "compare")

__all__ = [
    "CHECK_TYPES",
    "BurnRateCheck",
    "Check",
    "CheckSpec",
    "CompareCheck",
    "DetectionTime",
    "ErrorRateCheck",
    "LatencyCheck",
    "ProbeCheck",
    "Query",
    "QueryCheck",
    "Threshold",
]
