"""Check state survives restarts and reloads, as Prometheus restores its alerts' ``for``
state: the JSON codec, the store's ``check_states`` table, the engine saving and restoring
them, and the decision that depends on it, against a real Prometheus: a breach that began
before a release, seen firing only after a restart, does not roll the release back."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from rollbackd.config.loader import LoadedConfig
from rollbackd.core.check_state import CheckState, Phase, SeriesState, Transition
from rollbackd.core.samples import Labels, Verdict
from rollbackd.prometheus import PrometheusClient, PrometheusError
from rollbackd.runtime.engine import CheckEvaluation, Engine, Firing
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.runner import Runner
from rollbackd.store import sqlite as store_module
from rollbackd.store.check_state_codec import StateFormatError, decode, encode, kept
from rollbackd.store.errors import StoreError
from rollbackd.store.sqlite import Store, database, migrations
from support import dataset
from support.configs import load_config, service
from support.prometheus import PrometheusServer, create_blocks

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
A: Labels = (("version", "a"),)
Z: Labels = (("version", "z"),)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- the codec --------------------------------------------------------------------------------

TIMES = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
SERIES_STATES = st.builds(
    SeriesState,
    phase=st.sampled_from(list(Phase)),
    pending_since=TIMES,
    firing_since=TIMES,
    breach_count=st.integers(min_value=0, max_value=10**6),
    last_verdict=st.none() | st.sampled_from(list(Verdict)),
    last_evaluated=st.none() | TIMES,
    errors_held=st.integers(min_value=0, max_value=10),
)
LABELS = st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3).map(
    lambda pairs: tuple(sorted(dict(pairs).items()))
)
CHECK_STATES = st.builds(
    CheckState,
    series=st.dictionaries(LABELS, SERIES_STATES, max_size=4),
    error_count=st.integers(min_value=0, max_value=100),
    blind=st.booleans(),
)


@given(state=CHECK_STATES)
def test_codec_round_trips_everything_but_ok_series(state: CheckState) -> None:
    text = encode(state)
    restored = decode(text)
    assert restored == kept(state)
    assert all(s.phase is not Phase.OK for s in restored.series.values())
    assert (restored.error_count, restored.blind) == (state.error_count, state.blind)
    assert encode(restored) == text


def test_codec_keeps_every_field_of_a_series_and_exact_times() -> None:
    pending = SeriesState(
        Phase.PENDING, at(0.000001), None, 2, Verdict.ERROR, at(30.5), errors_held=1
    )
    firing = SeriesState(Phase.FIRING, at(-60), at(-15), 7, Verdict.BREACH, at(30.5))
    state = CheckState({A: pending, Z: firing, (): SeriesState()}, error_count=1, blind=False)
    restored = decode(encode(state))
    assert dict(restored.series) == {A: pending, Z: firing}
    assert restored.series[A].pending_since == at(0.000001)


def test_codec_text_is_the_same_for_the_same_state() -> None:
    one = SeriesState(Phase.PENDING, at(0), None, 1, Verdict.BREACH, at(0))
    two = SeriesState(Phase.FIRING, at(0), at(15), 2, Verdict.BREACH, at(15))
    first = CheckState({A: one, Z: two, (("version", "b"),): SeriesState()})
    second = CheckState({Z: two, A: one})
    assert encode(first) == encode(second)
    # All-OK states, whatever their last evaluation, are the same text: nothing to write.
    ok_now = CheckState({A: SeriesState(last_verdict=Verdict.OK, last_evaluated=at(15))})
    assert encode(ok_now) == encode(CheckState())


def _document(**changes: Any) -> str:
    series = {
        "labels": [["version", "a"]],
        "phase": "pending",
        "pending_since": at(0).isoformat(),
        "firing_since": None,
        "breach_count": 1,
        "errors_held": 0,
        "last_verdict": "breach",
        "last_evaluated": at(0).isoformat(),
    }
    doc: dict[str, Any] = {"format": 1, "error_count": 0, "blind": False, "series": [series]}
    for key, value in changes.items():
        if key.startswith("series_"):
            series[key.removeprefix("series_")] = value
        else:
            doc[key] = value
    return json.dumps(doc)


def test_codec_reads_the_document_it_expects() -> None:
    state = decode(_document())
    assert dict(state.series) == {
        A: SeriesState(Phase.PENDING, at(0), None, 1, Verdict.BREACH, at(0))
    }


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{", "not JSON"),
        ("[]", "expected an object"),
        (_document(format=2), "format 2"),
        (_document(format=True), "format True"),
        (_document(extra=1), "unknown"),
        (_document(series="x"), "expected a list"),
        (_document(error_count=-1), "error_count"),
        (_document(error_count=True), "error_count"),
        (_document(blind=0), "blind"),
        (_document(series_phase="burning"), "series\\[0\\]"),
        (_document(series_last_verdict="maybe"), "series\\[0\\]"),
        (_document(series_labels=[["version"]]), "labels"),
        (_document(series_labels={"version": "a"}), "labels"),
        (_document(series_breach_count=1.5), "breach_count"),
        (_document(series_pending_since="yesterday"), "pending_since"),
        (_document(series_pending_since="2024-05-01T12:00:00"), "no UTC offset"),
        (_document(series_pending_since=1714564800), "pending_since"),
        (_document(series_pending_since=None), "needs pending_since"),
        (_document(series_phase="firing"), "needs firing_since"),
    ],
)
def test_codec_refuses_anything_else(text: str, why: str) -> None:
    with pytest.raises(StateFormatError, match=why):
        decode(text)


def test_codec_refuses_the_same_series_twice() -> None:
    doc = json.loads(_document())
    doc["series"].append(doc["series"][0])
    with pytest.raises(StateFormatError, match="twice"):
        decode(json.dumps(doc))


# --- the store --------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as opened:
        yield opened


def test_store_check_states_survive_a_reopen(tmp_path: Path, store: Store) -> None:
    # Saving, replacing and deleting are in the store contract tests; this is the file.
    store.save_check_state("checkout", "errors", '{"v":3}', 102.0)
    [row] = store.check_states().values()
    store.close()
    with Store(tmp_path / "state.db") as reopened:
        assert reopened.check_states() == {("checkout", "errors"): row}


def test_store_refuses_a_check_state_that_is_not_json(store: Store) -> None:
    with pytest.raises(StoreError, match="CHECK constraint"):
        store.save_check_state("checkout", "errors", "not json", 100.0)
    assert store.check_states() == {}
    assert store.write_failure is None  # a refused write, not a failing disk


def test_store_check_states_on_a_closed_store_raise_store_error(store: Store) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.check_states()
    with pytest.raises(StoreError, match="closed"):
        store.save_check_state("checkout", "errors", "{}", 100.0)
    with pytest.raises(StoreError, match="closed"):
        store.delete_check_state("checkout", "errors")


def test_store_upgrade_adds_check_states_and_keeps_what_was_there(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    migrations.migrate(conn, db, migrations.MIGRATIONS[:-1])
    conn.execute("INSERT INTO service_state (service, paused, frozen) VALUES ('checkout', 1, 0)")
    conn.close()
    with Store(db) as upgraded:
        assert upgraded.schema_version() == store_module.SCHEMA_VERSION
        assert upgraded.check_states() == {}
        state = upgraded.service_state("checkout")
        assert state is not None and state.paused


# --- the engine, against a real Prometheus ----------------------------------------------------


def check(name: str, expr: str = "vector(1)", *, above: float = 0, extra: str = "") -> str:
    return (
        f'[[check]]\nname = "{name}"\ntype = "query"\nquery = \'{expr}\'\nabove = {above}\n'
        f'interval = "15s"\n{extra}\n'
    )


SLOW = check("slow", extra='for = "1h"')
"""Breaches at every evaluation, pending for an hour."""
FAST = check("fast", extra="breaches = 1")
"""Fires at its first evaluation."""
HEALTHY = check("healthy", "vector(0)")


class Engines:
    """Engines on one state file in one directory, each closed at the end; ``restart``
    closes the last one as a stopped daemon would and opens a new one."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.tmp_path = tmp_path
        self.url = url
        self.made: list[Engine] = []

    def config(self, checks: str, *, directory: str = "a") -> LoadedConfig:
        return load_config(self.tmp_path / directory, self.url, {"svc": service("svc", checks)})

    def open(self, loaded: LoadedConfig) -> Engine:
        store = Store(self.tmp_path / "state.db")
        engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), store)
        self.made.append(engine)
        return engine

    def restart(self, loaded: LoadedConfig | None = None) -> Engine:
        last = self.made[-1]
        last.store.close()
        return self.open(loaded or last.loaded)

    def close(self) -> None:
        for engine in self.made:
            engine.store.close()


