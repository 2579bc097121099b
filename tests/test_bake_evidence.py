"""Baking needs evidence: the pure accumulator (bake_evidence.py) in tables, the bake clock
that asks it (VersionTracker.update_bake), and the engine against a real Prometheus: a
version whose checks had no traffic, or no Prometheus, never becomes the last known good,
and ``rollbackd status`` says why; a version judged healthy does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from rollbackd.api.app import create_app
from rollbackd.checks.base import Action
from rollbackd.checks.judge import Measurement
from rollbackd.cli.operator_commands import _print_status
from rollbackd.core.samples import Labels, Verdict
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.bake_evidence import (
    NO_ALERTMANAGER,
    Assessment,
    BakeState,
    Evidence,
    Judgement,
    Requirement,
    Shortfall,
    Tally,
    assess,
    bake_status,
    describe_alerts,
    describe_check,
    evaluation_verdict,
    record_alerts,
    record_check,
    requirement,
    within,
)
from rollbackd.runtime.control import Control
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.runner import Runner
from rollbackd.runtime.versions import VersionTracker
from rollbackd.store.sqlite import Store
from support import dataset
from support.configs import load_config, service
from support.hostile_http import closed_port
from support.prometheus import PrometheusServer

OK, NO_DATA, ERROR, BREACH = Verdict.OK, Verdict.NO_DATA, Verdict.ERROR, Verdict.BREACH


def tally(ok: int = 0, no_data: int = 0, error: int = 0, breach: int = 0) -> Tally:
    return Tally(ok=ok, no_data=no_data, error=error, breach=breach)


# -- the tally of one source ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "enough"),
    [
        ((0, 0, 0, 0), False),  # never evaluated: nothing shown
        ((1, 0, 0, 0), True),
        ((1, 1, 0, 0), False),  # half is not most
        ((2, 1, 0, 0), True),
        ((2, 38, 0, 0), False),  # traffic below min_rate most of the time
        ((0, 0, 40, 0), False),  # Prometheus down the whole time
        ((3, 0, 0, 2), True),  # breaches that never fired, outweighed
        ((2, 0, 1, 1), False),
        ((21, 10, 5, 5), True),
    ],
)
def test_a_source_is_enough_when_judged_ok_in_most_evaluations(
    counts: tuple[int, int, int, int], enough: bool
) -> None:
    assert tally(*counts).enough is enough


def test_a_tally_counts_each_verdict_and_keeps_the_latest_gap_reason() -> None:
    t = Tally()
    for verdict, reason in [
        (OK, "ratio 0.01 not above 0.05"),
        (NO_DATA, "traffic 0.1 req/s is below min_rate 1 req/s"),
        (ERROR, "query failed: connection refused"),
        (NO_DATA, "traffic 0.2 req/s is below min_rate 1 req/s"),
        (BREACH, "ratio 0.3 above 0.05"),
    ]:
        t = t.add(verdict, reason)
    assert (t.ok, t.no_data, t.error, t.breach, t.total) == (1, 2, 1, 1, 5)
    assert t.no_data_reason == "traffic 0.2 req/s is below min_rate 1 req/s"
    assert t.error_reason == "query failed: connection refused"


def test_a_gap_reason_is_kept_short_and_on_one_line() -> None:
    t = Tally().add(ERROR, "query failed:\n" + "x" * 1000)
    assert "\n" not in t.error_reason
    assert len(t.error_reason) <= 160


def test_the_accumulator_stays_bounded_however_long_a_version_runs() -> None:
    evidence = Evidence()
    for i in range(10_000):
        evidence = record_check(evidence, "1.0", "errors", (OK, NO_DATA)[i % 2], "r", float(i))
    assert list(evidence.checks) == ["errors"]
    assert evidence.checks["errors"].total == 10_000
    assert evidence.first_at == 0.0


# -- one evaluation as evidence ------------------------------------------------------------


def m(verdict: Verdict, labels: Labels = (), reason: str = "") -> Measurement:
    return Measurement(
        check="errors",
        labels=labels,
        verdict=verdict,
        value=None,
        threshold=None,
        baseline=None,
        traffic=None,
        query="q",
        reason=reason or verdict.value,
    )


V1 = (("version", "1.0"),)
V2 = (("version", "2.0"),)
POD_A = (("pod", "a"),)
POD_B = (("pod", "b"),)


@pytest.mark.parametrize(
    ("measurements", "version_label", "expected"),
    [
        # Whole-service checks: BREACH when any series breaches, OK when any is judged OK
        # and none breaches, else ERROR, else NO_DATA.
        ([m(OK, POD_A), m(OK, POD_B)], None, OK),
        ([m(OK, POD_A), m(NO_DATA, POD_B)], None, OK),
        ([m(OK, POD_A), m(BREACH, POD_B)], None, BREACH),
        ([m(NO_DATA, POD_A), m(NO_DATA, POD_B)], None, NO_DATA),
        ([m(ERROR)], None, ERROR),
        ([m(NO_DATA)], None, NO_DATA),
        # Version-scoped: the current version's own series only.
        ([m(BREACH, V1), m(OK, V2)], "version", OK),
        ([m(OK, V1), m(NO_DATA, V2)], "version", NO_DATA),
        ([m(OK, V1)], "version", NO_DATA),  # only the old version answered
        ([m(ERROR)], "version", ERROR),  # the whole query failed
        (
            [m(NO_DATA, (("version", "2.0"),), "no series for version='2.0' yet")],
            "version",
            NO_DATA,
        ),
    ],
)
def test_the_verdict_of_one_evaluation(
    measurements: list[Measurement], version_label: str | None, expected: Verdict
) -> None:
    verdict, _ = evaluation_verdict(measurements, version_label, "2.0")
    assert verdict is expected


def test_the_reason_is_that_of_the_deciding_series() -> None:
    measurements = [m(NO_DATA, V2, "traffic 0.5 req/s is below min_rate 1 req/s"), m(OK, V1)]
    assert evaluation_verdict(measurements, "version", "2.0") == (
        NO_DATA,
        "traffic 0.5 req/s is below min_rate 1 req/s",
    )


# -- evidence belongs to one version and one bake period ----------------------------------


def test_evidence_starts_afresh_for_another_version() -> None:
    evidence = record_check(Evidence(), "1.0", "errors", OK, "", 100.0)
    evidence = record_check(evidence, "1.0", "errors", OK, "", 115.0)
    evidence = record_check(evidence, "2.0", "errors", NO_DATA, "quiet", 130.0)
    assert evidence.version == "2.0"
    assert evidence.first_at == 130.0
    assert evidence.checks["errors"] == Tally(no_data=1, no_data_reason="quiet")


def test_alert_reads_count_beside_the_checks() -> None:
    evidence = record_check(Evidence(), "1.0", "errors", OK, "", 100.0)
    evidence = record_alerts(evidence, "1.0", OK, "", 101.0)
    evidence = record_alerts(evidence, "1.0", ERROR, "connection refused", 116.0)
    assert evidence.checks["errors"].ok == 1
    assert evidence.alerts == Tally(ok=1, error=1, error_reason="connection refused")


@pytest.mark.parametrize(
    ("version", "since", "kept"),
    [
        ("1.0", 100.0, True),  # every evaluation at or after the period's start
        ("1.0", 90.0, True),
        ("1.0", 101.0, False),  # the period restarted after counting began
        ("1.0", None, False),  # no period runs (a check fires)
        ("2.0", 100.0, False),  # another version
    ],
)
def test_within_keeps_only_the_periods_own_evidence(
    version: str, since: float | None, kept: bool
) -> None:
    evidence = record_check(Evidence(), "1.0", "errors", OK, "", 100.0)
    evidence = record_check(evidence, "1.0", "errors", OK, "", 200.0)
    found = within(evidence, version, since)
    assert (found == evidence) is kept
    if not kept:
        assert found == Evidence(version=version)


def test_an_evaluation_that_arrives_late_moves_the_start_back() -> None:
    evidence = record_check(Evidence(), "1.0", "p99", OK, "", 200.0)
    evidence = record_check(evidence, "1.0", "errors", OK, "", 150.0)
    assert evidence.first_at == 150.0
    assert within(evidence, "1.0", 160.0) == Evidence(version="1.0")


# -- what a service needs --------------------------------------------------------------------

R, N = Action.ROLLBACK, Action.NOTIFY


@pytest.mark.parametrize(
    ("checks", "has_alerts", "alertmanager", "expected"),
    [
        ([("errors", R), ("p99", N)], False, False, Requirement(checks=("errors",))),
        ([("errors", R)], True, False, Requirement(checks=("errors",))),  # alerts only block
        ([("errors", R)], True, True, Requirement(checks=("errors",), alerts=True)),
        ([], True, True, Requirement(alerts=True)),
        ([("p99", N)], True, True, Requirement(alerts=True)),
        ([], True, False, Requirement(unobservable=True)),
        ([("p99", N)], True, False, Requirement(unobservable=True)),
        # Nothing rolls it back automatically: judged by the checks it has.
        ([("p99", N)], False, False, Requirement(checks=("p99",))),
    ],
)
def test_the_evidence_a_service_needs(
    checks: list[tuple[str, Action]], has_alerts: bool, alertmanager: bool, expected: Requirement
) -> None:
    assert requirement(checks, has_alerts=has_alerts, alertmanager=alertmanager) == expected


def ev(checks: dict[str, Tally], alerts: Tally | None = None) -> Evidence:
    return Evidence(version="1.0", first_at=0.0, checks=checks, alerts=alerts or Tally())


@pytest.mark.parametrize(
    ("evidence", "need", "judgement"),
    [
        (ev({"errors": tally(ok=30)}), Requirement(checks=("errors",)), Judgement.ENOUGH),
        (
            ev({"errors": tally(ok=2, no_data=38)}),
            Requirement(checks=("errors",)),
            Judgement.NOT_ENOUGH,
        ),
        (ev({"errors": tally(error=40)}), Requirement(checks=("errors",)), Judgement.NOT_ENOUGH),
        (ev({}), Requirement(checks=("errors",)), Judgement.NOT_YET),
        # every rollback check must show health, not one of them
        (
            ev({"errors": tally(ok=30), "p99": tally(no_data=30)}),
            Requirement(checks=("errors", "p99")),
            Judgement.NOT_ENOUGH,
        ),
        (ev({"errors": tally(ok=30)}), Requirement(checks=("errors", "p99")), Judgement.NOT_YET),
        # checks and alerts both, when Alertmanager is read
        (
            ev({"errors": tally(ok=30)}, tally(ok=2, error=28)),
            Requirement(checks=("errors",), alerts=True),
            Judgement.NOT_ENOUGH,
        ),
        (
            ev({"errors": tally(ok=30)}),
            Requirement(checks=("errors",), alerts=True),
            Judgement.NOT_YET,
        ),
        (ev({}, tally(ok=20, breach=1)), Requirement(alerts=True), Judgement.ENOUGH),
        (ev({}, tally(ok=20)), Requirement(unobservable=True), Judgement.NOT_YET),
        # a notify-only check's evidence is not asked for
        (ev({"p99": tally(no_data=9)}), Requirement(), Judgement.ENOUGH),
    ],
)
def test_assessing_a_bake_period(
    evidence: Evidence, need: Requirement, judgement: Judgement
) -> None:
    assert assess(evidence, need).judgement is judgement


def test_a_shortfall_says_what_the_period_lacked() -> None:
    found = assess(
        ev(
            {
                "error-rate": Tally(
                    ok=2,
                    no_data=38,
                    no_data_reason="traffic 0.1 req/s is below min_rate 1 req/s",
                )
            }
        ),
        Requirement(checks=("error-rate", "p99")),
    )
    assert found == Assessment(
        Judgement.NOT_ENOUGH,
        (
            "check error-rate judged OK in 2 of 40 evaluations "
            "(38 no data: traffic 0.1 req/s is below min_rate 1 req/s)",
            "check p99 not evaluated yet",
        ),
    )


def test_descriptions() -> None:
    assert describe_check(
        "errors", Tally(ok=1, error=2, breach=1, error_reason="query failed: 503")
    ) == ("check errors judged OK in 1 of 4 evaluations (2 errors: query failed: 503; 1 breach)")
    assert describe_alerts(Tally(ok=1, error=3, breach=1, error_reason="connection refused")) == (
        "alerts clear in 1 of 5 Alertmanager reads (3 unreadable: connection refused; "
        "1 with a mapped alert active)"
    )


# -- what status says ---------------------------------------------------------------------

TEN = timedelta(minutes=10)
ENOUGH = Assessment(Judgement.ENOUGH)
LACKING = Assessment(
    Judgement.NOT_ENOUGH,
    ("check error-rate judged OK in 2 of 40 evaluations (38 no data: traffic below min_rate)",),
)


def status(**overrides: Any) -> tuple[BakeState, str]:
    facts: dict[str, Any] = {
        "version": "2.0",
        "baked_at": None,
        "bad_reason": None,
        "healthy_since": 1000.0,
        "now": 1240.0,
        "bake_time": TEN,
        "blockers": (),
        "assessment": ENOUGH,
        "shortfall": None,
    }
    found = bake_status(**{**facts, **overrides})
    return found.state, found.summary


@pytest.mark.parametrize(
    ("overrides", "state", "summary"),
    [
        ({}, BakeState.BAKING, "baking: 4m of 10m, evidence ok"),
        (
            {"assessment": LACKING},
            BakeState.BAKING,
            "baking: 4m of 10m, so far: check error-rate judged OK in 2 of 40 evaluations "
            "(38 no data: traffic below min_rate)",
        ),
        (
            {"now": 1700.0, "assessment": LACKING},
            BakeState.NOT_BAKING,
            "not baking: check error-rate judged OK in 2 of 40 evaluations "
            "(38 no data: traffic below min_rate)",
        ),
        (
            {"blockers": ("alert CheckoutHighErrorRate firing",), "healthy_since": None},
            BakeState.NOT_BAKING,
            "not baking: alert CheckoutHighErrorRate firing",
        ),
        (
            {"assessment": Assessment(Judgement.NOT_YET, (NO_ALERTMANAGER,))},
            BakeState.NO_EVIDENCE,
            f"no evidence: {NO_ALERTMANAGER}",
        ),
        ({"baked_at": 0.0}, BakeState.BAKED, "baked at 1970-01-01T00:00:00Z"),
        ({"version": None}, BakeState.NO_VERSION, "no version known yet"),
        (
            {"bad_reason": "rolled back by rollback 3"},
            BakeState.NOT_BAKING,
            "never bakes: marked bad (rolled back by rollback 3)",
        ),
        (
            {"healthy_since": None},
            BakeState.NOT_BAKING,
            "not baking: the bake clock starts at the next poll",
        ),
        (
            {
                "assessment": Assessment(Judgement.NOT_YET, ("check p99 not evaluated yet",)),
                "shortfall": Shortfall("2.0", 1000.0, LACKING.shortfalls),
            },
            BakeState.NOT_BAKING,
            "not baking: check error-rate judged OK in 2 of 40 evaluations (38 no data: "
            "traffic below min_rate) in the bake period that ended at 1970-01-01T00:16:40Z; "
            "the next period: 4m of 10m, so far: check p99 not evaluated yet",
        ),
        # once the next period has its evidence, the old shortfall no longer holds it back
        (
            {"shortfall": Shortfall("2.0", 1000.0, LACKING.shortfalls)},
            BakeState.BAKING,
            "baking: 4m of 10m, evidence ok",
        ),
    ],
)
def test_what_status_says(overrides: dict[str, Any], state: BakeState, summary: str) -> None:
    assert status(**overrides) == (state, summary)


# -- the bake clock asks the evidence ------------------------------------------------------


@pytest.fixture
async def tracker(tmp_path: Path) -> AsyncIterator[VersionTracker]:
    store = Store(tmp_path / "versions.db")
    tracker = VersionTracker(store)
    await tracker.record_release("svc", "1.0", 0.0)
    yield tracker
    store.close()


async def test_the_clock_asks_the_evidence_only_once_bake_time_has_run(
    tracker: VersionTracker,
) -> None:
    asked: list[tuple[str, float]] = []

    def judged(version: str, since: float) -> Judgement:
        asked.append((version, since))
        return Judgement.ENOUGH

    bake = timedelta(seconds=60)
    assert await tracker.update_bake("svc", 0.0, True, bake, evidence=judged) is None
    assert await tracker.update_bake("svc", 30.0, True, bake, evidence=judged) is None
    assert asked == []
    assert await tracker.update_bake("svc", 60.0, True, bake, evidence=judged) == "1.0"
    assert asked == [("1.0", 0.0)]


async def test_not_yet_waits_and_not_enough_starts_a_new_period(tracker: VersionTracker) -> None:
    answers = iter([Judgement.NOT_YET, Judgement.NOT_ENOUGH, Judgement.ENOUGH])
    asked: list[float] = []

    def judged(version: str, since: float) -> Judgement:
        asked.append(since)
        return next(answers)

    bake = timedelta(seconds=60)
    store = tracker._store
    readings = [0.0, 61.0, 70.0, 100.0, 130.0]
    results = [await tracker.update_bake("svc", t, True, bake, evidence=judged) for t in readings]
    # 61: not yet (the period goes on); 70: not enough (a new period from 70); 100: too
    # early in the new period to ask; 130: enough.
    assert results == [None, None, None, None, "1.0"]
    assert asked == [0.0, 0.0, 70.0]
    state = store.service_state("svc")
    assert state is not None and state.healthy_since == 70.0


# -- the engine against a real Prometheus --------------------------------------------------

CHECKOUT = """
version_query = 'max by (version) (app_build_info{service="checkout"})'
version_label = "version"
bake_time = "5m"
"""


def error_rate(min_rate: float, interval: str = "15s") -> str:
    return f"""
