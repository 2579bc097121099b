"""The decision core under hypothesis' stateful testing: the real engine (check state machine,
version tracker, baking), guards and pipeline on real SQLite with real executor processes,
over a simulated clock, with Prometheus' answers scripted from a model of the service —
which version runs, whether it is bad, an incident hitting every version, no data, failed
queries — and people pausing, resuming, thawing, switching modes, approving, rejecting and
restarting the daemon in any order.

After every step the invariants of docs/decisions.md hold:

1. at most one execution per release;
2. no rollback for a breach that began before the release;
3. no bad release left live while its check fires and no guard that cannot lapse refuses;
4. no version baked without evidence;
5. a pending approval never runs against another release.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from rollbackd.config.loader import load
from rollbackd.core.model import RollbackState
from rollbackd.core.samples import QueryResult, ResultType, Sample, labels_of
from rollbackd.prometheus import PrometheusUnavailable
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.guard_facts import release_id
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.runner import Runner
from rollbackd.runtime.verify import Verifier
from rollbackd.store.errors import ConflictError
from rollbackd.store.sqlite import Store
from support.configs import write_config
from support.daemon_process import set_mode

STEP = 15.0
"""The checks' interval: one evaluation per step."""
BAKE = 120.0
COOLDOWN = 60.0
WRITE_VERSION = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"


def rules(deployed: Path) -> str:
    argv = [sys.executable, "-c", WRITE_VERSION, str(deployed), "{to_version}"]
    return f"""
[service]
name = "svc"
version_query = 'build_info'
bake_time = "{BAKE:g}s"
rollback_window = "1h"

[[rollback]]
type = "command"
argv = {json.dumps(argv)}
timeout = "20s"

[verify]
window = "30s"
version_timeout = "1m"

[[check]]
name = "health"
type = "query"
query = 'health'
above = 0.5
interval = "{STEP:g}s"
breaches = 3
"""


@dataclass
class Tick:
    at: float
    version: str
    health: str
    """``bad``, ``good``, ``nodata`` or ``error``: what the check's query answered."""


@dataclass
class Model:
    """The service as the scripted Prometheus shows it."""

    deployed: Path
    bad_versions: set[str] = field(default_factory=set)
    incident: bool = False
    nodata: bool = False
    blip: bool = False
    """The next evaluation's queries fail (Prometheus blipping)."""
    ticks: list[Tick] = field(default_factory=list)

    @property
    def version(self) -> str:
        return self.deployed.read_text()

    def health(self) -> str:
        if self.blip:
            return "error"
        if self.nodata:
            return "nodata"
        return "bad" if self.incident or self.version in self.bad_versions else "good"


class ScriptedPrometheus:
    def __init__(self, model: Model) -> None:
        self.model = model

    async def aquery(
        self, expr: str, *, at: float | None = None, deadline: float | None = None
    ) -> QueryResult:
        t = 0.0 if at is None else at
        if self.model.blip:
            raise PrometheusUnavailable("scripted: Prometheus is restarting", reason="unavailable")
        if expr == "build_info":
            labels = labels_of({"version": self.model.version})
            return QueryResult(expr, ResultType.VECTOR, (Sample(labels, 1.0, t),))
        health = self.model.health()
        if health == "nodata":
            return QueryResult(expr, ResultType.VECTOR, ())
        value = 1.0 if health == "bad" else 0.0
        return QueryResult(expr, ResultType.VECTOR, (Sample((), value, t),))


