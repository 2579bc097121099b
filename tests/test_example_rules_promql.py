"""The PromQL of every example rule parses and runs against a real Prometheus, and computes
the right thing: the server is backfilled with support.dataset, whose answers are known."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rollbackd.checks import BurnRateCheck, CheckSpec, Query
from rollbackd.checks.base import Span
from rollbackd.checks.judge import Scope, judge
from rollbackd.checks.measurement import Measurement
from rollbackd.config.loader import LoadedConfig, load
from rollbackd.core.samples import Verdict
from rollbackd.core.sequential import Decision
from rollbackd.prometheus import PrometheusClient
from support import dataset
from support.prometheus import PrometheusServer, Result, by_label, sample_value

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.example.toml"
LOADED: LoadedConfig = load(CONFIG)
TOLERANCE = 1e-3


def check_queries() -> list[pytest.ParameterSet]:
    cases = []
    for name, service in sorted(LOADED.services.items()):
        rules = service.rules
        for check in rules.check:
            for query in _queries(check, rules.version_scope):
                cases.append(
                    pytest.param(query.role, query.expr, id=f"{name}-{check.name}-{query.role}")
                )
    return cases


RELEASE = Span(dataset.ORDERS_DEPLOY_TIME, dataset.EVAL_TIME, dataset.ORDERS_DEPLOY_TIME)
"""What a check counting since the release counts over at EVAL_TIME: since orders' release."""


def _queries(check: CheckSpec, by: str | None) -> list[Query]:
    if check.counts_since_release:
        return check.queries_since(RELEASE, by)
    return check.queries(by)


def service_queries() -> list[pytest.ParameterSet]:
    cases = []
    for name, service in sorted(LOADED.services.items()):
        rules = service.rules
        if rules.service.version_query:
            cases.append(pytest.param(rules.service.version_query, id=f"{name}-version_query"))
        if rules.canary is not None:
            cases.append(pytest.param(rules.canary.active_query, id=f"{name}-active_query"))
    return cases


def check(service: str, name: str) -> CheckSpec:
    rules = LOADED.services[service].rules
    found: CheckSpec = next(c for c in rules.check if c.name == name)
    return found


def expr(service: str, name: str, role: str = "value") -> str:
    rules = LOADED.services[service].rules
    queries = {q.role: q.expr for q in _queries(check(service, name), rules.version_scope)}
    return queries[role]


def run(
    prometheus: PrometheusServer, query: str, at: float = dataset.EVAL_TIME
) -> dict[str, float]:
    """``{version: value}`` (``""`` for an answer without a version label)."""
    return by_label(prometheus.vector(query, time=at), "version")


def test_every_example_service_is_covered() -> None:
    assert set(LOADED.services) == {t.service for t in dataset.TRACKS}
    assert check_queries(), "no check queries: the example config has no checks?"


@pytest.mark.parametrize(("role", "query"), check_queries())
def test_check_query_runs(backfilled_prometheus: PrometheusServer, role: str, query: str) -> None:
    data = backfilled_prometheus.query(query, time=dataset.EVAL_TIME)
    assert data["resultType"] == "vector"
    result: Result = data["result"]
    assert result, f"{role} query answered no sample at EVAL_TIME: {query}"
    for sample in result:
        assert math.isfinite(sample_value(sample)), f"{role}: {sample} from {query}"


@pytest.mark.parametrize("query", service_queries())
def test_service_query_runs(backfilled_prometheus: PrometheusServer, query: str) -> None:
    result = backfilled_prometheus.vector(query, time=dataset.EVAL_TIME)
    assert result, f"no answer at EVAL_TIME: {query}"


def test_checkout_error_rate_per_version(backfilled_prometheus: PrometheusServer) -> None:
    query = expr("checkout", "error-rate")
    threshold = check("checkout", "error-rate").threshold()
    assert threshold is not None

    bad = run(backfilled_prometheus, query)
    assert bad == {dataset.CHECKOUT_V2: pytest.approx(dataset.CHECKOUT_V2_ERROR_RATIO, TOLERANCE)}
    assert threshold.breached_by(bad[dataset.CHECKOUT_V2])

    good = run(backfilled_prometheus, query, at=dataset.CHECKOUT_V1_EVAL_TIME)
    assert good == {dataset.CHECKOUT_V1: pytest.approx(dataset.CHECKOUT_V1_ERROR_RATIO, TOLERANCE)}
    assert not threshold.breached_by(good[dataset.CHECKOUT_V1])

    traffic = run(backfilled_prometheus, expr("checkout", "error-rate", "traffic"))
    assert traffic == {dataset.CHECKOUT_V2: pytest.approx(dataset.CHECKOUT_RPS, TOLERANCE)}


def test_checkout_version_query_follows_the_deploy(
    backfilled_prometheus: PrometheusServer,
) -> None:
    query = LOADED.services["checkout"].rules.service.version_query
    assert query is not None
    assert set(run(backfilled_prometheus, query)) == {dataset.CHECKOUT_V2}
    before = run(backfilled_prometheus, query, at=dataset.CHECKOUT_V1_EVAL_TIME)
    assert set(before) == {dataset.CHECKOUT_V1}


def test_checkout_p99_lands_in_the_expected_bucket(
    backfilled_prometheus: PrometheusServer,
) -> None:
    query = expr("checkout", "p99")
    threshold = check("checkout", "p99").threshold()
    assert threshold is not None

    slow = run(backfilled_prometheus, query)[dataset.CHECKOUT_V2]
    assert 2.5 < slow <= 5
    assert slow == pytest.approx(dataset.track("checkout", dataset.CHECKOUT_V2).p99, TOLERANCE)
    assert slow == pytest.approx(3.75, TOLERANCE)
    assert threshold.breached_by(slow)

    fast = run(backfilled_prometheus, query, at=dataset.CHECKOUT_V1_EVAL_TIME)[dataset.CHECKOUT_V1]
    assert 0.25 < fast <= 0.5
    assert fast == pytest.approx(dataset.track("checkout", dataset.CHECKOUT_V1).p99, TOLERANCE)
    assert not threshold.breached_by(fast)


