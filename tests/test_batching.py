"""Query batching: checks of one shape share one query, and every check gets the same
measurements, verdicts and states as when it queries alone — against the real backfilled
Prometheus."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest

from rollbackd.checks import batching
from rollbackd.core.samples import Verdict
from rollbackd.prometheus import PrometheusClient, QueryError
from rollbackd.runtime.engine import CheckEvaluation, Engine
from rollbackd.runtime.runner import Runner
from rollbackd.runtime.scheduler import Scheduler
from rollbackd.store.sqlite import Store
from support import dataset
from support.configs import load_config, service
from support.hostile_http import closed_port
from support.prometheus import PrometheusServer

pytestmark = pytest.mark.prometheus

SERVICES = ("checkout", "payments", "search", "inventory", "billing", "ghost")
"""The dataset's services, and one it does not have (no data, both ways)."""


def scoped(name: str) -> str:
    """Judged per version: the error ratio twice (two thresholds: one shape), once more with
    another matcher beside the service's, p99 and p50."""
    return service(
        name,
        f"""
[[check]]
name = "errors"
type = "error_rate"
selector = 'service="{name}"'
errors = 'code=~"5.."'
above = 0.05
min_rate = 1

[[check]]
name = "errors-strict"
type = "error_rate"
selector = 'service="{name}"'
errors = 'code=~"5.."'
above = 0.004
max_increase = "20%"

[[check]]
name = "errors-ns"
type = "error_rate"
selector = 'service="{name}", version!="0"'
errors = 'code="500"'
above = 0.015

[[check]]
name = "p99"
type = "latency"
metric = "http_request_duration_seconds"
selector = 'service="{name}"'
above = "1s"

[[check]]
name = "p50"
type = "latency"
metric = "http_request_duration_seconds"
selector = 'service="{name}"'
quantile = 0.5
above = "80ms"
""",
        header=f"""
version_query = 'max by (version) (app_build_info{{service="{name}"}})'
version_label = "version"
""",
    )


FLAT = service(
    "flat",
    """
[[check]]
name = "checkout-errors"
type = "error_rate"
selector = 'service="checkout"'
errors = 'code=~"5.."'
above = 0.05

[[check]]
name = "search-errors"
type = "error_rate"
selector = 'service="search"'
errors = 'code=~"5.."'
above = 0.05

[[check]]
name = "search-v"
type = "error_rate"
selector = 'version="2.3.0"'
errors = 'code=~"5.."'
above = 0.001

[[check]]
name = "inventory-v"
type = "error_rate"
selector = 'version="0.9.0"'
errors = 'code=~"5.."'
above = 0.001

[[check]]
name = "no-dots-match"
type = "error_rate"
selector = 'version="2x3x0"'
errors = 'code=~"5.."'
above = 0.001

[[check]]
name = "checkout-probe"
type = "probe"
selector = 'job="blackbox", instance="https://checkout.example.com/health"'

[[check]]
name = "search-probe"
type = "probe"
selector = 'job="blackbox", instance="https://search.example.com/health"'

[[check]]
name = "payments-up"
type = "probe"
metric = "up"
selector = 'job="payments"'

[[check]]
name = "inventory-up"
type = "probe"
metric = "up"
selector = 'job="inventory"'

[[check]]
name = "burn"
type = "burn_rate"
selector = 'service="search"'
errors = 'code=~"5.."'
objective = 0.999

[[check]]
name = "queue"
type = "query"
query = 'sum(billing_queue_depth)'
above = 400
""",
)
"""Not judged per version: grouped by service, by version (values with dots), by probe
instance and by job; burn-rate and query checks run alone."""


def rules() -> dict[str, str]:
    return {**{name: scoped(name) for name in SERVICES}, "flat": FLAT}


@pytest.fixture
def engines(tmp_path: Path, backfilled_prometheus: PrometheusServer) -> Iterator[list[Engine]]:
    made: list[Engine] = []
    for batched in (True, False):
        directory = tmp_path / ("batched" if batched else "alone")
        loaded = load_config(directory, backfilled_prometheus.url, rules())
        made.append(
            Engine(
                loaded,
                PrometheusClient(loaded.config.prometheus),
                Store(directory / "state.db"),
                query_batching=batched,
            )
        )
    yield made
    for engine in made:
        engine.store.close()
        engine.client.close()


def queries_sent(engine: Engine) -> float:
    return (
        engine.metrics.registry.get_sample_value(
            "rollbackd_prometheus_queries_total", {"outcome": "ok"}
        )
        or 0.0
    )


def outcome(evaluation: CheckEvaluation) -> tuple[Any, ...]:
    return (evaluation.service, evaluation.check.name, evaluation.measurements, evaluation.state)