@pytest.fixture
def engines(tmp_path: Path, backfilled_prometheus: PrometheusServer) -> Iterator[Engines]:
    made = Engines(tmp_path, backfilled_prometheus.url)
    yield made
    made.close()


def by_check(evaluations: list[CheckEvaluation]) -> dict[str, CheckEvaluation]:
    return {e.check.name: e for e in evaluations}


async def test_pending_and_firing_series_survive_a_restart(engines: Engines) -> None:
    first = engines.open(engines.config(SLOW + FAST + HEALTHY))
    await first.tick(1000.0)
    await first.tick(1015.0)
    slow, fast = first.check_state("svc", "slow"), first.check_state("svc", "fast")
    assert (slow.phase, fast.phase) == (Phase.PENDING, Phase.FIRING)

    again = engines.restart()
    assert again.check_state("svc", "slow") == slow
    assert again.check_state("svc", "fast") == fast
    assert ("svc", "healthy") not in again.states  # all OK: nothing was saved for it

    # The runs go on where they were: no new pending, no second firing.
    done = by_check(await again.tick(1030.0))
    assert done["slow"].changes == [] and done["fast"].changes == []
    restored_slow = again.check_state("svc", "slow").series[()]
    restored_fast = again.check_state("svc", "fast").series[()]
    assert restored_slow.pending_since == datetime.fromtimestamp(1000.0, UTC)
    assert restored_slow.breach_count == 3
    assert restored_fast.firing_since == datetime.fromtimestamp(1000.0, UTC)