class Decisions(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="rollbackd-stateful-"))
        deployed = self.dir / "deployed"
        deployed.write_text("v1")
        self.model = Model(deployed)
        self.config = write_config(
            self.dir,
            "http://127.0.0.1:9",
            {"svc": rules(deployed)},
            extra=f'[guards]\ncooldown = "{COOLDOWN:g}s"\nmax_rollbacks = 100\nwindow = "1h"\n',
        )
        self.mode = "auto"
        self.store = Store(self.dir / "state.db")
        self.now = 1_000_000.0
        self.releases = 1
        self.loop = asyncio.new_event_loop()
        self.paused = False
        self.decided = False
        """Whether the last step let the daemon evaluate and decide."""
        self.approvals: list[tuple[int, str, int]] = []
        """(rollback, version live at the approval, its release) for each approval that ran."""
        self.start()

    # -- the daemon's parts -------------------------------------------------------------

    def start(self) -> None:
        set_mode(self.config, self.mode)
        loaded = load(self.config)
        self.engine = Engine(loaded, ScriptedPrometheus(self.model), self.store)  # type: ignore[arg-type]
        verifier = Verifier(self.engine, clock=lambda: self.now, sleep=self._sleep)
        self.pipeline = Pipeline(self.engine, clock=lambda: self.now, verifier=verifier)
        self.runner = Runner(self.engine, self.pipeline.on_fire)

    async def _sleep(self, seconds: float) -> None:
        """The verifier waits between its evaluations; meanwhile the daemon's own jobs go
        on evaluating every check, as its scheduler runs them beside a verification."""
        self.now += seconds
        self.model.ticks.append(Tick(self.now, self.model.version, self.model.health()))
        await self.runner.tick(self.now)

    def run(self, work: object) -> object:
        return self.loop.run_until_complete(work)  # type: ignore[arg-type]

    def teardown(self) -> None:
        for r in self.store.rollbacks(service="svc", limit=1000):
            event(f"rollback {r.state.value}")
        event(f"releases {self.releases // 3 * 3}+, ticks {len(self.model.ticks) // 20 * 20}+")
        self.run(self.pipeline.wait_idle())
        self.store.close()
        self.loop.close()

    # -- what happens to the service ------------------------------------------------------

    @initialize()
    def bake_the_first_version(self) -> None:
        """v1 serves healthy for longer than bake_time: the last known good to come back to."""
        self.tick(10)

    @rule(bad=st.booleans(), steps=st.integers(min_value=0, max_value=10))
    def release(self, bad: bool, steps: int) -> None:
        self.releases += 1
        version = f"v{self.releases}"
        if bad:
            self.model.bad_versions.add(version)
        self.model.deployed.write_text(version)
        self.tick(steps)

    @rule(index=st.integers(min_value=1, max_value=8), steps=st.integers(min_value=0, max_value=10))
    def redeploy(self, index: int, steps: int) -> None:
        """An older version deployed again (by a person, or CI)."""
        self.model.deployed.write_text(f"v{min(index, self.releases)}")
        self.tick(steps)

    @rule(
        condition=st.sampled_from(["healthy", "incident", "no data"]),
        steps=st.integers(min_value=0, max_value=10),
    )
    def conditions(self, condition: str, steps: int) -> None:
        """An incident hitting every version, or the metrics gone, or neither."""
        self.model.incident = condition == "incident"
        self.model.nodata = condition == "no data"
        self.tick(steps)

    @rule()
    def blip(self) -> None:
        """Prometheus blips for one evaluation."""
        self.model.blip = True
        self.tick(1)
        self.model.blip = False

    @rule(steps=st.integers(min_value=1, max_value=12))
    def tick(self, steps: int) -> None:
        """The service runs on: every step, each check once and the pipeline's sweep.
        Zero steps: a person's next action comes at once."""
        self.decided = steps > 0
        for _ in range(steps):
            self.model.ticks.append(Tick(self.now, self.model.version, self.model.health()))
            self.run(self.runner.tick(self.now))
            self.run(self.pipeline.housekeeping())
            self.run(self.pipeline.wait_idle())
            self.now += STEP

    # -- what people do ------------------------------------------------------------------

    @rule(steps=st.integers(min_value=0, max_value=10))
    def pause(self, steps: int) -> None:
        self.store.set_pause("svc", True, self.now)
        self.paused = True
        self.tick(steps)

    @rule(steps=st.integers(min_value=0, max_value=10))
    def resume(self, steps: int) -> None:
        """``rollbackd resume svc``: also thaws."""
        self.store.set_pause("svc", False, self.now)
        self.store.set_frozen("svc", False)
        self.paused = False
        self.tick(steps)

    @rule(
        mode=st.sampled_from(["auto", "approve", "dry-run"]),
        steps=st.integers(min_value=0, max_value=10),
    )
    def switch_mode(self, mode: str, steps: int) -> None:
        """SIGHUP with another mode."""
        self.mode = mode
        set_mode(self.config, self.mode)
        self.engine.replace_config(load(self.config))
        self.tick(steps)

    @rule(approve=st.booleans(), steps=st.integers(min_value=0, max_value=10))
    def decide_pending(self, approve: bool, steps: int) -> None:
        pending = self.store.rollbacks(states=[RollbackState.PENDING], limit=1)
        if pending:
            current = self.engine.versions.current("svc")
            release = release_id(self.store, "svc", current)
            try:
                if approve:
                    self.run(self.pipeline.approve(pending[0].id, "alice"))
                    self.approvals.append((pending[0].id, current or "", release))
                else:
                    self.run(self.pipeline.reject(pending[0].id, "bob"))
            except ConflictError:
                pass
            self.run(self.pipeline.wait_idle())
        self.tick(steps)

    @rule(
        guard=st.sampled_from(["paused", "frozen", "dry-run"]),
        steps=st.integers(min_value=1, max_value=10),
    )
    def bad_release_while_guarded(self, guard: str, steps: int) -> None:
        """A bad release goes out while automation is held back (paused, frozen, or in
        dry-run mode), fires, and is refused; then a person lifts the hold."""
        if guard == "paused":
            self.store.set_pause("svc", True, self.now)
        elif guard == "frozen":
            self.store.set_frozen("svc", True, "a person froze it")
        else:
            self.switch_mode("dry-run", 0)
        self.release(True, 6)
        if guard == "dry-run":
            self.switch_mode("auto", 0)
        else:
            self.resume(0)
        self.tick(steps)

    @rule(steps=st.integers(min_value=0, max_value=10))
    def restart(self, steps: int) -> None:
        self.run(self.pipeline.wait_idle())
        self.start()
        self.run(self.pipeline.recover())
        self.run(self.pipeline.wait_idle())
        self.tick(steps)

    # -- invariants ----------------------------------------------------------------------

    def went_live(self, release_id: int) -> float:
        for change in self.store.version_changes("svc", 1000):
            if change.id == release_id:
                return change.at
        return math.inf

    @invariant()
    def one_execution_per_release(self) -> None:
        executed = Counter(
            (r.from_version, r.release_id)
            for r in self.store.rollbacks(service="svc", limit=1000)
            if r.state.executed
        )
        assert all(n == 1 for n in executed.values()), executed

    @invariant()
    def no_rollback_for_a_breach_older_than_its_release(self) -> None:
        for r in self.store.rollbacks(service="svc", limit=1000):
            if not r.automatic or r.state is RollbackState.DRY_RUN:
                continue
            began = r.trigger.get("breach_started")
            assert isinstance(began, float | int)
            live = self.went_live(r.release_id)
            assert began >= live - STEP, (r, live)
            # The model agrees: the run of bad evaluations that holds the breach began
            # after the release (failed queries continue a run, no data ends it).
            start = self.run_start(float(began))
            assert start >= live - STEP, (r, start, live)

    def run_start(self, at: float) -> float:
        """When the breach under way at ``at`` began, by a reference model of the check's
        rule run over what the scripted Prometheus answered: 3 breaches in a row fire; no
        data ends a pending run, a failed query holds it for 3 evaluations; only an OK
        evaluation ends a firing one. ``inf`` when no breach is under way."""
        phase, since, count, held = "ok", math.inf, 0, 0
        for tick in (t for t in self.model.ticks if t.at <= at):
            if tick.health == "good":
                phase, since, count, held = "ok", math.inf, 0, 0
            elif tick.health == "bad":
                if phase == "ok":
                    phase, since, count = "pending", tick.at, 0
                count, held = count + 1, 0
                if count >= 3:
                    phase = "firing"
            elif phase == "pending" and (tick.health == "nodata" or held >= 3):
                phase, since, count, held = "ok", math.inf, 0, 0
            elif phase == "pending":
                held += 1
        return since

    @invariant()
    def no_bad_release_left_live(self) -> None:
        # Judged after the daemon had a chance to decide: a tick since the last person's
        # action (a resume is acted on at the next housekeeping pass, within seconds).
        if not self.decided:
            return
        state = self.store.service_state("svc")
        current = self.engine.versions.current("svc")
        if state is None or current is None or current not in self.model.bad_versions:
            return
        if self.mode != "auto" or self.paused or state.frozen or self.model.incident:
            return
        release = release_id(self.store, "svc", current)
        live = self.went_live(release)
        recent = [t for t in self.model.ticks if t.at >= live]
        # Bad, judged, for long enough after the release to fire and be decided — in a run
        # of bad evaluations that began after the release (one that began before it is not
        # the release's doing, even when the release is bad too).
        if len(recent) < 6 or any(t.health != "bad" for t in recent):
            return
        if self.run_start(recent[-1].at) < live:
            return
        if self.engine.versions.last_known_good("svc") is None:
            return  # no target: refused for good
        latest = [
            r
            for r in self.store.rollbacks(service="svc", limit=1000)
            if r.automatic and r.state.executed
        ]
        started = max((r.started_at or r.created_at for r in latest), default=-math.inf)
        if self.model.ticks[-1].at < started + COOLDOWN + STEP:
            return  # the cooldown may still hold it, or only just lapsed
        event("a bad release was live with nothing to stop its rollback")
        assert self.store.latest_rollback("svc", current, release) is not None, (
            current,
            release,
            self.store.rollbacks(service="svc", limit=5),
        )

    @invariant()
    def no_version_baked_without_evidence(self) -> None:
        for record in self.store.versions("svc"):
            if record.baked_at is None:
                continue
            # After the period's start: a tick at the very moment of a release is the old
            # version's.
            window = [
                t for t in self.model.ticks if record.baked_at - BAKE < t.at <= record.baked_at
            ]
            assert window and all(t.version == record.version for t in window), record
            good = sum(1 for t in window if t.health == "good")
            assert good * 2 > len(window), (record, window)

    @invariant()
    def approvals_run_against_their_own_release(self) -> None:
        for rollback_id, version, release in self.approvals:
            r = self.store.rollback(rollback_id)
            assert r is not None
            if r.decided_by == "alice" and r.state.executed:
                assert (r.from_version, r.release_id) == (version, release), r


EXPLORE = os.environ.get("ROLLBACKD_EXPLORE") == "1"
"""``ROLLBACKD_EXPLORE=1``: search new examples (many more, random); by default the same
examples every run, so CI is reproducible and never fails by chance."""

Decisions.TestCase.settings = settings(
    max_examples=400 if EXPLORE else 40,
    stateful_step_count=40,
    deadline=None,
    derandomize=not EXPLORE,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_decisions_hold_in_any_order = Decisions.TestCase
