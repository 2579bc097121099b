"""Judging a ``compare`` check: its counts become the arms of a sequential test
(``core/sequential.py``), and the test's decision becomes the verdict, in words.

Worse is a breach; not worse and undecided are OK (an undecided test has found nothing
wrong yet). Pure: no I/O and no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rollbackd.checks.compare import CompareCheck, counted_until
from rollbackd.checks.measurement import Baseline, Measurement, Scope
from rollbackd.core.durations import format_duration
from rollbackd.core.samples import Labels, QueryResult, Verdict
from rollbackd.core.sequential import (
    Arm,
    Blocks,
    Decision,
    Evidence,
    Test,
    compare_concurrent,
    compare_with_history,
    pooled_dispersion,
)


def _values(result: QueryResult | None) -> dict[Labels, float]:
    if result is None:
        return {}
    return {s.labels: s.value for s in result.samples if math.isfinite(s.value)}


def _pick(values: dict[Labels, float], label: str | None, version: str | None) -> float | None:
    """The series of ``version`` (by ``label``), or the only series of an unsplit query."""
    if label is None or version is None:
        return next(iter(values.values()), None) if len(values) == 1 else None
    found = [v for labels, v in values.items() if dict(labels).get(label) == version]
    return found[0] if len(found) == 1 else None


def _arm(requests: float, bad: float | None) -> Arm:
    # increase() extrapolates each series on its own: keep bad within [0, requests].
    counted = max(requests, 0.0)
    return Arm(counted, min(max(bad or 0.0, 0.0), counted))


def _blocks(
    statistic: QueryResult | None, count: QueryResult | None, label: str | None, version: str | None
) -> Blocks | None:
    found_statistic = _pick(_values(statistic), label, version)
    found_count = _pick(_values(count), label, version)
    if found_statistic is None or found_count is None:
        return None
    return Blocks(found_count, found_statistic)


def dispersion_of(
    results: Mapping[str, QueryResult], versions: Sequence[str | None], label: str | None
) -> float:
    """The variance inflation pooled over the baseline window's blocks and each judged
    version's blocks since the release, from what Prometheus summed (``pooled_dispersion``)."""
    groups = [_blocks(results.get("blocks"), results.get("block count"), None, None)]
    for version in versions:
        groups.append(
            _blocks(results.get("recent blocks"), results.get("recent block count"), label, version)
        )
    return pooled_dispersion([g for g in groups if g is not None])


def _no_data(check: CompareCheck, query: str, labels: Labels, reason: str) -> Measurement:
    return Measurement(check.name, labels, Verdict.NO_DATA, None, None, None, None, query, reason)