async def test_a_series_restored_firing_is_handed_over_again_once_it_breaches(
    engines: Engines,
) -> None:
    first = engines.open(engines.config(FAST))
    await first.tick(1000.0)
    assert first.check_state("svc", "fast").firing
    again = engines.restart()
    handed: list[Firing] = []

    async def on_fire(firing: Firing) -> bool:
        handed.append(firing)
        return True

    runner = Runner(again, on_fire)
    svc = again.loaded.services["svc"]
    # A failed query first: still firing, but no evidence it still breaches; not yet.
    await runner.run_check(svc, svc.rules.check[0], 1015.0, answers=PrometheusError("down"))
    assert handed == []
    [evaluation] = await runner.tick(1030.0)
    assert evaluation.changes == []  # no new FIRED transition: the same firing goes on
    [firing] = handed
    assert (firing.check, firing.breach_started, firing.at) == ("fast", 1000.0, 1030.0)
    await runner.tick(1045.0)
    assert len(handed) == 1  # once: from now on it is an ordinary firing series


async def test_a_restored_for_check_fires_when_its_for_is_up(engines: Engines) -> None:
    loaded = engines.config(check("slow", extra='for = "30s"'))
    first = engines.open(loaded)
    await first.tick(1000.0)
    again = engines.restart()
    [evaluation] = await again.tick(1030.0)
    assert [c.transition for c in evaluation.changes] == [Transition.FIRED]
    [change] = evaluation.changes
    assert change.state is not None
    assert change.state.pending_since == datetime.fromtimestamp(1000.0, UTC)


