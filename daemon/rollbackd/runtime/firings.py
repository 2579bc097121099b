"""What one evaluation of a check produces: its ``CheckEvaluation``, and the ``Firing`` of
each series that fired, which the runtime hands to the rollback pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rollbackd.checks.base import Action, CheckSpec
from rollbackd.checks.compare_judge import evidence_json
from rollbackd.checks.judge import Measurement
from rollbackd.core.check_state import Change, CheckState, SeriesState
from rollbackd.core.samples import Labels, Verdict

_VERDICT_RANK = {Verdict.OK: 0, Verdict.NO_DATA: 1, Verdict.ERROR: 2, Verdict.BREACH: 3}


@dataclass(frozen=True)
class Firing:
    """A check that fired, handed to the rollback pipeline."""

    service: str
    check: str
    action: Action
    measurement: Measurement
    version: str | None
    """The version tracked as current when the firing was reported (for its event). A
    version-scoped check's series also carry, in their version label, the version they
    were judged as: what the pipeline compares with the current one (``Trigger.judged_for``)."""
    breach_started: float
    at: float


@dataclass(frozen=True)
class CheckEvaluation:
    service: str
    check: CheckSpec
    at: float
    measurements: list[Measurement]
    state: CheckState
    changes: list[Change]
    duration: float
    fired: Mapping[Labels, Firing] = field(default_factory=dict)
    """Series -> its firing, for the rollback pipeline: each series that fired at this
    evaluation, and each series restored firing after a restart that this evaluation shows
    still breaching (the pipeline may never have recorded it: the daemon died in between)."""

    @property
    def verdict(self) -> Verdict:
        """The worst verdict among the series, for metrics and tables."""
        return max((m.verdict for m in self.measurements), key=_VERDICT_RANK.__getitem__)


def firing_data(firing: Firing) -> dict[str, Any]:
    """The payload of a ``check.breach`` event."""
    m = firing.measurement
    return {
        "check": firing.check,
        "action": firing.action.value,
        "version": firing.version,
        "series": dict(m.labels),
        "value": m.value,
        "threshold": str(m.threshold) if m.threshold else None,
        "baseline": {"value": m.baseline.value, "source": m.baseline.source}
        if m.baseline
        else None,
        "reason": m.reason,
        "query": m.query,
        "breach_started": firing.breach_started,
        **({"evidence": evidence_json(m.evidence)} if m.evidence else {}),
    }


def measurement_at(series: SeriesState) -> float:
    """When a series was last evaluated (unix seconds)."""
    at = series.last_evaluated or series.firing_since or series.pending_since
    return at.timestamp() if at else 0.0


__all__ = ["CheckEvaluation", "Firing", "firing_data", "measurement_at"]
