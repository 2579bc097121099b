"""Decisions that stay right over time, on real SQLite and real executor processes: a refusal
that may lapse is decided again while its trigger still fires; one that cannot is not; an
approval is decided against the present; a service without versions gets one rollback per
firing episode; a frozen service pages once; a stop leaves rollbacks to the next start's
recovery.

The service is judged by Alertmanager alerts (delivered through the real receiver and
stored), its releases recorded as CI would; the time is simulated.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rollbackd.config.loader import load
from rollbackd.core.model import RollbackState
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.alert_intake import AlertReceiver, Delivery, IncomingAlert
from rollbackd.runtime.control import Control
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.verify import Verifier
from rollbackd.store.errors import ConflictError
from rollbackd.store.sqlite import Store
from support.configs import write_config
from support.daemon_process import alert_service, set_mode


class World:
    def __init__(
        self,
        tmp_path: Path,
        *,
        guards: str = "",
        mode: str = "auto",
        target: bool = True,
        executor_args: tuple[str, ...] = (),
    ) -> None:
        self.log = tmp_path / "runs.jsonl"
        self.config = write_config(
            tmp_path,
            "http://127.0.0.1:9",  # never asked: no checks, no version_query
            {
                "api": alert_service(
                    "api", self.log, alertname="ApiDown", target=target, executor_args=executor_args
                )
            },
            extra=f"[guards]\n{guards}\n" if guards else "",
        )
        set_mode(self.config, mode)
        self.store = Store(tmp_path / "state.db")
        loaded = load(self.config)
        self.engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), self.store)
        self.now = 1_000_000.0
        verifier = Verifier(self.engine, clock=lambda: self.now, sleep=self._sleep)
        self.pipeline = Pipeline(self.engine, clock=lambda: self.now, verifier=verifier)
        self.receiver = AlertReceiver(Control(self.pipeline), clock=lambda: self.now)
        self.alerts = 0

    async def _sleep(self, seconds: float) -> None:
        """The verifier's wait, in simulated time."""
        self.now += seconds
        await asyncio.sleep(0)

    def reload(self) -> None:
        """What SIGHUP does to the engine's config."""
        self.engine.replace_config(load(self.config))

    async def release(self, version: str, *, good: bool = False) -> None:
        self.now += 10
        await self.engine.versions.record_release("api", version, self.now)
        if good:
            assert self.store.mark_baked("api", version, self.now)

    async def alert(
        self, *, started: float | None = None, status: str = "firing", fingerprint: str = ""
    ) -> str:
        """Deliver one ApiDown alert (a new one unless ``fingerprint`` is given)."""
        self.now += 1
        if not fingerprint:
            self.alerts += 1
            fingerprint = f"{self.alerts:016x}"
        begun = self.now - 1 if started is None else started
        alert = IncomingAlert(
            fingerprint=fingerprint,
            status=status,
            starts_at=datetime.fromtimestamp(begun, tz=UTC),
            ends_at=None if status == "firing" else datetime.fromtimestamp(self.now, tz=UTC),
            labels={"alertname": "ApiDown", "severity": "critical"},
            annotations={"summary": "api is down"},
            generator_url="",
        )
        [result] = await self.receiver.receive(Delivery("rollbackd", "{}:{}", [alert]))
        return result.alert.outcome

    async def reconsider(self, seconds: float = 5.0) -> None:
        self.now += seconds
        await self.pipeline.reconsider(self.now)
        await self.pipeline.wait_idle()

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

    def rollbacks(self) -> list[tuple[str | None, str | None, RollbackState]]:
        return [
            (r.from_version, r.to_version, r.state)
            for r in reversed(self.store.rollbacks(service="api"))
        ]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[type[World]]:
    made: list[World] = []

    class Made(World):
        def __init__(self, **kwargs: object) -> None:
            super().__init__(tmp_path / f"w{len(made)}", **kwargs)  # type: ignore[arg-type]
            made.append(self)

    yield Made
    for w in made:
        w.store.close()


async def test_a_cooldown_refusal_is_decided_again_once_the_cooldown_ends(
    world: type[World],
) -> None:
    w = world(guards='cooldown = "10m"')
    await w.release("1.0.0", good=True)
    await w.release("2.0.0")
    assert (await w.alert()).startswith("executing")
    await w.pipeline.wait_idle()
    await w.release("3.0.0")
    assert (await w.alert()).startswith("refused: the last automatic rollback started")
    for _ in range(10):  # still within the cooldown: nothing new, nothing announced
        await w.reconsider(30)
    assert len(w.runs()) == 1
    assert w.events().count("rollback.refused") == 1
    await w.reconsider(600)  # the cooldown is over, the alert still fires
    assert len(w.runs()) == 2
    assert w.rollbacks()[-1] == ("3.0.0", "1.0.0", RollbackState.SUCCEEDED)
    for _ in range(3):  # decided once: never again, nothing more recorded
        await w.reconsider()
    assert len(w.runs()) == 2
    [second] = w.store.rollbacks(service="api", limit=1)
    assert w.store.triggers(second.id) == []  # joined triggers: none recorded again
    assert w.events().count("rollback.started") == 2