async def test_a_reload_that_changes_a_threshold_keeps_pending_since(engines: Engines) -> None:
    engine = engines.open(engines.config(SLOW))
    await engine.tick(1000.0)
    changed = engines.config(check("slow", above=0.5, extra='for = "1h"'), directory="b")
    engine.replace_config(changed)
    [evaluation] = await engine.tick(1015.0)
    assert evaluation.check.threshold().value == 0.5
    assert evaluation.changes == []
    series = engine.check_state("svc", "slow").series[()]
    assert (series.phase, series.pending_since) == (
        Phase.PENDING,
        datetime.fromtimestamp(1000.0, UTC),
    )
    # And saved as such: a restart after the reload still knows when the run began.
    again = engines.restart()
    assert again.check_state("svc", "slow").series[()].pending_since == series.pending_since


async def test_removed_checks_lose_their_saved_state(engines: Engines) -> None:
    engine = engines.open(engines.config(SLOW + FAST))
    await engine.tick(1000.0)
    assert set(engine.store.check_states()) == {("svc", "slow"), ("svc", "fast")}

    engine.replace_config(engines.config(SLOW, directory="b"))
    assert set(engine.store.check_states()) == {("svc", "slow")}
    assert set(engine.states) == {("svc", "slow")}

    # Removed while the daemon was down: deleted at start, never restored.
    again = engines.restart(engines.config(FAST, directory="c"))
    assert again.states == {}
    assert again.store.check_states() == {}


async def test_an_all_ok_check_writes_nothing(engines: Engines) -> None:
    engine = engines.open(engines.config(HEALTHY + SLOW))
    svc = engine.loaded.services["svc"]
    healthy, slow = svc.rules.check
    watcher = sqlite3.connect(engines.tmp_path / "state.db")
    try:
        # data_version changes when another connection commits to the file.
        before = watcher.execute("PRAGMA data_version").fetchone()
        for i in range(5):
            await engine.run_check(svc, healthy, 1000.0 + 15 * i)
        assert watcher.execute("PRAGMA data_version").fetchone() == before
        await engine.run_check(svc, slow, 1000.0)
        assert watcher.execute("PRAGMA data_version").fetchone() != before
    finally:
        watcher.close()
    assert set(engine.store.check_states()) == {("svc", "slow")}


async def test_a_check_back_to_ok_has_its_row_deleted(engines: Engines) -> None:
    engine = engines.open(engines.config(SLOW))
    await engine.tick(1000.0)
    assert set(engine.store.check_states()) == {("svc", "slow")}
    engine.replace_config(engines.config(check("slow", above=5, extra='for = "1h"'), directory="b"))
    [evaluation] = await engine.tick(1015.0)
    assert [c.transition for c in evaluation.changes] == [Transition.CLEARED]
    assert engine.store.check_states() == {}


async def test_an_unreadable_saved_state_is_dropped_and_the_check_starts_over(
    engines: Engines,
) -> None:
    loaded = engines.config(SLOW)
    with Store(engines.tmp_path / "state.db") as store:
        store.save_check_state("svc", "slow", '{"format": 99}', 900.0)
    with capture_logs() as logs:
        engine = engines.open(loaded)
    assert engine.states == {}
    assert engine.store.check_states() == {}
    assert any("unreadable" in e["event"] for e in logs)