async def test_batched_verdicts_equal_unbatched_ones(engines: list[Engine]) -> None:
    batched, alone = engines
    plan = batched.plan
    assert alone.plan.batches == {}
    # What batches: per shape, every service with it (ghost included), one query per role.
    groups = sorted(
        (b.label, len(b.members), [q.role for q in b.queries]) for b in plan.batches.values()
    )
    assert groups == [
        ("instance", 2, ["value"]),
        ("job", 2, ["value"]),
        ("service", 2, ["value", "traffic"]),
        ("service", 6, ["value", "traffic"]),
        ("service", 6, ["value", "traffic"]),
        ("service", 6, ["value", "traffic"]),
        ("service", 12, ["value", "traffic"]),
        ("version", 3, ["value", "traffic"]),
    ]
    alone_checks = sorted(f"{s.name}/{c.name}" for s, c in plan.singles)
    assert alone_checks == ["flat/burn", "flat/queue"]
    p99 = next(b for b in plan.batches.values() if b.members[0].check.name == "p99")
    assert p99.queries[0].expr == (
        "histogram_quantile(0.99, sum by (le, service, version) (rate("
        'http_request_duration_seconds_bucket{service=~"billing|checkout|ghost|inventory|'
        'payments|search"}[1m])))'
    )
    versions = next(b for b in plan.batches.values() if b.label == "version")
    assert 'version=~"0\\\\.9\\\\.0|2\\\\.3\\\\.0|2x3x0"' in versions.queries[0].expr

    # The same moments as the dataset's story: before checkout's bad release, then after.
    for at in (dataset.CHECKOUT_V1_EVAL_TIME, dataset.EVAL_TIME, dataset.EVAL_TIME + 15):
        sent = queries_sent(batched), queries_sent(alone)
        got = [outcome(e) for e in await batched.tick(at)]
        want = [outcome(e) for e in await alone.tick(at)]
        assert got == want
        assert len(want) == 6 * 5 + 11
        # One version query per scoped service; alone, every query of every check; batched, one
        # per role of each batch, and the queries of the checks left alone.
        assert queries_sent(alone) - sent[1] == 6 + sum(
            len(c.queries(s.rules.version_scope))
            for s in alone.loaded.services.values()
            for c in s.rules.check
        )
        assert queries_sent(batched) - sent[0] == 6 + sum(
            len(b.queries) for b in plan.batches.values()
        ) + sum(len(c.queries(s.rules.version_scope)) for s, c in plan.singles)
    verdicts = {
        (e.service, e.check.name): e.verdict for e in await batched.tick(dataset.EVAL_TIME + 30)
    }
    # Both ways see the dataset: the bad release, the canary's errors, the ghost's silence.
    assert verdicts[("checkout", "errors")] is Verdict.BREACH
    assert verdicts[("search", "errors")] is Verdict.OK
    assert verdicts[("payments", "errors-strict")] is Verdict.BREACH
    assert verdicts[("ghost", "p99")] is Verdict.NO_DATA
    assert verdicts[("flat", "checkout-probe")] is Verdict.BREACH
    assert verdicts[("flat", "search-probe")] is Verdict.OK
    assert verdicts[("flat", "search-v")] is Verdict.BREACH
    assert verdicts[("flat", "no-dots-match")] is Verdict.NO_DATA
    assert verdicts[("flat", "payments-up")] is Verdict.BREACH
    assert verdicts[("checkout", "errors")] is Verdict.BREACH
    assert batched.check_state("checkout", "errors").firing


