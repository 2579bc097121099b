"""Turning a check's query results into one verdict per series, with the reason in words.

Pure: no I/O and no clock. The engine runs the queries and feeds the state machine
(``core/check_state.py``) with what this module decides; ``rollbackd eval`` and ``replay``
print it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from rollbackd.checks.base import CheckSpec, Direction, Reading
from rollbackd.checks.compare import CompareCheck
from rollbackd.checks.compare_judge import judge_compare
from rollbackd.checks.measurement import Baseline, Measurement, Scope
from rollbackd.core.samples import Labels, QueryResult, Verdict


def _relative(check: CheckSpec, value: float, baseline: Baseline) -> tuple[bool, str] | None:
    """Whether ``value`` is more than ``max_increase`` worse than the baseline."""
    if check.max_increase is None or math.isnan(baseline.value) or baseline.value <= 0:
        # A zero baseline makes every change infinite; the absolute threshold still holds.
        return None
    change = value / baseline.value - 1
    if check.direction is Direction.INCREASE:
        worse = change > check.max_increase
        words = f"{change:+.0%} vs {check.format_value(baseline.value)} ({baseline.source})"
        limit = f"+{check.max_increase:.0%}"
    else:
        worse = -change > check.max_increase
        words = f"{change:+.0%} vs {check.format_value(baseline.value)} ({baseline.source})"
        limit = f"-{check.max_increase:.0%}"
    return worse, f"{words}, limit {limit}"


def _judge_reading(
    check: CheckSpec, reading: Reading, baseline: Baseline | None
) -> tuple[Verdict, str]:
    name = check.value_name()
    if math.isnan(reading.value):
        detail = f": {reading.detail}" if reading.detail else ""
        return Verdict.NO_DATA, f"{name} is NaN (no requests in the window?){detail}"
    min_rate = getattr(check, "min_rate", 0.0)
    if min_rate > 0 and (reading.traffic is None or reading.traffic < min_rate):
        traffic = "none" if reading.traffic is None else f"{reading.traffic:.3g} req/s"
        return Verdict.NO_DATA, f"traffic {traffic} is below min_rate {min_rate:g} req/s"
    shown = check.format_value(reading.value)
    threshold = check.threshold()
    parts: list[str] = []
    breach = False
    if reading.breach is not None:
        breach = reading.breach
        parts.append(f"{reading.detail} ({name} {reading.value:.3g})")
    elif threshold is not None:
        breach = threshold.breached_by(reading.value)
        op = threshold.comparison.value
        relation = op if breach else f"not {op}"
        parts.append(f"{name} {shown} {relation} {check.format_value(threshold.value)}")
    if baseline is not None:
        relative = _relative(check, reading.value, baseline)
        if relative is not None:
            worse, words = relative
            breach = breach or worse
            parts.append(("worse than baseline: " if worse else "baseline: ") + words)
    if reading.traffic is not None:
        parts.append(f"{reading.traffic:.3g} req/s")
    return (Verdict.BREACH if breach else Verdict.OK), "; ".join(parts)


def judge(
    check: CheckSpec,
    results: Mapping[str, QueryResult],
    scope: Scope,
) -> list[Measurement]:
    """One measurement per judged series. An empty answer is one NO_DATA measurement for
    the whole check (labels ``()``)."""
    if isinstance(check, CompareCheck):
        return judge_compare(check, results, scope)
    query = results["value"].expr if "value" in results else next(iter(results.values())).expr
    readings = check.read(results)
    label = scope.version_label if check.groups_by_version else None
    baselines: dict[Labels, Baseline | None] = {labels: scope.baseline for labels in readings}
    if label is not None:
        if scope.stable_version is not None:
            stable = {
                labels: reading
                for labels, reading in readings.items()
                if dict(labels).get(label) == scope.stable_version
            }
            if stable:
                stable_reading = next(iter(stable.values()))
                stable_baseline = Baseline(
                    stable_reading.value, f"stable track, version {scope.stable_version}"
                )
                baselines = dict.fromkeys(readings, stable_baseline)
        if scope.current_version is not None:
            # Judge only the running version: an old version's series stay inside the rate
            # window after a rollback and must not fire again against the version now live.
            readings = {
                labels: reading
                for labels, reading in readings.items()
                if dict(labels).get(label) == scope.current_version
            }
            if not readings:
                return [
                    _no_data(
                        check,
                        query,
                        ((label, scope.current_version),),
                        f"no series for {label}={scope.current_version!r} yet",
                    )
                ]
    if not readings:
        return [_no_data(check, query, (), "the query returned no series")]
    measurements = []
    for labels, reading in sorted(readings.items()):
        baseline = baselines.get(labels)
        verdict, reason = _judge_reading(check, reading, baseline)
        measurements.append(
            Measurement(
                check=check.name,
                labels=labels,
                verdict=verdict,
                value=reading.value,
                threshold=check.threshold(),
                baseline=baseline,
                traffic=reading.traffic,
                query=query,
                reason=reason,
            )
        )
    return measurements


def _no_data(check: CheckSpec, query: str, labels: Labels, reason: str) -> Measurement:
    return Measurement(
        check=check.name,
        labels=labels,
        verdict=Verdict.NO_DATA,
        value=None,
        threshold=check.threshold(),
        baseline=None,
        traffic=None,
        query=query,
        reason=reason,
    )


def error_measurement(check: CheckSpec, query: str, message: str) -> Measurement:
    """The whole check could not be evaluated: Prometheus failed or answered garbage."""
    return Measurement(
        check=check.name,
        labels=(),
        verdict=Verdict.ERROR,
        value=None,
        threshold=check.threshold(),
        baseline=None,
        traffic=None,
        query=query,
        reason=f"query failed: {message}",
    )


__all__ = ["Baseline", "Measurement", "Scope", "error_measurement", "judge"]