async def test_a_failed_save_is_logged_and_the_evaluation_goes_on(
    engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process holding the write lock past the busy timeout: a real write failure
    # (the same StoreError a full disk gives), with reads still answered (WAL).
    monkeypatch.setattr(database, "BUSY_TIMEOUT", 0.05)
    engine = engines.open(engines.config(SLOW))
    svc = engine.loaded.services["svc"]
    locker = sqlite3.connect(engines.tmp_path / "state.db", isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        with capture_logs() as logs:
            evaluation = await engine.run_check(svc, svc.rules.check[0], 1000.0)
        assert [c.transition for c in evaluation.changes] == [Transition.PENDING]
        assert engine.check_state("svc", "slow").phase is Phase.PENDING
        [critical] = [e for e in logs if e["log_level"] == "critical"]
        assert "check state not saved" in critical["event"]
        locker.execute("ROLLBACK")
    finally:
        locker.close()
    # Written at the next evaluation, once the store writes again.
    await engine.run_check(svc, svc.rules.check[0], 1015.0)
    [row] = engine.store.check_states().values()
    assert decode(row.state) == engine.check_state("svc", "slow")


async def test_forgetting_an_old_versions_series_is_saved(engines: Engines) -> None:
    header = (
        "version_query = 'max by (version) (app_build_info{service=\"checkout\"})'\n"
        'version_label = "version"\n'
    )
    errors = (
        '[[check]]\nname = "errors"\ntype = "error_rate"\nselector = \'service="checkout"\'\n'
        "errors = 'code=~\"5..\"'\nabove = 0.005\nbreaches = 1\n"
    )
    loaded = load_config(
        engines.tmp_path / "a",
        engines.url,
        {"checkout": service("checkout", errors, header=header)},
    )
    engine = engines.open(loaded)
    checkout = engine.loaded.services["checkout"]
    # 1.0.0 runs with 1% errors, above this check's 0.5%: its series fires ...
    await engine.observe_service(checkout, dataset.CHECKOUT_V1_EVAL_TIME)
    await engine.run_check(checkout, checkout.rules.check[0], dataset.CHECKOUT_V1_EVAL_TIME)
    assert engine.check_state("checkout", "errors").firing_series() == [
        (("version", dataset.CHECKOUT_V1),)
    ]
    assert set(engine.store.check_states()) == {("checkout", "errors")}
    # ... then 2.0.0 goes out: 1.0.0's series is forgotten, and so it is in the store.
    await engine.observe_service(checkout, dataset.CHECKOUT_DEPLOY_TIME + 15)
    assert engine.versions.current("checkout") == dataset.CHECKOUT_V2
    assert engine.check_state("checkout", "errors").series == {}
    assert engine.store.check_states() == {}
    assert engines.restart().states == {}


# --- the decision, end to end -----------------------------------------------------------------

STEP = 15
RECORD = str(Path(__file__).parent / "support" / "record_run.py")


def _counter(name: str, labels: str, rates: list[tuple[int, float]], end: int) -> list[str]:
    """A counter sampled every STEP seconds, growing at each ``(from, rate per second)``."""
    lines = [f"# TYPE {name} counter"]
    value = 0.0
    for i, (start, rate) in enumerate(rates):
        stop = rates[i + 1][0] if i + 1 < len(rates) else end + STEP
        for t in range(start, stop, STEP):
            lines.append(f"{name}_total{{{labels}}} {value:.6f} {t}")
            value += rate * STEP
    return lines


def breach_then_release(start: int, breach: int, release: int, end: int) -> str:
    """checkout: 1.0.0 with 1% errors from ``start``; 50% errors from ``breach`` on, still
    1.0.0; 2.0.0 from ``release`` on, as bad. OpenMetrics, for promtool."""
    lines = _counter(
        "http_requests",
        'service="checkout",code="200"',
        [(start, 9.9), (breach, 5.0)],
        end,
    )
    lines += _counter(
        "http_requests",
        'service="checkout",code="500"',
        [(start, 0.1), (breach, 5.0)],
        end,
    )[1:]
    lines.append("# TYPE app_build_info gauge")
    for t in range(start, end + STEP, STEP):
        lines.append(f'app_build_info{{service="checkout",version="1.0.0"}} {int(t < release)} {t}')
    for t in range(release, end + STEP, STEP):
        lines.append(f'app_build_info{{service="checkout",version="2.0.0"}} 1 {t}')
    return "\n".join([*lines, "# EOF", ""])


RULES = """
[service]
name = "checkout"
version_query = 'max by (version) (app_build_info{{service="checkout"}} > 0)'
bake_time = "1m"

[[rollback]]
type = "command"
argv = {argv}
timeout = "20s"

[verify]
window = "2s"
version_timeout = "5s"

[[check]]
name = "errors"
type = "error_rate"
selector = 'service="checkout"'
errors = 'code=~"5.."'
above = 0.1
window = "1m"
for = "1m"
interval = "15s"
"""


class Daemon:
    """An engine and a pipeline on one state file, wired as ``rollbackd run`` wires them."""

    def __init__(self, loaded: LoadedConfig, state: Path) -> None:
        self.store = Store(state)
        self.engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), self.store)
        self.pipeline = Pipeline(self.engine)
        self.runner = Runner(self.engine, self.pipeline.on_fire)

    async def stop(self) -> None:
        await self.pipeline.wait_idle()
        self.store.close()