async def test_a_refusal_while_paused_is_decided_again_after_resume(world: type[World]) -> None:
    w = world()
    await w.release("1.0.0", good=True)
    await w.release("2.0.0")
    w.store.set_pause("api", True, w.now)
    assert (await w.alert()).startswith("refused: automatic rollbacks are paused")
    await w.reconsider()
    assert w.runs() == []
    w.store.set_pause("api", False, w.now)
    await w.reconsider()
    assert [r["argv"] for r in w.runs()] == [["1.0.0"]]


async def test_a_refusal_while_frozen_is_decided_again_after_a_thaw(world: type[World]) -> None:
    w = world()
    await w.release("1.0.0", good=True)
    await w.release("2.0.0")
    w.store.set_frozen("api", True, "a person froze it")
    assert (await w.alert()).startswith("refused: the service is frozen")
    await w.reconsider()
    assert w.runs() == []
    w.store.set_frozen("api", False)
    await w.reconsider()
    assert len(w.runs()) == 1


async def test_a_resolved_alert_is_not_decided_again(world: type[World]) -> None:
    w = world()
    await w.release("1.0.0", good=True)
    await w.release("2.0.0")
    w.store.set_pause("api", True, w.now)
    fingerprint = "00000000000000aa"
    await w.alert(fingerprint=fingerprint, started=w.now)
    await w.alert(fingerprint=fingerprint, started=w.now - 1, status="resolved")
    w.store.set_pause("api", False, w.now)
    await w.reconsider()
    assert w.runs() == []


async def test_dry_run_then_auto_by_reload_rolls_the_live_bad_release_back(
    world: type[World],
) -> None:
    w = world(mode="dry-run")
    await w.release("1.0.0", good=True)
    await w.release("2.0.0")
    assert (await w.alert()).startswith("dry_run")
    await w.reconsider()
    assert w.runs() == []
    assert w.rollbacks() == [("2.0.0", "1.0.0", RollbackState.DRY_RUN)]
    set_mode(w.config, "auto")
    w.reload()
    await w.reconsider()
    assert len(w.runs()) == 1
    assert w.rollbacks()[-1] == ("2.0.0", "1.0.0", RollbackState.SUCCEEDED)


async def test_an_expired_approval_is_asked_again_a_rejection_never(world: type[World]) -> None:
    w = world(mode="approve")
    await w.release("1.0.0", good=True)
    await w.release("2.0.0")
    assert (await w.alert()).startswith("pending_approval")
    w.now += 31 * 60  # past approval_timeout (30m): nobody decided
    [expired] = await w.pipeline.expire_pending()
    assert expired.state is RollbackState.EXPIRED
    await w.reconsider()  # the alert still fires: a person is asked again
    assert [s for _, _, s in w.rollbacks()] == [RollbackState.EXPIRED, RollbackState.PENDING]
    [again] = w.store.rollbacks(service="api", limit=1)
    await w.pipeline.reject(again.id, "bob", "we know")
    for _ in range(3):
        await w.reconsider(60)
    assert [s for _, _, s in w.rollbacks()] == [RollbackState.EXPIRED, RollbackState.REJECTED]
    assert w.runs() == []


async def test_a_pending_approval_whose_release_was_replaced_is_superseded_never_run(
    world: type[World],
) -> None:
    w = world(mode="approve")
    await w.release("1.0.0", good=True)
    await w.release("2.0.0")
    await w.alert()
    [pending] = w.store.rollbacks(service="api", limit=1)
    assert pending.state is RollbackState.PENDING
    await w.release("5.0.0")  # v5 replaced v2 before anyone approved
    with pytest.raises(ConflictError, match="superseded"):
        await w.pipeline.approve(pending.id, "alice")
    await w.pipeline.wait_idle()
    assert w.runs() == []
    done = w.store.rollback(pending.id)
    assert done is not None and done.state is RollbackState.EXPIRED
    assert done.outcome == "superseded: 5.0.0 replaced 2.0.0 since it was decided"
    [event] = w.store.events(types=["rollback.expired"])
    assert event.data["superseded"] is True


async def test_the_sweep_supersedes_a_pending_approval_whose_release_was_replaced(
    world: type[World],
) -> None:
    w = world(mode="approve")
    await w.release("1.0.0", good=True)
    await w.release("2.0.0")
    await w.alert()
    await w.release("2.0.0-hotfix")
    [superseded] = await w.pipeline.expire_pending()
    assert superseded.state is RollbackState.EXPIRED
    assert superseded.outcome.startswith("superseded: 2.0.0-hotfix replaced 2.0.0")


