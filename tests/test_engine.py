"""The engine against the real Prometheus: every check type gives OK and BREACH from known
backfilled data, versions are judged apart, canaries are compared with the stable track, and
a broken Prometheus gives ERROR, never BREACH."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from rollbackd.core.check_state import Phase
from rollbackd.core.samples import Verdict
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine, Firing
from rollbackd.runtime.runner import Runner
from rollbackd.store.sqlite import Store
from support import dataset
from support.configs import load_config, service
from support.hostile_http import HungServer
from support.prometheus import PrometheusServer

pytestmark = pytest.mark.prometheus

CHECKOUT = """
version_query = 'max by (version) (app_build_info{service="checkout"})'
version_label = "version"
"""
PAYMENTS = """
version_query = 'max by (version) (app_build_info{namespace="payments", service="payments"})'
version_label = "version"
[canary]
active_query = 'sum(rollout_info{namespace="payments", name="payments", phase="Progressing"}) > 0'
abort = [{ type = "command", argv = ["/bin/true"] }]
"""


def engine_for(tmp_path: Path, url: str, rules: dict[str, str], **kwargs: str) -> Engine:
    loaded = load_config(tmp_path, url, rules, **kwargs)
    store = Store(tmp_path / "state.db")
    return Engine(loaded, PrometheusClient(loaded.config.prometheus), store)


@pytest.fixture
def closing() -> Iterator[list[Engine]]:
    engines: list[Engine] = []
    yield engines
    for engine in engines:
        engine.store.close()
        engine.client.close()


async def verdicts_at(engine: Engine, at: float) -> dict[str, Verdict]:
    got = {}
    for svc in engine.loaded.services.values():
        await engine.observe_service(svc, at)
        for check in svc.rules.check:
            [m] = await engine.evaluate(svc, check, at)
            got[check.name] = m.verdict
    return got


CASES = [
    # (name, service, header, check body, expected)
    (
        "err-breach",
        "checkout",
        CHECKOUT,
        'type = "error_rate"\nerrors = \'code=~"5.."\'\n'
        "selector = 'service=\"checkout\"'\nabove = 0.05\nmin_rate = 1",
        Verdict.BREACH,
    ),
    (
        "err-ok",
        "checkout",
        CHECKOUT,
        'type = "error_rate"\nerrors = \'code=~"5.."\'\n'
        "selector = 'service=\"checkout\"'\nabove = 0.5\nmin_rate = 1",
        Verdict.OK,
    ),
    (
        "err-quiet",
        "checkout",
        CHECKOUT,
        'type = "error_rate"\nerrors = \'code=~"5.."\'\n'
        "selector = 'service=\"checkout\"'\nabove = 0.05\nmin_rate = 100",
        Verdict.NO_DATA,
    ),
    (
        "p99-breach",
        "checkout",
        CHECKOUT,
        'type = "latency"\n'
        'metric = "http_request_duration_seconds"\nselector = \'service="checkout"\'\n'
        'above = "1s"',
        Verdict.BREACH,
    ),
    (
        "p99-ok",
        "checkout",
        CHECKOUT,
        'type = "latency"\n'
        'metric = "http_request_duration_seconds"\nselector = \'service="checkout"\'\n'
        'above = "4s"',
        Verdict.OK,
    ),
    (
        "probe-breach",
        "checkout",
        "",
        'type = "probe"\n'
        f'selector = \'job="blackbox", instance="{dataset.CHECKOUT_PROBE_INSTANCE}"\'',
        Verdict.BREACH,
    ),
    (
        "probe-ok",
        "search",
        "",
        'type = "probe"\n'
        f'selector = \'job="blackbox", instance="{dataset.SEARCH_PROBE_INSTANCE}"\'',
        Verdict.OK,
    ),
    (
        "probe-missing",
        "search",
        "",
        'type = "probe"\nselector = \'job="nonexistent"\'',
        Verdict.NO_DATA,
    ),
    (
        "up-ok",
        "inventory",
        "",
        'type = "probe"\nmetric = "up"\nselector = \'job="inventory"\'',
        Verdict.OK,
    ),
    (
        "burn-ok",
        "search",
        "",
        'type = "burn_rate"\nselector = \'service="search"\'\n'
        "errors = 'code=~\"5..\"'\nobjective = 0.999",
        Verdict.OK,
    ),
    (
        "burn-breach",
        "search",
        "",
        'type = "burn_rate"\nselector = \'service="search"\'\n'
        "errors = 'code=~\"5..\"'\nobjective = 0.999\n"
        'tiers = [{ long = "1h", short = "5m", factor = 4 }]',
        Verdict.BREACH,
    ),
    (
        "query-ok",
        "billing",
        "",
        "type = \"query\"\nquery = 'sum(billing_queue_depth)'\nabove = 1000",
        Verdict.OK,
    ),
    (
        "query-breach",
        "billing",
        "",
        "type = \"query\"\nquery = 'sum(billing_queue_depth)'\nabove = 400",
        Verdict.BREACH,
    ),
]


@pytest.mark.parametrize(
    ("name", "svc", "header", "body", "expected"), CASES, ids=[c[0] for c in CASES]
)
async def test_each_check_type_against_real_data(
    tmp_path: Path,
    backfilled_prometheus: PrometheusServer,
    closing: list[Engine],
    name: str,
    svc: str,
    header: str,
    body: str,
    expected: Verdict,
) -> None:
    rules = {svc: service(svc, f'[[check]]\nname = "{name}"\n{body}\n', header=header)}
    engine = engine_for(tmp_path, backfilled_prometheus.url, rules)
    closing.append(engine)
    assert await verdicts_at(engine, dataset.EVAL_TIME) == {name: expected}


async def test_version_scoped_judging_sees_what_the_whole_service_ratio_hides(
    tmp_path: Path, backfilled_prometheus: PrometheusServer, closing: list[Engine]
) -> None:
    check = (
        '[[check]]\nname = "errors"\ntype = "error_rate"\nerrors = \'code=~"5.."\'\n'
        'selector = \'service="payments"\'\nabove = 0.02\nbreaches = 2\ninterval = "15s"\n'
    )
    scoped = engine_for(
        tmp_path / "a",
        backfilled_prometheus.url,
        {"payments": service("payments", check, header=PAYMENTS)},
    )
    whole = engine_for(
        tmp_path / "b", backfilled_prometheus.url, {"payments": service("payments", check)}
    )
    closing.extend([scoped, whole])
    before = dataset.PAYMENTS_CANARY_START - 60
    payments = scoped.loaded.services["payments"]
    await scoped.observe_service(payments, before)
    assert scoped.versions.current("payments") == dataset.PAYMENTS_STABLE

    fired: list[Firing] = []

    async def on_fire(firing: Firing) -> bool:
        fired.append(firing)
        return True

    runner = Runner(scoped, on_fire)
    for at in (dataset.EVAL_TIME, dataset.EVAL_TIME + 15):
        [s] = await runner.tick(at)
        [w] = await whole.tick(at)
        assert scoped.versions.current("payments") == dataset.PAYMENTS_CANARY
        assert s.measurements[0].labels == (("version", dataset.PAYMENTS_CANARY),)
        assert s.verdict is Verdict.BREACH
        assert w.verdict is Verdict.OK  # the stable track's traffic dilutes the canary
        assert w.measurements[0].value is not None and w.measurements[0].value < 0.02
    assert scoped.check_state("payments", "errors").phase is Phase.FIRING
    assert whole.check_state("payments", "errors").phase is Phase.OK
    [firing] = fired
    assert firing.version == dataset.PAYMENTS_CANARY
    assert "error ratio 4.00% above 2.00%" in firing.measurement.reason
    [event] = scoped.store.events(service="payments", types=["check.breach"])
    assert event.data["version"] == dataset.PAYMENTS_CANARY


async def test_canary_is_compared_with_the_stable_track(
    tmp_path: Path, backfilled_prometheus: PrometheusServer, closing: list[Engine]
) -> None:
    check = (
        '[[check]]\nname = "errors"\ntype = "error_rate"\nerrors = \'code=~"5.."\'\n'
        'selector = \'service="payments"\'\nabove = 0.5\nmax_increase = "50%"\n'
    )
    engine = engine_for(
        tmp_path,
        backfilled_prometheus.url,
        {"payments": service("payments", check, header=PAYMENTS)},
    )
    closing.append(engine)
    payments = engine.loaded.services["payments"]
    await engine.observe_service(payments, dataset.PAYMENTS_CANARY_START - 60)
    await engine.observe_service(payments, dataset.EVAL_TIME)
    assert engine.canary_active("payments")
    [m] = await engine.evaluate(payments, payments.rules.check[0], dataset.EVAL_TIME)
    assert m.verdict is Verdict.BREACH
    assert m.baseline is not None
    assert m.baseline.source == f"stable track, version {dataset.PAYMENTS_STABLE}"
    assert m.baseline.value == pytest.approx(dataset.PAYMENTS_STABLE_ERROR_RATIO, rel=0.01)
    assert "worse than baseline: +700%" in m.reason


async def test_relative_check_against_last_known_good_measured_before_the_release(
    tmp_path: Path, backfilled_prometheus: PrometheusServer, closing: list[Engine]
) -> None:
    check = (
        '[[check]]\nname = "p99"\ntype = "latency"\nmetric = "http_request_duration_seconds"\n'
        'selector = \'service="checkout"\'\nabove = "10s"\nmax_increase = "20%"\n'
    )
    engine = engine_for(
        tmp_path,
        backfilled_prometheus.url,
        {"checkout": service("checkout", check, header=CHECKOUT)},
    )
    closing.append(engine)
    checkout = engine.loaded.services["checkout"]
    v1_time = dataset.CHECKOUT_V1_EVAL_TIME
    await engine.observe_service(checkout, v1_time)
    # Baked by the clock alone (no check evidence, so no baseline recorded at the bake):
    # the baseline is then measured.
    hour = timedelta(hours=1)
    assert await engine.versions.update_bake("checkout", v1_time, True, hour) is None
    baked = await engine.versions.update_bake("checkout", v1_time + 3600, True, hour)
    assert baked == dataset.CHECKOUT_V1
    # The daemon reads the version every tick, so it sees the release right after it.
    await engine.observe_service(checkout, dataset.CHECKOUT_DEPLOY_TIME + 15)
    assert engine.versions.current("checkout") == dataset.CHECKOUT_V2
    [m] = await engine.evaluate(checkout, checkout.rules.check[0], dataset.EVAL_TIME)
    assert m.verdict is Verdict.BREACH  # 3.75s against ~0.47s, far under the 10s threshold
    assert m.baseline is not None
    assert m.baseline.value == pytest.approx(dataset.track("checkout", "1.0.0").p99, rel=0.02)
    assert m.baseline.source.startswith(f"last known good {dataset.CHECKOUT_V1}")


@pytest.mark.faults
async def test_hung_prometheus_gives_error_never_breach_and_goes_blind(
    tmp_path: Path, closing: list[Engine]
) -> None:
    checks = (
        '[[check]]\nname = "errors"\ntype = "error_rate"\nerrors = \'code="500"\'\n'
        'above = 0.01\nbreaches = 1\ninterval = "1s"\n'
        '[[check]]\nname = "strict"\ntype = "probe"\nbreaches = 2\ninterval = "1s"\n'
        'on_error = "breach"\n'
    )
    with HungServer() as hung:
        engine = engine_for(tmp_path, hung.url, {"svc": service("svc", checks)}, timeout="200ms")
        closing.append(engine)
        results = [await engine.tick(1000.0 + i) for i in range(4)]
    for evaluations in results:
        by_name = {e.check.name: e for e in evaluations}
        assert by_name["errors"].verdict is Verdict.ERROR
        assert "query failed" in by_name["errors"].measurements[0].reason
    assert engine.check_state("svc", "errors").phase is Phase.OK
    # The opt-in: `on_error = "breach"` makes errors count, and only there.
    assert engine.check_state("svc", "strict").phase is Phase.FIRING
    assert engine.check_state("svc", "errors").blind
    [unreachable] = engine.store.events(types=["prometheus.unreachable"])
    assert unreachable.service == "svc"
    assert (
        engine.metrics.registry.get_sample_value(
            "rollbackd_check_blind", {"service": "svc", "check": "errors"}
        )
        == 1
    )


@pytest.mark.faults
async def test_stopped_prometheus_then_back(
    tmp_path: Path,
    prometheus_factory: object,
    fake_service: object,
    closing: list[Engine],
) -> None:
    from support.fake_service import FakeService
    from support.prometheus import ScrapeTarget

    assert isinstance(fake_service, FakeService)
    prometheus: PrometheusServer = prometheus_factory(  # type: ignore[operator]
        targets=[ScrapeTarget(fake_service.address)]
    )
    prometheus.wait_for('app_build_info{service="checkout"}')
    check = (
        '[[check]]\nname = "errors"\ntype = "error_rate"\nerrors = \'code="500"\'\n'
        'selector = \'service="checkout"\'\nabove = 0.5\nbreaches = 1\ninterval = "1s"\n'
        'window = "10s"\n'
    )
    engine = engine_for(
        tmp_path, prometheus.url, {"checkout": service("checkout", check)}, timeout="500ms"
    )
    closing.append(engine)
    prometheus.wait_for('sum(rate(http_requests_total{service="checkout"}[10s])) > 0')
    [first] = await engine.tick()
    assert first.verdict is Verdict.OK
    prometheus.stop()
    for _ in range(3):
        [down] = await engine.tick()
        assert down.verdict is Verdict.ERROR
    assert engine.check_state("checkout", "errors").blind
    prometheus.restart()
    prometheus.wait_for('sum(rate(http_requests_total{service="checkout"}[10s])) > 0')
    [back] = await engine.tick()
    assert back.verdict is Verdict.OK
    assert not engine.check_state("checkout", "errors").blind
    kinds = [e.type for e in reversed(engine.store.events())]
    assert kinds == ["prometheus.unreachable", "prometheus.recovered"]