async def test_small_query_limit_splits_batches_and_keeps_verdicts(
    engines: list[Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batching, "MAX_QUERY_BYTES", 400)
    batched, alone = engines
    batches = batched.plan.batches.values()
    assert len(batches) > 8
    for batch in batches:
        values = {m.value for m in batch.members}
        # At least one value per batch, however long its query.
        assert len(values) == 1 or max(len(quote_plus(q.expr)) for q in batch.queries) <= 400
    got = [outcome(e) for e in await batched.tick(dataset.EVAL_TIME)]
    assert got == [outcome(e) for e in await alone.tick(dataset.EVAL_TIME)]


async def test_a_rejected_batch_runs_its_checks_alone(
    engines: list[Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    batched, alone = engines
    real = batched.client.aquery

    async def no_long_regexes(expr: str, **kwargs: Any) -> Any:
        if "|" in expr:
            raise QueryError("414 URI too long", status=414, error_type="http_414", expr=expr)
        return await real(expr, **kwargs)

    monkeypatch.setattr(batched.client, "aquery", no_long_regexes)
    refused: list[float] = []
    for at in (dataset.EVAL_TIME, dataset.EVAL_TIME + 15):
        got = [outcome(e) for e in await batched.tick(at)]
        assert got == [outcome(e) for e in await alone.tick(at)]
        assert queries_sent(batched) == queries_sent(alone)
        refused.append(
            batched.metrics.registry.get_sample_value(
                "rollbackd_prometheus_queries_total", {"outcome": "bad_query"}
            )
            or 0.0
        )
    # Each batch is tried once; from then on its checks run alone, as unbatched ones do.
    assert refused[0] >= len(batched.plan.batches)
    assert refused[1] == refused[0]


async def test_prometheus_down_gives_every_member_an_error(tmp_path: Path) -> None:
    with closed_port() as url:
        loaded = load_config(
            tmp_path,
            url,
            {
                name: service(
                    name,
                    f"""
[[check]]
name = "errors"
type = "error_rate"
selector = 'service="{name}"'
errors = 'code=~"5.."'
above = 0.05
interval = "1s"
""",
                )
                for name in ("a", "b", "c")
            },
            timeout="1s",
        )
        engine = Engine(
            loaded, PrometheusClient(loaded.config.prometheus), Store(tmp_path / "s.db")
        )
        try:
            assert len(engine.plan.batches) == 1
            evaluations = await engine.tick()
            assert [(e.service, e.verdict) for e in evaluations] == [
                ("a", Verdict.ERROR),
                ("b", Verdict.ERROR),
                ("c", Verdict.ERROR),
            ]
            assert all("query failed" in e.measurements[0].reason for e in evaluations)
        finally:
            engine.store.close()


async def test_scheduler_runs_a_batch_as_one_job(
    tmp_path: Path, backfilled_prometheus: PrometheusServer
) -> None:
    loaded = load_config(
        tmp_path,
        backfilled_prometheus.url,
        {
            name: service(
                name,
                f"""
[[check]]
name = "errors"
type = "error_rate"
selector = 'service="{name}"'
errors = 'code=~"5.."'
above = {above}
interval = "1s"
""",
            )
            for name, above in (("search", 0.05), ("inventory", 0.05))
        },
    )
    engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), Store(tmp_path / "s.db"))
    scheduler = Scheduler(Runner(engine), rng=random.Random(3))
    scheduler.start()
    try:
        [batch_id] = engine.plan.batches
        assert scheduler.job_ids() == [batch_id, "service:inventory", "service:search"]

        def evaluations(name: str) -> float:
            return sum(
                engine.metrics.registry.get_sample_value(
                    "rollbackd_check_evaluations_total",
                    {"service": name, "check": "errors", "verdict": v},
                )
                or 0.0
                for v in ("ok", "breach", "no_data", "error")
            )

        for _ in range(400):
            if evaluations("search") >= 2 and evaluations("inventory") >= 2:
                break
            await asyncio.sleep(0.025)
        assert evaluations("search") >= 2 and evaluations("inventory") >= 2
        delays = engine.metrics.registry.get_sample_value(
            "rollbackd_job_start_delay_seconds_count", {"kind": "batch"}
        )
        assert delays is not None and delays >= 2

        # A threshold changes: the same batch job, the new threshold read at its next run.
        changed = load_config(
            tmp_path / "changed",
            backfilled_prometheus.url,
            {
                name: service(
                    name,
                    f"""
[[check]]
name = "errors"
type = "error_rate"
selector = 'service="{name}"'
errors = 'code=~"5.."'
above = {above}
interval = "1s"
""",
                )
                for name, above in (("search", 0.001), ("inventory", 0.05))
            },
        )
        scheduler.reload(changed)
        assert scheduler.job_ids() == [batch_id, "service:inventory", "service:search"]
        [member] = [m for m in engine.plan.batches[batch_id].members if m.service.name == "search"]
        assert member.check.threshold().value == 0.001

        # A third service of the same shape: another batch, the old job gone.
        grown = load_config(
            tmp_path / "grown",
            backfilled_prometheus.url,
            {
                name: service(
                    name,
                    f"""
[[check]]
name = "errors"
type = "error_rate"
selector = 'service="{name}"'
errors = 'code=~"5.."'
above = 0.05
interval = "1s"
""",
                )
                for name in ("search", "inventory", "billing")
            },
        )
        scheduler.reload(grown)
        [new_id] = engine.plan.batches
        assert new_id != batch_id
        assert scheduler.job_ids() == [
            new_id,
            "service:billing",
            "service:inventory",
            "service:search",
        ]
    finally:
        scheduler.shutdown()
        engine.store.close()