async def test_a_redeploy_of_the_same_version_supersedes_its_pending_approval(
    world: type[World],
) -> None:
    w = world(mode="approve")
    await w.release("1.0.0", good=True)
    await w.release("2.0.0")
    await w.alert()
    [pending] = w.store.rollbacks(service="api", limit=1)
    await w.release("1.0.0")
    await w.release("2.0.0")  # deployed again: another release of 2.0.0
    with pytest.raises(ConflictError, match="deployed again"):
        await w.pipeline.approve(pending.id, "alice")
    assert w.runs() == []


async def test_a_breach_older_than_the_release_is_never_decided_again(
    world: type[World],
) -> None:
    w = world(guards='cooldown = "1m"')
    await w.release("1.0.0", good=True)
    began = w.now + 1
    w.now += 120
    await w.release("2.0.0")
    assert (await w.alert(started=began)).startswith("refused: the breach started")
    for _ in range(5):
        await w.reconsider(60)
    assert w.runs() == []
    assert w.events().count("rollback.refused") == 1


async def test_without_versions_each_firing_episode_is_its_own_rollback(
    world: type[World],
) -> None:
    w = world(guards='cooldown = "5m"', target=False)
    first = await w.alert()
    assert first.startswith("executing")
    await w.pipeline.wait_idle()
    # The same incident, still firing, and another alert that began before the rollback
    # ended: the same episode, joined.
    await w.reconsider()
    assert (await w.alert(started=w.now - 30)).startswith("joined")
    assert len(w.runs()) == 1
    # Later, a new breach: a new episode. Within the cooldown it waits; after, it runs.
    w.now += 60
    assert (await w.alert()).startswith("refused: the last automatic rollback started")
    await w.reconsider(300)
    assert len(w.runs()) == 2
    assert [s for _, _, s in w.rollbacks()] == [RollbackState.SUCCEEDED] * 2
    ids = {r.release_id for r in w.store.rollbacks(service="api")}
    assert len(ids) == 2


async def test_a_frozen_service_pages_once_however_many_triggers_are_refused(
    world: type[World],
) -> None:
    w = world(guards='cooldown = "1ms"\nmax_rollbacks = 1\nwindow = "1h"')
    await w.release("1.0.0", good=True)
    await w.release("2.0.0")
    await w.alert()
    await w.pipeline.wait_idle()
    for version in ("3.0.0", "4.0.0", "5.0.0"):
        await w.release(version)
        await w.alert()
        await w.reconsider()
    assert w.events().count("service.frozen") == 1
    assert len(w.runs()) == 1


async def test_a_rollback_cut_short_by_a_stop_is_left_for_the_next_start(
    world: type[World],
) -> None:
    w = world(executor_args=("--hang",))
    await w.release("1.0.0", good=True)
    await w.release("2.0.0")
    await w.alert()
    for _ in range(500):  # poll, bounded: the executor has written its record
        if w.runs():
            break
        await asyncio.sleep(0.01)
    assert w.runs()
    await w.pipeline.interrupt_all("the daemon was stopped")
    [rollback] = w.store.rollbacks(service="api", limit=1)
    assert rollback.state is RollbackState.RUNNING
    assert "verified at the next start" in rollback.outcome
    [step] = w.store.steps(rollback.id)
    assert step.ok is False and step.finished_at is not None
    assert "service.frozen" not in w.events()
    # The next start verifies it rather than leaving it interrupted: the service has no
    # version_query, so whether it took effect cannot be told — a person decides.
    [recovered] = await w.pipeline.recover()
    assert recovered.state is RollbackState.INTERRUPTED
    assert len(w.runs()) == 1


@pytest.mark.faults
async def test_a_standing_trigger_decided_again_beside_new_alerts_makes_one_rollback(
    world: type[World], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep and the webhook decide the same release at once, their writes slowed: one
    dry run is recorded (the database keys only live and successful rollbacks by release,
    so only the pipeline's per-service lock keeps this to one)."""
    w = world(mode="dry-run")
    await w.release("1.0.0", good=True)
    await w.release("2.0.0")
    w.store.set_pause("api", True, w.now)
    assert (await w.alert()).startswith("refused: automatic rollbacks are paused")
    w.store.set_pause("api", False, w.now)
    for name in ("create_rollback", "add_trigger", "add_event"):
        write = getattr(w.store, name)

        def slowed(*args: Any, _write: Callable[..., Any] = write, **kwargs: Any) -> Any:
            time.sleep(0.005)
            return _write(*args, **kwargs)

        monkeypatch.setattr(w.store, name, slowed)
    w.now += 5
    # An alert first: its record is written, and while it is, the sweep reads.
    alerts = [w.alert() for _ in range(10)]
    await asyncio.gather(alerts[0], w.pipeline.reconsider(w.now), *alerts[1:])
    await w.pipeline.wait_idle()
    assert w.rollbacks() == [("2.0.0", "1.0.0", RollbackState.DRY_RUN)]