[[check]]
name = "errors"
type = "error_rate"
selector = 'service="checkout"'
errors = 'code=~"5.."'
above = 0.05
min_rate = {min_rate}
interval = "{interval}"

[[check]]
name = "heads-up"
type = "error_rate"
selector = 'service="checkout"'
errors = 'code=~"5.."'
above = 0.05
min_rate = 1000
action = "notify"
interval = "{interval}"
"""


TOKEN = "bake-evidence-token-0123456789"


class Watcher:
    """An engine, its pipeline and its API over one state file."""

    def __init__(self, tmp_path: Path, prometheus_url: str, rules: dict[str, str], **kw: str):
        self.loaded = load_config(tmp_path, prometheus_url, rules, **kw)
        self.store = Store(tmp_path / "state.db")
        self.engine = Engine(
            self.loaded, PrometheusClient(self.loaded.config.prometheus), self.store
        )
        self.pipeline = Pipeline(self.engine)
        self.runner = Runner(self.engine, self.pipeline.on_fire)
        self.now = 0.0
        """The API's clock: the time of the simulated round."""
        self.app = create_app(
            control=Control(self.pipeline),
            registry=CollectorRegistry(),
            token=TOKEN,
            max_body=65536,
            clock=lambda: self.now,
        )

    async def tick(self, at: float) -> None:
        self.now = at
        await self.runner.tick(at)

    async def status(self) -> dict[str, Any]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://rollbackd.test",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as client:
            answer = await client.get("/api/v1/status")
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found

    async def bake_of(self, name: str) -> dict[str, str]:
        [found] = [s for s in (await self.status())["services"] if s["name"] == name]
        bake: dict[str, str] = found["bake"]
        return bake

    def close(self) -> None:
        self.store.close()
        self.engine.client.close()


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    made: list[Watcher] = []
    yield made
    for watcher in made:
        watcher.close()