def test_checkout_probe_counts_failing_probes(backfilled_prometheus: PrometheusServer) -> None:
    query = expr("checkout", "probe")
    assert run(backfilled_prometheus, query) == {"": 1}
    assert run(backfilled_prometheus, query, at=dataset.CHECKOUT_V1_EVAL_TIME) == {"": 0}


def test_down_targets_are_counted(backfilled_prometheus: PrometheusServer) -> None:
    assert run(backfilled_prometheus, expr("payments", "pods-up")) == {
        "": dataset.PAYMENTS_PODS_DOWN
    }
    assert run(backfilled_prometheus, expr("inventory", "up")) == {"": 0}


@pytest.mark.parametrize("window", ["1h", "5m", "6h", "30m"])
def test_search_burn_rate_is_ratio_over_budget(
    backfilled_prometheus: PrometheusServer, window: str
) -> None:
    burn = check("search", "availability-slo")
    assert isinstance(burn, BurnRateCheck)
    assert burn.budget == pytest.approx(0.001)
    value = run(backfilled_prometheus, expr("search", "availability-slo", f"burn {window}"))
    expected = dataset.SEARCH_ERROR_RATIO / 0.001
    assert expected == pytest.approx(dataset.SEARCH_BURN_RATE)
    assert value == {"": pytest.approx(expected, TOLERANCE)}


def test_payments_canary_is_judged_per_track(backfilled_prometheus: PrometheusServer) -> None:
    canary = LOADED.services["payments"].rules.canary
    assert canary is not None
    active = backfilled_prometheus.vector(canary.active_query, time=dataset.EVAL_TIME)
    assert [sample_value(s) for s in active] == [1]
    before = dataset.PAYMENTS_CANARY_START - 120
    assert backfilled_prometheus.vector(canary.active_query, time=before) == []

    assert run(backfilled_prometheus, expr("payments", "error-rate")) == {
        dataset.PAYMENTS_STABLE: pytest.approx(dataset.PAYMENTS_STABLE_ERROR_RATIO, TOLERANCE),
        dataset.PAYMENTS_CANARY: pytest.approx(dataset.PAYMENTS_CANARY_ERROR_RATIO, TOLERANCE),
    }
    p99 = run(backfilled_prometheus, expr("payments", "p99"))
    assert p99[dataset.PAYMENTS_STABLE] == pytest.approx(
        dataset.expected_quantile(0.99, dataset.FAST_LATENCY), TOLERANCE
    )
    assert p99[dataset.PAYMENTS_CANARY] == pytest.approx(3.75, TOLERANCE)

    version_query = LOADED.services["payments"].rules.service.version_query
    assert version_query is not None
    running = set(run(backfilled_prometheus, version_query))
    assert running == {dataset.PAYMENTS_STABLE, dataset.PAYMENTS_CANARY}


def test_single_version_services(backfilled_prometheus: PrometheusServer) -> None:
    assert run(backfilled_prometheus, expr("inventory", "error-rate")) == {
        "": pytest.approx(dataset.INVENTORY_ERROR_RATIO, TOLERANCE)
    }
    assert run(backfilled_prometheus, expr("billing", "error-rate")) == {
        "": pytest.approx(dataset.BILLING_ERROR_RATIO, TOLERANCE)
    }
    assert run(backfilled_prometheus, expr("billing", "queue-backlog")) == {
        "": pytest.approx(dataset.BILLING_QUEUE_DEPTH)
    }


def _judge_orders(prometheus: PrometheusServer, name: str) -> Measurement:
    spec = check("orders", name)
    section = LOADED.config.prometheus.model_copy(update={"url": prometheus.url})
    client = PrometheusClient(section)
    try:
        results = {
            q.role: client.query(q.expr, at=dataset.EVAL_TIME) for q in _queries(spec, "version")
        }
    finally:
        client.close()
    scope = Scope(version_label="version", current_version=dataset.ORDERS_V2, span=RELEASE)
    [measurement] = judge(spec, results, scope)
    return measurement


def test_orders_release_with_three_times_the_errors_is_judged_worse(
    backfilled_prometheus: PrometheusServer,
) -> None:
    m = _judge_orders(backfilled_prometheus, "errors-vs-baseline")
    assert m.verdict is Verdict.BREACH
    assert m.evidence is not None and m.evidence.decision is Decision.WORSE
    minutes = (dataset.EVAL_TIME - dataset.ORDERS_DEPLOY_TIME) / 60
    assert m.evidence.new.requests == pytest.approx(dataset.ORDERS_RPS * 60 * minutes, rel=0.02)
    assert m.evidence.baseline.requests == pytest.approx(dataset.ORDERS_RPS * 3600, rel=0.02)
    assert m.evidence.ratio == pytest.approx(3.0, rel=0.05)
    assert "error ratio 3.00% vs 1.00% baseline (the 1h before the release)" in m.reason


def test_orders_release_latency_is_judged_not_worse(
    backfilled_prometheus: PrometheusServer,
) -> None:
    m = _judge_orders(backfilled_prometheus, "slow-vs-baseline")
    assert m.verdict is Verdict.OK
    assert m.evidence is not None and m.evidence.decision is not Decision.WORSE
    assert m.evidence.new.ratio == pytest.approx(0.005, rel=0.05)
