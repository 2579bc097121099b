"""Judging a ``compare`` check from its answers (``checks/compare_judge.py``): which arms are
compared, NO_DATA and why, and the evidence in words. The rule file's keys are checked too."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from rollbackd.checks.base import Span
from rollbackd.checks.compare import CompareCheck
from rollbackd.checks.compare_judge import dispersion_of
from rollbackd.checks.judge import Scope, judge
from rollbackd.core import sequential
from rollbackd.core.samples import Labels, QueryResult, ResultType, Sample, Verdict
from rollbackd.core.sequential import Arm, Decision

RELEASE = 999_960.0
SPAN = Span(RELEASE, RELEASE + 600, RELEASE)
"""Ten minutes after the release, on a whole minute (the counts end at the last one)."""
UNTIL = f"@ {RELEASE + 600:.3f}"


def compare(**keys: object) -> CompareCheck:
    spec: dict[str, object] = {"name": "vs-baseline", "type": "compare", "errors": 'code="500"'}
    spec.update(keys)
    return CompareCheck.model_validate(spec)


def answer(role: str, *series: tuple[Labels, float]) -> QueryResult:
    return QueryResult(
        f"<{role}>", ResultType.VECTOR, tuple(Sample(labels, v, 0.0) for labels, v in series)
    )


def results(
    *,
    new: tuple[float, float] | None,
    stable: tuple[float, float] | None = None,
    baseline: tuple[float, float] | None = (36_000, 360),
    label: str | None = None,
) -> dict[str, QueryResult]:
    """(requests, bad) of the new arm (version 2), the stable arm (version 1) and the
    baseline window."""
    arms = []
    if new is not None:
        arms.append(((("version", "2"),) if label else (), new))
    if stable is not None:
        arms.append(((("version", "1"),), stable))
    base = [((), baseline)] if baseline is not None else []
    return {
        "bad": answer("bad", *((labels, bad) for labels, (_, bad) in arms)),
        "requests": answer("requests", *((labels, n) for labels, (n, _) in arms)),
        "baseline bad": answer("baseline bad", *((labels, b) for labels, (_, b) in base)),
        "baseline requests": answer("baseline requests", *((labels, n) for labels, (n, _) in base)),
        "blocks": answer("blocks"),
        "block count": answer("block count"),
        "recent blocks": answer("recent blocks"),
        "recent block count": answer("recent block count"),
    }


def test_without_a_canary_the_release_is_judged_against_the_window_before_it() -> None:
    [m] = judge(compare(), results(new=(6_000, 180)), Scope(span=SPAN))
    assert m.verdict is Verdict.BREACH
    assert m.evidence is not None
    assert (m.evidence.test, m.evidence.decision) == (sequential.Test.HISTORY, Decision.WORSE)
    assert m.value == pytest.approx(0.03)
    assert m.baseline is not None and m.baseline.value == pytest.approx(0.01)
    assert m.traffic == pytest.approx(10.0)
    assert m.reason.startswith("error ratio 3.00% vs 1.00% baseline (the 1h before the release)")
    assert "worse: evidence" in m.reason and "threshold 200:1" in m.reason
    assert m.reason.endswith("on 6,000 requests vs 36,000")


def test_during_a_canary_the_stable_track_is_the_baseline() -> None:
    scope = Scope(version_label="version", current_version="2", stable_version="1", span=SPAN)
    [m] = judge(compare(), results(new=(600, 18), stable=(5_400, 54), label="version"), scope)
    assert m.labels == (("version", "2"),)
    assert m.evidence is not None and m.evidence.test is sequential.Test.CONCURRENT
    assert m.evidence.baseline == Arm(5_400, 54)
    assert "baseline (stable track, version 1)" in m.reason
    assert "threshold 100:1" in m.reason


def test_a_healthy_release_is_ok_and_says_it_is_undecided_or_not_worse() -> None:
    [m] = judge(compare(), results(new=(6_000, 60)), Scope(span=SPAN))
    assert m.verdict is Verdict.OK
    assert m.evidence is not None and m.evidence.decision is not Decision.WORSE
    assert ("undecided: evidence" in m.reason) or ("not worse by 20%" in m.reason)


@pytest.mark.parametrize(
    ("scope", "answers", "why"),
    [
        (Scope(), results(new=(6_000, 60)), "no release to count from"),
        (Scope(span=SPAN), results(new=None), "no requests counted since the release"),
        (
            Scope(version_label="version", current_version="2", span=SPAN),
            results(new=None, label="version"),
            "no requests counted for version='2' since the release",
        ),
        (
            Scope(span=SPAN),
            results(new=(6_000, 60), baseline=None),
            "no requests in the 1h before the release to compare with",
        ),
    ],
    ids=["no-release-time", "no-requests", "no-requests-for-the-version", "no-baseline"],
)
def test_nothing_to_judge_is_no_data_saying_why(
    scope: Scope, answers: dict[str, QueryResult], why: str
) -> None:
    [m] = judge(compare(), answers, scope)
    assert m.verdict is Verdict.NO_DATA
    assert why in m.reason


def test_nothing_is_judged_before_the_first_whole_minute_after_the_release() -> None:
    early = Span(RELEASE + 10, RELEASE + 50, RELEASE + 10)  # the next whole minute is +60
    [m] = judge(compare(), results(new=(400, 4)), Scope(span=early))
    assert m.verdict is Verdict.NO_DATA
    assert "counting starts at the first whole minute after the release" in m.reason
    # At +70 the 50 seconds up to +60 are counted: a block, partial, of their own.
    later = Span(RELEASE + 10, RELEASE + 70, RELEASE + 10)
    queries = {q.role: q.expr for q in compare().queries_since(later)}
    assert f"[50s] @ {RELEASE + 60:.3f}" in queries["requests"]


def test_traffic_below_min_rate_is_no_data() -> None:
    [m] = judge(compare(min_rate=20), results(new=(6_000, 180)), Scope(span=SPAN))
    assert m.verdict is Verdict.NO_DATA
    assert "traffic 10 req/s since the release is below min_rate 20 req/s" in m.reason


def test_a_slower_than_that_is_no_bucket_bound_says_so() -> None:
    check = compare(errors=None, metric="http_request_duration_seconds", slower_than="300ms")
    answers = results(new=(6_000, 0))
    answers["bad"] = answer("bad")  # count - bucket{le="0.3"}: no such bucket, no series
    [m] = judge(check, answers, Scope(span=SPAN))
    assert m.verdict is Verdict.NO_DATA
    assert "no bucket le=0.3 in http_request_duration_seconds_bucket" in m.reason


def test_the_dispersion_pools_pearsons_statistic_over_the_baseline_and_the_new_arm() -> None:
    # Prometheus answers each group's Pearson statistic and its number of blocks: the
    # baseline 60 on 60 blocks, the new arm since the release (a burst) 180 on 10.
    answers = {
        "blocks": answer("blocks", ((), 60.0)),
        "block count": answer("block count", ((), 60.0)),
        "recent blocks": answer("recent blocks", ((("version", "2"),), 180.0)),
        "recent block count": answer("recent block count", ((("version", "2"),), 10.0)),
    }
    assert dispersion_of(answers, ["2"], "version") == pytest.approx(240 / 68)
    # Without the burst's arm, the baseline alone; counts less spread than Poisson: 1.
    assert dispersion_of(answers, [], "version") == pytest.approx(60 / 59)
    answers["blocks"] = answer("blocks", ((), 30.0))
    assert dispersion_of(answers, [], "version") == 1.0


def test_a_burst_in_the_new_arm_is_not_taken_for_a_regression() -> None:
    """One clump of 12 errors in ten minutes at 1 req/s, against a baseline whose hour saw
    4 errors: counted as 12 independent errors it is 'worse'; its own blocks show the clump."""
    answers = results(new=(600, 12), baseline=(3_600, 4))
    scope = Scope(span=SPAN)
    [counted] = judge(compare(), answers, scope)
    assert counted.verdict is Verdict.BREACH
    # Pearson over 10 blocks of 60 requests, one with all 12 (p = 0.02):
    # sum(bad^2 / req) / p - sum(bad) = (144 / 60) / 0.02 - 12 = 108.
    answers["recent blocks"] = answer("recent blocks", ((), 108.0))
    answers["recent block count"] = answer("recent block count", ((), 10.0))
    [m] = judge(compare(), answers, scope)
    assert m.verdict is Verdict.OK
    assert m.evidence is not None and m.evidence.dispersion == pytest.approx(
        12.0
    )  # (2.4 / 0.02 - 12) / 9
    assert "counts deflated 12x for bursts" in m.reason


def test_the_queries_count_since_the_release_and_the_baseline_ends_at_it() -> None:
    queries = {q.role: q.expr for q in compare().queries_since(SPAN, "version")}
    assert queries["requests"] == (
        f"sum by (version) (increase(http_requests_total[600s] {UNTIL}))"
    )
    assert f'increase(http_requests_total{{code="500"}}[600s] {UNTIL})' in queries["bad"]
    assert queries["baseline requests"] == (
        f"sum(increase(http_requests_total[1h] @ {RELEASE:.3f}))"
    )
    assert queries["blocks"].endswith(f"[1h:1m] @ {RELEASE:.3f}))")


def test_slow_requests_are_the_count_less_the_bucket_at_the_bound() -> None:
    check = compare(errors=None, metric="http_request_duration_seconds", slower_than="1s")
    bad = {q.role: q.expr for q in check.queries_since(SPAN)}["bad"]
    assert bad == (
        f"(sum(increase(http_request_duration_seconds_count[600s] {UNTIL})) - "
        'sum(increase(http_request_duration_seconds_bucket{le=~"1|1\\\\.0"}'
        f"[600s] {UNTIL})))"
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"errors": None}, "set 'errors' (matchers of failed requests) or 'slower_than'"),
        ({"slower_than": "500ms"}, "exactly one of them"),
        ({"max_increase": "20%"}, "with 'worse_by', not 'max_increase'"),
        ({"confidence": 1.0}, "less than 1"),
        ({"baseline_window": "1m"}, "baseline_window must be at least 2m"),
        (
            {"errors": None, "slower_than": "500ms", "metric": "x_bucket"},
            "use 'x'",
        ),
    ],
)
def test_rule_file_mistakes_are_named(keys: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compare(**keys)


def test_it_fires_at_the_first_worse_evaluation_by_default() -> None:
    assert compare().consecutive_breaches == 1
    assert compare(breaches=2).consecutive_breaches == 2
    assert compare().baseline_window == timedelta(hours=1)
    assert "fires as soon as the evidence for worse reaches 100:1" in str(
        compare().detection_time()
    )
