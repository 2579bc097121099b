"""Each check type turns into the PromQL the README promises. Table tests over the pure
``queries()`` functions; that the PromQL runs is proven against a real Prometheus in
test_example_rules_promql.py."""

from datetime import timedelta
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from rollbackd.checks import BurnRateCheck, Check

CHECK: TypeAdapter[Any] = TypeAdapter(Check)


def queries(spec: dict[str, Any], by: str | None = None) -> dict[str, str]:
    return {q.role: q.expr for q in CHECK.validate_python(spec).queries(by)}


def test_error_rate_whole_service() -> None:
    got = queries(
        {
            "name": "e",
            "type": "error_rate",
            "selector": 'service="a"',
            "errors": 'code=~"5.."',
            "above": 0.05,
            "window": "2m",
        }
    )
    total = 'sum(rate(http_requests_total{service="a"}[2m]))'
    failed = 'sum(rate(http_requests_total{service="a", code=~"5.."}[2m]))'
    assert got == {"value": f"({failed} or 0 * {total}) / {total}", "traffic": total}


def test_error_rate_per_version() -> None:
    got = queries(
        {"name": "e", "type": "error_rate", "errors": 'code="500"', "above": 0.1}, by="version"
    )
    assert got["value"].startswith(
        '(sum by (version) (rate(http_requests_total{code="500"}[1m])) or 0 * '
    )
    assert got["traffic"] == "sum by (version) (rate(http_requests_total[1m]))"


def test_latency_quantile_over_bucket_rates() -> None:
    got = queries(
        {
            "name": "p",
            "type": "latency",
            "metric": "rpc_seconds",
            "selector": 'job="x"',
            "quantile": 0.95,
            "above": "250ms",
            "window": "5m",
        },
        by="version",
    )
    assert got["value"] == (
        'histogram_quantile(0.95, sum by (le, version) (rate(rpc_seconds_bucket{job="x"}[5m])))'
    )
    assert got["traffic"] == 'sum by (version) (rate(rpc_seconds_count{job="x"}[5m]))'


def test_latency_threshold_in_seconds() -> None:
    check = CHECK.validate_python({"name": "p", "type": "latency", "metric": "m", "above": "250ms"})
    assert check.threshold().value == 0.25


def test_latency_rejects_threshold_above_largest_finite_bucket() -> None:
    with pytest.raises(ValidationError, match="largest finite bucket"):
        CHECK.validate_python(
            {"name": "p", "type": "latency", "metric": "m", "above": 10, "buckets": [0.1, 1, 5]}
        )


def test_probe_counts_failures_and_ignores_version_scope() -> None:
    got = queries({"name": "p", "type": "probe", "selector": 'job="bb"'}, by="version")
    assert got == {"value": 'sum(probe_success{job="bb"} == bool 0)'}


def test_up_probe() -> None:
    got = queries({"name": "p", "type": "probe", "metric": "up", "selector": 'job="x"'})
    assert got == {"value": 'sum(up{job="x"} == bool 0)'}


def test_query_is_run_as_written() -> None:
    got = queries({"name": "q", "type": "query", "query": " sum(x) ", "below": 1})
    assert got == {"value": "sum(x)"}


def test_query_needs_exactly_one_threshold() -> None:
    with pytest.raises(ValidationError, match="exactly one of 'above' or 'below'"):
        CHECK.validate_python({"name": "q", "type": "query", "query": "x", "above": 1, "below": 0})


def test_burn_rate_default_tiers_for_30_days() -> None:
    check = CHECK.validate_python(
        {"name": "slo", "type": "burn_rate", "errors": 'code=~"5.."', "objective": "99.9%"}
    )
    assert isinstance(check, BurnRateCheck)
    tiers = [(t.long, t.short, t.factor) for t in check.effective_tiers()]
    assert tiers == [
        (timedelta(hours=1), timedelta(minutes=5), 14.4),
        (timedelta(hours=6), timedelta(minutes=30), 6.0),
    ]
    got = queries({"name": "slo", "type": "burn_rate", "errors": 'code=~"5.."', "objective": 0.999})
    assert list(got) == ["burn 1h", "burn 5m", "burn 6h", "burn 30m"]
    assert got["burn 5m"].endswith(") / 0.001")


def test_burn_rate_tiers_scale_with_period() -> None:
    check = CHECK.validate_python(
        {"name": "s", "type": "burn_rate", "errors": 'c="1"', "objective": 0.99, "period": "7d"}
    )
    assert isinstance(check, BurnRateCheck)
    assert [t.factor for t in check.effective_tiers()] == [3.36, 1.4]


def test_detection_time_with_breaches_and_window() -> None:
    check = CHECK.validate_python(
        {
            "name": "e",
            "type": "error_rate",
            "errors": 'code="500"',
            "above": 0.1,
            "interval": "10s",
            "breaches": 3,
            "window": "1m",
        }
    )
    detection = check.detection_time()
    assert detection.total == timedelta(seconds=90)
    assert str(detection) == "1m30s (3 breaches x interval 10s + rate window 1m)"


def test_detection_time_with_for() -> None:
    check = CHECK.validate_python({"name": "p", "type": "probe", "interval": "15s", "for": "1m"})
    assert check.detection_time().total == timedelta(seconds=75)


def test_for_and_breaches_are_exclusive() -> None:
    with pytest.raises(ValidationError, match="either 'for' or 'breaches'"):
        CHECK.validate_python({"name": "p", "type": "probe", "for": "1m", "breaches": 2})


@pytest.mark.parametrize(
    "selector", ['service="a" code="5"', "service=a", '{service="a"}', 'service="a', "x"]
)
def test_bad_selectors_are_rejected(selector: str) -> None:
    with pytest.raises(ValidationError, match="label matchers"):
        CHECK.validate_python({"name": "p", "type": "probe", "selector": selector})
