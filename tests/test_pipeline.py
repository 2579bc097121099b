"""The decision pipeline on real SQLite and real processes, without Prometheus: a service
judged by Alertmanager alerts only (no checks, no version_query), its releases recorded
through the tracker as CI would. Guards, idempotency, approve, dry-run, fallback."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rollbackd.config.loader import load
from rollbackd.core.model import RollbackState
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.pipeline import REFUSAL_QUIET, Pipeline, Trigger
from rollbackd.runtime.service_locks import ServiceLocks
from rollbackd.store.errors import ConflictError
from rollbackd.store.sqlite import Store
from support.configs import write_config

RECORD = str(Path(__file__).parent / "support" / "record_run.py")


def rules(executors: str) -> str:
    return f"""
[service]
name = "api"
rollback_window = "1h"

{executors}

[verify]
window = "100ms"

[[alert]]
alertname = "ApiDown"
"""


def recorder(log: Path, *extra: str) -> str:
    argv = [sys.executable, RECORD, str(log), "{to_version}", "{reason}", *extra]
    return f'[[rollback]]\ntype = "command"\nargv = {json.dumps(argv)}\ntimeout = "20s"\n'


class Setup:
    def __init__(self, tmp_path: Path, executors: str, guards: str = "", mode: str = "auto"):
        self.log = tmp_path / "runs.jsonl"
        extra = f"[guards]\n{guards}\n" if guards else ""
        # Prometheus is never asked: the service has no checks and no version_query.
        config = write_config(
            tmp_path,
            "http://127.0.0.1:9",
            {"api": rules(executors.replace("LOG", str(self.log)))},
            extra=extra,
        )
        text = config.read_text().replace("[daemon]\n", f'[daemon]\nmode = "{mode}"\n', 1)
        config.write_text(text)
        loaded = load(config)
        self.store = Store(tmp_path / "state.db")
        self.engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), self.store)
        self.pipeline = Pipeline(self.engine)
        self.now = 1_000_000.0

    async def release(self, version: str, *, bake: bool = True) -> None:
        """A release recorded by CI; with ``bake``, it bakes into the last known good."""
        self.now += 10
        await self.engine.versions.record_release("api", version, self.now)
        if bake:
            await self.engine.versions.update_bake("api", self.now, True, timedelta(seconds=1))
            self.now += 5
            await self.engine.versions.update_bake("api", self.now, True, timedelta(seconds=1))

    def trigger(
        self, *, automatic: bool = True, to: str | None = None, reason: str = "ApiDown"
    ) -> Trigger:
        self.now += 1
        return Trigger(
            service="api",
            source="alert" if automatic else "manual",
            reason=reason,
            at=self.now,
            automatic=automatic,
            breach_started=self.now - 0.5 if automatic else None,
            to_version=to,
            requested_by=None if automatic else "alice",
        )

    def runs(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def events(self) -> list[str]:
        return [
            e.type
            for e in reversed(self.store.events(limit=1000))
            if e.type.startswith(("rollback.", "canary.", "verify.", "service."))
        ]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[type[Setup]]:
    made: list[Setup] = []

    class Made(Setup):
        def __init__(self, executors: str, guards: str = "", mode: str = "auto") -> None:
            super().__init__(tmp_path / f"s{len(made)}", executors, guards, mode)
            made.append(self)

    yield Made
    for setup in made:
        setup.store.close()


async def test_bad_release_rolled_back_once_to_the_last_known_good(make: type[Setup]) -> None:
    s = make(recorder(Path("LOG")))
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    first = await s.pipeline.submit(s.trigger(reason='ApiDown "critical"; $(rm -rf /)'))
    assert first.outcome == "executing"
    await s.pipeline.wait_idle()
    second = await s.pipeline.submit(s.trigger())
    assert second.outcome == "joined"
    assert second.rollback is not None and second.rollback.id == first.rollback.id  # type: ignore[union-attr]
    [run] = s.runs()
    assert run["argv"][0:2] == ["1.0.0", 'ApiDown "critical"; $(rm -rf /)']
    assert run["env"]["ROLLBACKD_FROM_VERSION"] == "2.0.0"
    assert run["env"]["ROLLBACKD_ROLLBACK_ID"] == f"rb-{first.rollback.id}"  # type: ignore[union-attr]
    done = s.store.rollback(first.rollback.id)  # type: ignore[union-attr]
    assert done is not None and done.state is RollbackState.SUCCEEDED
    assert (done.from_version, done.to_version) == ("2.0.0", "1.0.0")
    assert [g["guard"] for g in done.guards][-1] == "mode"
    steps = s.store.steps(done.id)
    assert [(st.kind, st.ok) for st in steps] == [("rollback", True), ("verify", True)]
    assert len(s.store.triggers(done.id)) == 1
    assert s.events() == ["rollback.started", "rollback.succeeded"]
    bad = s.store.version("api", "2.0.0")
    assert bad is not None and bad.bad


@pytest.mark.faults
async def test_failing_first_executor_falls_back_to_the_second(make: type[Setup]) -> None:
    s = make(recorder(Path("LOG"), "--fail") + recorder(Path("LOG")))
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    submitted = await s.pipeline.submit(s.trigger())
    await s.pipeline.wait_idle()
    steps = s.store.steps(submitted.rollback.id)  # type: ignore[union-attr]
    assert [(st.kind, st.ok) for st in steps] == [
        ("rollback", False),
        ("rollback", True),
        ("verify", True),
    ]
    assert steps[0].summary == "exit 1"
    assert "deploy failed" in steps[0].stderr_tail
    assert len(s.runs()) == 2


@pytest.mark.faults
async def test_all_executors_failing_freezes_the_service(make: type[Setup]) -> None:
    s = make(recorder(Path("LOG"), "--fail"))
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    submitted = await s.pipeline.submit(s.trigger())
    await s.pipeline.wait_idle()
    done = s.store.rollback(submitted.rollback.id)  # type: ignore[union-attr]
    assert done is not None and done.state is RollbackState.FAILED
    assert s.events() == ["rollback.started", "rollback.failed", "service.frozen"]
    state = s.store.service_state("api")
    assert state is not None and state.frozen
    # Frozen: the next release's automatic trigger is refused; a person may still act.
    await s.release("3.0.0", bake=False)
    refused = await s.pipeline.submit(s.trigger())
    assert refused.outcome == "refused"
    assert refused.reason.startswith("the service is frozen: rollback")


async def test_cooldown_holds_for_automatic_but_not_for_a_person(make: type[Setup]) -> None:
    s = make(recorder(Path("LOG")), guards='cooldown = "15m"')
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    await s.pipeline.submit(s.trigger())
    await s.pipeline.wait_idle()
    await s.release("3.0.0", bake=False)
    refused = await s.pipeline.submit(s.trigger())
    assert refused.outcome == "refused"
    assert "within cooldown 15m" in refused.reason
    manual = await s.pipeline.submit(s.trigger(automatic=False, to="1.0.0"))
    assert manual.outcome == "executing"
    await s.pipeline.wait_idle()
    assert len(s.runs()) == 2


async def test_max_rollbacks_freezes_the_service(make: type[Setup]) -> None:
    s = make(recorder(Path("LOG")), guards='cooldown = "1ms"\nmax_rollbacks = 2\nwindow = "1h"')
    await s.release("1.0.0")
    for version in ("2.0.0", "3.0.0"):
        await s.release(version, bake=False)
        assert (await s.pipeline.submit(s.trigger())).outcome == "executing"
        await s.pipeline.wait_idle()
    await s.release("4.0.0", bake=False)
    refused = await s.pipeline.submit(s.trigger())
    assert refused.outcome == "refused"
    assert "(max_rollbacks 2): freezing the service" in refused.reason
    assert s.events()[-2:] == ["rollback.refused", "service.frozen"]
    assert len(s.runs()) == 2


async def test_no_last_known_good_refuses_when_the_executor_needs_a_target(
    make: type[Setup],
) -> None:
    s = make(recorder(Path("LOG")))
    await s.release("2.0.0", bake=False)
    refused = await s.pipeline.submit(s.trigger())
    assert refused.outcome == "refused"
    assert refused.reason.startswith("no version to roll back to")
    assert s.runs() == []


async def test_approve_mode_waits_for_a_person(make: type[Setup]) -> None:
    s = make(recorder(Path("LOG")), mode="approve")
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    pending = await s.pipeline.submit(s.trigger())
    assert pending.outcome == "pending_approval"
    assert s.runs() == []
    assert (await s.pipeline.submit(s.trigger())).outcome == "joined"
    s.pipeline.clock = lambda: s.now  # the triggers' time: the approval is in time
    approved = await s.pipeline.approve(pending.rollback.id, "alice")  # type: ignore[union-attr]
    assert approved.decided_by == "alice"
    await s.pipeline.wait_idle()
    assert len(s.runs()) == 1
    done = s.store.rollback(approved.id)
    assert done is not None and done.state is RollbackState.SUCCEEDED


async def test_reject_and_expiry(make: type[Setup]) -> None:
    s = make(recorder(Path("LOG")), mode="approve")
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    pending = await s.pipeline.submit(s.trigger())
    rejected = await s.pipeline.reject(pending.rollback.id, "bob", "known flaky")  # type: ignore[union-attr]
    assert rejected.state is RollbackState.REJECTED
    assert rejected.outcome == "rejected by bob: known flaky"
    with pytest.raises(ConflictError):
        await s.pipeline.approve(rejected.id, "alice")
    # A rejected release is not asked about again.
    assert (await s.pipeline.submit(s.trigger())).outcome == "joined"

    await s.release("3.0.0", bake=False)
    waiting = await s.pipeline.submit(s.trigger())
    assert waiting.outcome == "pending_approval"
    s.pipeline.clock = lambda: s.now + 3600  # the approval timeout (30m) has passed
    [expired] = await s.pipeline.expire_pending()
    assert expired.state is RollbackState.EXPIRED
    assert s.runs() == []


async def test_an_approval_after_the_deadline_is_refused_before_the_sweep(
    make: type[Setup],
) -> None:
    s = make(recorder(Path("LOG")), mode="approve")
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    pending = await s.pipeline.submit(s.trigger())
    assert pending.rollback is not None and pending.rollback.expires_at is not None
    deadline = pending.rollback.expires_at
    s.pipeline.clock = lambda: deadline  # the sweep has not run yet
    with pytest.raises(ConflictError, match=f"rollback {pending.rollback.id} is expired"):
        await s.pipeline.approve(pending.rollback.id, "alice")
    await s.pipeline.wait_idle()
    assert s.runs() == []
    done = s.store.rollback(pending.rollback.id)
    assert done is not None and done.state is RollbackState.EXPIRED
    assert s.events()[-1] == "rollback.expired"


async def test_dry_run_records_and_announces_without_executing(make: type[Setup]) -> None:
    s = make(recorder(Path("LOG")), mode="dry-run")
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    submitted = await s.pipeline.submit(s.trigger())
    assert submitted.outcome == "dry_run"
    await s.pipeline.wait_idle()
    assert s.runs() == []
    rollback = s.store.rollback(submitted.rollback.id)  # type: ignore[union-attr]
    assert rollback is not None and rollback.state is RollbackState.DRY_RUN
    [event] = s.store.events(types=["rollback.pending"])
    assert event.data["dry_run"] is True
    assert event.data["would"] == "roll back api 2.0.0 -> 1.0.0"


async def test_pause_stops_automatic_rollbacks(make: type[Setup]) -> None:
    s = make(recorder(Path("LOG")))
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    s.store.set_pause("api", True, s.now)
    refused = await s.pipeline.submit(s.trigger())
    assert (refused.outcome, refused.reason) == (
        "refused",
        "automatic rollbacks are paused for this service",
    )
    s.store.set_pause("api", False, s.now)
    assert (await s.pipeline.submit(s.trigger())).outcome == "executing"
    await s.pipeline.wait_idle()


@pytest.mark.faults
async def test_a_storm_of_refused_triggers_is_announced_once_per_quiet_period(
    make: type[Setup],
) -> None:
    s = make(recorder(Path("LOG")))
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    s.store.set_pause("api", True, s.now)
    storm = s.trigger()  # 2,000 alerts within the same second
    outcomes = {(await s.pipeline.submit(storm)).outcome for _ in range(2000)}
    assert outcomes == {"refused"}  # every trigger is answered, and refused
    assert s.events().count("rollback.refused") == 1
    # Another reason is another refusal: announced.
    s.store.set_pause("api", False, s.now)
    s.store.set_frozen("api", True, "a person froze it")
    assert (await s.pipeline.submit(s.trigger())).outcome == "refused"
    assert s.events().count("rollback.refused") == 2
    # After the quiet period the same refusal is announced again.
    s.store.set_frozen("api", False)
    s.store.set_pause("api", True, s.now)
    s.now += REFUSAL_QUIET
    assert (await s.pipeline.submit(s.trigger())).outcome == "refused"
    assert s.events().count("rollback.refused") == 3
    assert s.runs() == []


@pytest.mark.faults
async def test_unsafe_manual_target_is_never_run(make: type[Setup]) -> None:
    s = make(recorder(Path("LOG")))
    await s.release("2.0.0", bake=False)
    submitted = await s.pipeline.submit(s.trigger(automatic=False, to="../../etc"))
    await s.pipeline.wait_idle()
    assert s.runs() == []
    steps = s.store.steps(submitted.rollback.id)  # type: ignore[union-attr]
    assert not steps[0].ok
    assert "not a safe version" in steps[0].summary


# -- decisions stay atomic: the writes are awaited, yet one release gets one rollback -------


def slow_writes(monkeypatch: pytest.MonkeyPatch, store: Store, seconds: float = 0.005) -> None:
    """Every write a decision awaits takes longer on the writer thread, so that many
    decisions are in flight at once, each between its reads and its write."""
    for name in ("create_rollback", "add_trigger", "add_event", "set_rollback_state"):
        write = getattr(store, name)

        def slowed(*args: Any, _write: Callable[..., Any] = write, **kwargs: Any) -> Any:
            time.sleep(seconds)
            return _write(*args, **kwargs)

        monkeypatch.setattr(store, name, slowed)


@pytest.mark.faults
@pytest.mark.parametrize(
    ("mode", "outcome"),
    [("auto", "executing"), ("dry-run", "dry_run"), ("approve", "pending_approval")],
)
async def test_concurrent_triggers_for_one_release_make_one_rollback_the_rest_join(
    make: type[Setup], monkeypatch: pytest.MonkeyPatch, mode: str, outcome: str
) -> None:
    s = make(recorder(Path("LOG")), mode=mode)
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    slow_writes(monkeypatch, s.store)
    storm = [s.trigger(reason=f"ApiDown on instance {i}") for i in range(50)]
    submissions = await asyncio.gather(*(s.pipeline.submit(t) for t in storm))
    await s.pipeline.wait_idle()
    outcomes = [sub.outcome for sub in submissions]
    assert (outcomes.count(outcome), outcomes.count("joined")) == (1, 49)
    [rollback] = s.store.rollbacks(service="api")
    assert {sub.rollback.id for sub in submissions if sub.rollback} == {rollback.id}
    # Each joined trigger is recorded against the one rollback (a dry run, which the
    # database does not key by release, would otherwise be recorded 50 times).
    assert len(s.store.triggers(rollback.id)) == 49
    assert len(s.runs()) == (1 if mode == "auto" else 0)


@pytest.mark.faults
async def test_an_approval_and_a_rejection_at_once_are_decided_in_turn(
    make: type[Setup], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = make(recorder(Path("LOG")), mode="approve")
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    pending = await s.pipeline.submit(s.trigger())
    assert pending.rollback is not None
    s.pipeline.clock = lambda: s.now
    slow_writes(monkeypatch, s.store)
    approved, rejected = await asyncio.gather(
        s.pipeline.approve(pending.rollback.id, "alice"),
        s.pipeline.reject(pending.rollback.id, "bob"),
        return_exceptions=True,
    )
    await s.pipeline.wait_idle()
    assert not isinstance(approved, BaseException) and approved.decided_by == "alice"
    assert isinstance(rejected, ConflictError)
    assert s.events() == ["rollback.pending", "rollback.started", "rollback.succeeded"]
    assert len(s.runs()) == 1


async def test_the_service_lock_is_not_held_while_a_rollback_runs(make: type[Setup]) -> None:
    s = make(recorder(Path("LOG"), "--hang"))
    await s.release("1.0.0")
    await s.release("2.0.0", bake=False)
    assert (await s.pipeline.submit(s.trigger())).outcome == "executing"
    for _ in range(500):  # poll, bounded: the executor has started and hangs
        if s.runs():
            break
        await asyncio.sleep(0.01)
    assert s.runs()
    # Decided at once while the executor still runs: joined, not queued behind it.
    joined = await asyncio.wait_for(s.pipeline.submit(s.trigger()), timeout=10)
    assert joined.outcome == "joined"
    await s.pipeline.interrupt_all("the test is over")
    [rollback] = s.store.rollbacks(service="api")
    assert rollback.state is RollbackState.RUNNING
    assert len(s.store.triggers(rollback.id)) == 1


async def test_a_service_lock_taken_twice_by_one_task_is_an_error_not_a_deadlock() -> None:
    locks = ServiceLocks()
    async with locks.hold("api"):
        with pytest.raises(RuntimeError, match="already holds the lock of service 'api'"):
            async with locks.hold("api"):
                pass
        async with locks.hold("web"):  # another service's lock: no wait
            pass
    async with locks.hold("api"):  # released after the error
        pass
