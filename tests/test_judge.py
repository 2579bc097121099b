"""The pure judging of query results: verdicts kept apart, version scoping, baselines, words."""

import math
from typing import Any

import pytest
from pydantic import TypeAdapter

from rollbackd.checks import Check
from rollbackd.checks.base import CheckSpec
from rollbackd.checks.judge import Baseline, Scope, judge
from rollbackd.core.samples import QueryResult, ResultType, Sample, Verdict, labels_of

CHECK: TypeAdapter[Any] = TypeAdapter(Check)


def check(**spec: Any) -> CheckSpec:
    result: CheckSpec = CHECK.validate_python({"name": "c", **spec})
    return result


def result(expr: str, *series: tuple[dict[str, str], float]) -> QueryResult:
    samples = tuple(Sample(labels_of(labels), value, 1000.0) for labels, value in series)
    return QueryResult(expr, ResultType.VECTOR, samples)


ERROR_RATE = {"type": "error_rate", "errors": 'code="500"', "above": 0.05, "min_rate": 1}


@pytest.mark.parametrize(
    ("value", "traffic", "verdict", "reason"),
    [
        (0.30, 10.0, Verdict.BREACH, "error ratio 30.00% above 5.00%; 10 req/s"),
        (0.01, 10.0, Verdict.OK, "error ratio 1.00% not above 5.00%; 10 req/s"),
        (0.05, 10.0, Verdict.OK, "error ratio 5.00% not above 5.00%; 10 req/s"),
        (math.nan, 10.0, Verdict.NO_DATA, "error ratio is NaN (no requests in the window?)"),
        (0.9, 0.5, Verdict.NO_DATA, "traffic 0.5 req/s is below min_rate 1 req/s"),
        (math.inf, 10.0, Verdict.BREACH, "error ratio inf% above 5.00%; 10 req/s"),
    ],
)
def test_error_rate_verdicts(value: float, traffic: float, verdict: Verdict, reason: str) -> None:
    [m] = judge(
        check(**ERROR_RATE),
        {"value": result("ratio", ({}, value)), "traffic": result("rate", ({}, traffic))},
        Scope(),
    )
    assert (m.verdict, m.reason) == (verdict, reason)
    assert m.query == "ratio"


def test_empty_answer_is_no_data_not_ok() -> None:
    [m] = judge(check(**ERROR_RATE), {"value": result("q"), "traffic": result("t")}, Scope())
    assert m.verdict is Verdict.NO_DATA
    assert m.reason == "the query returned no series"


def test_version_scoped_judges_only_the_current_version() -> None:
    value = result("q", ({"version": "v1"}, 0.01), ({"version": "v2"}, 0.30))
    traffic = result("t", ({"version": "v1"}, 50.0), ({"version": "v2"}, 5.0))
    scope = Scope(version_label="version", current_version="v2")
    [m] = judge(check(**ERROR_RATE), {"value": value, "traffic": traffic}, scope)
    assert m.labels == (("version", "v2"),)
    assert m.verdict is Verdict.BREACH
    # After a rollback to v1, v2's bad series in the rate window must not count.
    [back] = judge(
        check(**ERROR_RATE),
        {"value": value, "traffic": traffic},
        Scope(version_label="version", current_version="v1"),
    )
    assert (back.labels, back.verdict) == ((("version", "v1"),), Verdict.OK)


def test_version_scoped_without_series_for_current_version() -> None:
    value = result("q", ({"version": "v1"}, 0.01))
    [m] = judge(
        check(**ERROR_RATE),
        {"value": value, "traffic": result("t", ({"version": "v1"}, 5.0))},
        Scope(version_label="version", current_version="v3"),
    )
    assert m.verdict is Verdict.NO_DATA
    assert m.reason == "no series for version='v3' yet"


def test_probe_is_not_version_scoped() -> None:
    [m] = judge(
        check(type="probe"),
        {"value": result("p", ({}, 2.0))},
        Scope(version_label="version", current_version="v2"),
    )
    assert (m.verdict, m.reason) == (Verdict.BREACH, "failing probes 2 above 0")


def test_query_vector_judges_each_series() -> None:
    measurements = judge(
        check(type="query", query="x", below=0.5),
        {"value": result("x", ({"pod": "a"}, 0.9), ({"pod": "b"}, 0.1))},
        Scope(),
    )
    assert [(m.series, m.verdict) for m in measurements] == [
        ('{pod="a"}', Verdict.OK),
        ('{pod="b"}', Verdict.BREACH),
    ]


def test_relative_increase_against_last_known_good() -> None:
    latency = check(type="latency", metric="m", above="1s", max_increase="20%")
    baseline = Baseline(0.2, "last known good v1, recorded when it baked")
    [m] = judge(latency, {"value": result("q", ({}, 0.3))}, Scope(baseline=baseline))
    assert m.verdict is Verdict.BREACH
    assert m.reason == (
        "p99 latency 300ms not above 1s; worse than baseline: +50% vs 200ms "
        "(last known good v1, recorded when it baked), limit +20%"
    )
    [ok] = judge(latency, {"value": result("q", ({}, 0.22))}, Scope(baseline=baseline))
    assert ok.verdict is Verdict.OK


def test_relative_against_the_stable_track_during_a_canary() -> None:
    rate = check(**{**ERROR_RATE, "above": 0.5, "max_increase": "50%", "min_rate": 0})
    value = result("q", ({"version": "stable"}, 0.02), ({"version": "canary"}, 0.04))
    scope = Scope(version_label="version", current_version="canary", stable_version="stable")
    [m] = judge(rate, {"value": value, "traffic": result("t")}, scope)
    assert m.verdict is Verdict.BREACH
    assert m.baseline == Baseline(0.02, "stable track, version stable")


def test_zero_baseline_skips_the_relative_comparison() -> None:
    rate = check(**{**ERROR_RATE, "max_increase": "10%", "min_rate": 0})
    [m] = judge(
        rate,
        {"value": result("q", ({}, 0.01)), "traffic": result("t")},
        Scope(baseline=Baseline(0.0, "lkg")),
    )
    assert m.verdict is Verdict.OK


def test_decrease_direction() -> None:
    q = check(type="query", query="x", below=0, max_increase="30%", direction="decrease")
    [m] = judge(q, {"value": result("x", ({}, 60.0))}, Scope(baseline=Baseline(100.0, "lkg")))
    assert m.verdict is Verdict.BREACH


@pytest.mark.parametrize(
    ("burns", "verdict"),
    [
        ({"1h": 20.0, "5m": 30.0, "6h": 1.0, "30m": 1.0}, Verdict.BREACH),  # fast tier
        ({"1h": 20.0, "5m": 2.0, "6h": 1.0, "30m": 1.0}, Verdict.OK),  # long only: over
        ({"1h": 2.0, "5m": 30.0, "6h": 1.0, "30m": 1.0}, Verdict.OK),  # short only: a blip
        ({"1h": 7.0, "5m": 7.0, "6h": 7.0, "30m": 7.0}, Verdict.BREACH),  # slow tier
        ({"1h": math.nan, "5m": math.nan, "6h": math.nan, "30m": math.nan}, Verdict.NO_DATA),
    ],
)
def test_burn_rate_long_and_short(burns: dict[str, float], verdict: Verdict) -> None:
    slo = check(type="burn_rate", errors='code="500"', objective=0.999)
    results = {f"burn {w}": result(f"b{w}", ({}, v)) for w, v in burns.items()}
    [m] = judge(slo, results, Scope())
    assert m.verdict is verdict