def _ratio(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else "-"


def _odds(x: float) -> str:
    if x >= 1e6:
        return f"{x:.1e}:1"
    return f"{x:,.0f}:1" if x >= 10 else f"{x:.2g}:1"


def _interval_level(check: CompareCheck, evidence: Evidence) -> float:
    """The interval's confidence, in percent: the history test's two ends each take half
    of alpha beside the baseline's own bounds, so together they hold at 1 - 1.5 alpha."""
    alpha = check.alpha * (1.5 if evidence.test is Test.HISTORY else 1.0)
    return 100 * (1 - alpha)


def describe(check: CompareCheck, evidence: Evidence, source: str) -> str:
    """The evidence in words: what was measured, against what, how strong, and on how many
    requests it rests."""
    name = check.value_name()
    new, base = evidence.new, evidence.baseline
    measured = (
        f"{name} {check.format_value(new.ratio)} vs {check.format_value(base.ratio)} "
        f"baseline ({source}), {_ratio(evidence.ratio)} "
        f"({_interval_level(check, evidence):.3g}% interval {_ratio(evidence.low)}-"
        f"{_ratio(evidence.high)})"
    )
    threshold = f"threshold {_odds(evidence.threshold)}"
    worse_by = f"{check.worse_by:.0%}"
    if evidence.decision is Decision.WORSE:
        verdict = f"worse: evidence {_odds(evidence.worse)} for worse, {threshold}"
    elif evidence.decision is Decision.NOT_WORSE:
        verdict = (
            f"not worse by {worse_by}: evidence {_odds(evidence.not_worse)} against, {threshold}"
        )
    else:
        verdict = (
            f"undecided: evidence {_odds(evidence.worse)} for worse and "
            f"{_odds(evidence.not_worse)} against worse by {worse_by}, {threshold}"
        )
    rests = f"on {new.requests:,.0f} requests vs {base.requests:,.0f}"
    bursts = (
        f", counts deflated {evidence.dispersion:.2g}x for bursts"
        if evidence.dispersion > 1
        else ""
    )
    return f"{measured}; {verdict}; {rests}{bursts}"


def evidence_json(evidence: Evidence) -> dict[str, object]:
    """The test's figures, for ``eval --json``, events and the API."""

    def number(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "test": evidence.test.value,
        "decision": evidence.decision.value,
        "ratio": number(evidence.ratio),
        "interval": [number(evidence.low), number(evidence.high)],
        "evidence_worse": number(evidence.worse),
        "evidence_not_worse": number(evidence.not_worse),
        "threshold": evidence.threshold,
        "dispersion": evidence.dispersion,
        "new": {"requests": evidence.new.requests, "bad": evidence.new.bad},
        "baseline": {"requests": evidence.baseline.requests, "bad": evidence.baseline.bad},
    }


def _nothing_to_count(scope: Scope) -> str | None:
    """Why nothing can be counted yet, if so."""
    if scope.span is None:
        return "no release to count from: when the version went live is not known"
    if scope.version_label and scope.current_version is None:
        return "the running version is not known"
    if counted_until(scope.span) < scope.span.since + 1:
        return "counting starts at the first whole minute after the release"
    return None


def judge_compare(
    check: CompareCheck, results: Mapping[str, QueryResult], scope: Scope
) -> list[Measurement]:
    """One measurement: the judged version's arm against its baseline."""
    query = results["bad"].expr if "bad" in results else ""
    label = scope.version_label
    current = scope.current_version
    labels: Labels = ((label, current),) if label and current else ()
    not_yet = _nothing_to_count(scope)
    if not_yet is not None or scope.span is None:
        return [_no_data(check, query, labels, not_yet or "")]
    counted = counted_until(scope.span) - scope.span.since
    requests = _values(results.get("requests"))
    bad = _values(results.get("bad"))
    new_requests = _pick(requests, label, current)
    if not new_requests:
        whose = f" for {label}={current!r}" if label else ""
        return [_no_data(check, query, labels, f"no requests counted{whose} since the release")]
    new_bad = _pick(bad, label, current)
    if new_bad is None and check.slower_than is not None:
        return [
            _no_data(
                check,
                query,
                labels,
                f"no bucket le={check.slower_than:g} in {check.metric}_bucket: slower_than "
                "must be one of the histogram's bucket bounds",
            )
        ]
    new = _arm(new_requests, new_bad)
    traffic = new.requests / counted
    if check.min_rate > 0 and traffic < check.min_rate:
        return [
            _no_data(
                check,
                query,
                labels,
                f"traffic {traffic:.3g} req/s since the release is below min_rate "
                f"{check.min_rate:g} req/s",
            )
        ]
    base_requests = _pick(_values(results.get("baseline requests")), None, None)
    base_bad = _pick(_values(results.get("baseline bad")), None, None)
    window = f"the {format_duration(check.baseline_window)} before the release"
    history = _arm(base_requests or 0.0, base_bad)
    stable = _stable_arm(requests, bad, label, scope.stable_version)
    judged = [current] if stable is None else [current, scope.stable_version]
    phi = dispersion_of(results, judged, label)
    if stable is not None:
        evidence = compare_concurrent(
            new, stable, worse_by=check.worse_by, confidence=check.confidence, dispersion=phi
        )
        source = f"stable track, version {scope.stable_version}"
    elif history.requests > 0:
        evidence = compare_with_history(
            new, history, worse_by=check.worse_by, confidence=check.confidence, dispersion=phi
        )
        source = window
    else:
        return [_no_data(check, query, labels, f"no requests in {window} to compare with")]
    return [
        Measurement(
            check=check.name,
            labels=labels,
            verdict=Verdict.BREACH if evidence.decision is Decision.WORSE else Verdict.OK,
            value=new.ratio,
            threshold=None,
            baseline=Baseline(evidence.baseline.ratio, source),
            traffic=traffic,
            query=query,
            reason=describe(check, evidence, source),
            evidence=evidence,
        )
    ]


def _stable_arm(
    requests: dict[Labels, float],
    bad: dict[Labels, float],
    label: str | None,
    stable: str | None,
) -> Arm | None:
    """The stable track's concurrent counts while a canary runs, when the series are split
    by version and the stable version has requests."""
    if label is None or stable is None:
        return None
    counted = _pick(requests, label, stable)
    if not counted:
        return None
    return _arm(counted, _pick(bad, label, stable))


__all__ = ["describe", "dispersion_of", "evidence_json", "judge_compare"]