STEP = dataset.STEP
START = dataset.CHECKOUT_V1_EVAL_TIME - 600
"""1.0.0 serves 10 req/s with 1% errors from long before this to long after bake_time."""


@pytest.mark.prometheus
async def test_a_version_judged_healthy_with_traffic_bakes(
    tmp_path: Path, backfilled_prometheus: PrometheusServer, watchers: list[Watcher]
) -> None:
    watcher = Watcher(
        tmp_path,
        backfilled_prometheus.url,
        {"checkout": service("checkout", error_rate(min_rate=1), header=CHECKOUT)},
    )
    watchers.append(watcher)
    engine = watcher.engine
    await watcher.tick(float(START))
    assert engine.versions.current("checkout") == dataset.CHECKOUT_V1
    bake = await watcher.bake_of("checkout")
    assert bake == {"state": "baking", "summary": "baking: 0s of 5m, evidence ok"}
    for at in range(START + STEP, START + 300, STEP):
        await watcher.tick(float(at))
    record = watcher.store.version("checkout", dataset.CHECKOUT_V1)
    assert record is not None and record.baked_at is None  # not before bake_time
    # The notify-only check never had traffic (min_rate 1000): it is not asked for.
    await watcher.tick(float(START + 300))
    record = watcher.store.version("checkout", dataset.CHECKOUT_V1)
    assert record is not None and record.baked_at == START + 300
    assert (await watcher.bake_of("checkout"))["state"] == "baked"
    # The next release rolls back to it.
    await watcher.tick(float(dataset.CHECKOUT_DEPLOY_TIME + STEP))
    assert engine.versions.current("checkout") == dataset.CHECKOUT_V2
    assert engine.versions.last_known_good("checkout") == dataset.CHECKOUT_V1