@pytest.mark.prometheus
async def test_a_breach_from_before_the_release_seen_firing_after_a_restart_is_not_its_doing(
    tmp_path: Path, prometheus_factory: Callable[..., PrometheusServer]
) -> None:
    start = (int(time.time()) // 60) * 60 - 3600
    breach = start + 20 * 60
    release = breach + 60
    end = release + 10 * 60
    prometheus = prometheus_factory(start=False)
    source = tmp_path / "breach.openmetrics"
    source.write_text(breach_then_release(start, breach, release, end))
    create_blocks(source, prometheus.storage_dir)
    prometheus.start()
    prometheus.wait_ready()

    runs = tmp_path / "runs.jsonl"
    argv = json.dumps([sys.executable, RECORD, str(runs), "{to_version}"])
    loaded = load_config(tmp_path, prometheus.url, {"checkout": RULES.format(argv=argv)})
    state = tmp_path / "state.db"

    daemon = Daemon(loaded, state)
    healthy = breach - 180
    await daemon.runner.tick(healthy)
    assert daemon.engine.versions.current("checkout") == "1.0.0"
    daemon.store.mark_baked("checkout", "1.0.0", healthy + 1)
    # The whole service starts breaching, while 1.0.0 still runs ...
    await daemon.runner.tick(breach + 30)
    await daemon.runner.tick(breach + 45)
    assert daemon.engine.check_state("checkout", "errors").phase is Phase.PENDING
    # ... then 2.0.0 goes out, the breach going on; not yet for 1m, so nothing fires.
    [evaluation] = await daemon.runner.tick(release + 15)
    assert daemon.engine.versions.current("checkout") == "2.0.0"
    assert evaluation.verdict is Verdict.BREACH
    assert daemon.engine.check_state("checkout", "errors").phase is Phase.PENDING
    await daemon.stop()

    # A restart. The check fires once its for is up: a breach that began 45s before the
    # release went live, which no rollback of 2.0.0 can cure.
    daemon = Daemon(loaded, state)
    try:
        decided = False
        for t in range(release + 30, release + 150, STEP):
            await daemon.runner.tick(t)
            if daemon.store.events(types=["rollback.refused"]) or daemon.store.rollbacks():
                decided = True
                break
        assert decided, "the check never fired after the restart"
        await daemon.pipeline.wait_idle()
        assert daemon.store.rollbacks() == []
        [refused] = daemon.store.events(types=["rollback.refused"])
        failed = [g["guard"] for g in refused.data["guards"] if not g["passed"]]
        assert failed == ["breach_after_release"]
        assert refused.data["trigger"]["breach_started"] == breach + 30
        assert not runs.exists()
    finally:
        await daemon.stop()