@pytest.mark.prometheus
async def test_a_version_whose_traffic_stays_below_min_rate_never_bakes_and_status_says_why(
    tmp_path: Path,
    backfilled_prometheus: PrometheusServer,
    watchers: list[Watcher],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 10 req/s against min_rate 100: every evaluation is NO_DATA.
    watcher = Watcher(
        tmp_path,
        backfilled_prometheus.url,
        {"checkout": service("checkout", error_rate(min_rate=100), header=CHECKOUT)},
    )
    watchers.append(watcher)
    engine = watcher.engine
    for at in range(START, START + 300 - STEP + 1, STEP):
        await watcher.tick(float(at))
    bake = await watcher.bake_of("checkout")
    assert bake["state"] == "baking"
    assert bake["summary"] == (
        "baking: 4m45s of 5m, so far: check errors judged OK in 0 of 20 evaluations "
        "(20 no data: traffic 10 req/s is below min_rate 100 req/s)"
    )
    # bake_time is over: the period had no evidence, so no bake, and a new period starts.
    await watcher.tick(float(START + 300))
    record = watcher.store.version("checkout", dataset.CHECKOUT_V1)
    assert record is not None and record.baked_at is None
    state = watcher.store.service_state("checkout")
    assert state is not None and state.healthy_since == START + 300
    status = await watcher.status()
    [checkout] = status["services"]
    assert checkout["bake"]["state"] == "not_baking"
    assert checkout["bake"]["summary"].startswith(
        "not baking: check errors judged OK in 0 of 21 evaluations "
        "(21 no data: traffic 10 req/s is below min_rate 100 req/s) in the bake period that "
        "ended at "
    )
    _print_status(status, "http://rollbackd.test")
    assert "  checkout: not baking: check errors judged OK in 0 of 21" in capsys.readouterr().out
    # However long it runs without traffic, it never bakes.
    for at in range(START + 300 + STEP, dataset.CHECKOUT_DEPLOY_TIME - 2 * STEP, STEP):
        await watcher.tick(float(at))
    record = watcher.store.version("checkout", dataset.CHECKOUT_V1)
    assert record is not None and record.baked_at is None
    await watcher.tick(float(dataset.CHECKOUT_DEPLOY_TIME + STEP))
    assert engine.versions.last_known_good("checkout") is None


async def test_a_version_whose_prometheus_is_unreachable_never_bakes(
    tmp_path: Path, watchers: list[Watcher]
) -> None:
    check = error_rate(min_rate=0, interval="1s")
    rules = {"shop": service("shop", check.replace("checkout", "shop"), header='bake_time = "1m"')}
    start = 1_000_000.0
    with closed_port() as closed:
        watcher = Watcher(tmp_path, closed, rules, timeout="200ms")
        watchers.append(watcher)
        engine = watcher.engine
        shop = watcher.loaded.services["shop"]
        await engine.versions.record_release("shop", "1.0.0", start)
        for at in (0, 20, 40, 60):
            await engine.run_check(shop, shop.rules.check[0], start + at)
            assert await engine.bake(shop, start + at) is None
    record = watcher.store.version("shop", "1.0.0")
    assert record is not None and record.baked_at is None
    watcher.now = start + 60
    bake = await watcher.bake_of("shop")
    assert bake["state"] == "not_baking"
    assert bake["summary"].startswith(
        "not baking: check errors judged OK in 0 of 4 evaluations (4 errors: query failed: "
    )


@pytest.mark.prometheus
async def test_no_version_bakes_at_a_poll_that_could_not_read_which_version_runs(
    tmp_path: Path, backfilled_prometheus: PrometheusServer, watchers: list[Watcher]
) -> None:
    """bake_time is over and the evidence is there, but Prometheus is gone at that poll:
    the version may have just been replaced, so it bakes only once it is read again."""
    watcher = Watcher(
        tmp_path,
        backfilled_prometheus.url,
        # A short interval: a failed query is retried within it, and this one fails.
        {"checkout": service("checkout", error_rate(1, interval="1s"), header=CHECKOUT)},
    )
    watchers.append(watcher)
    engine = watcher.engine
    for at in range(START, START + 300, STEP):
        await watcher.tick(float(at))
    reachable = engine.client
    with closed_port() as closed:
        section = watcher.loaded.config.prometheus.model_copy(update={"url": closed})
        engine.client = PrometheusClient(section)
        try:
            await watcher.tick(float(START + 300))
        finally:
            engine.client.close()
            engine.client = reachable
    record = watcher.store.version("checkout", dataset.CHECKOUT_V1)
    assert record is not None and record.baked_at is None
    await watcher.tick(float(START + 315))
    record = watcher.store.version("checkout", dataset.CHECKOUT_V1)
    assert record is not None and record.baked_at == START + 315
