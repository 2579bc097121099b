"""Fencing: no rollback state change without the holder's live lease, on a real PostgreSQL.

The engine and the pipeline run in-process, as in test_pipeline.py, on a store on the test's
database, with a small ``Tenancy`` that hands out a chosen fence: the lease itself is real
(taken, released and taken over through the store), so the store judges the fence by the
server's clock. Executors are real programs that record what they were given.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from rollbackd.api.app import create_app
from rollbackd.config.loader import load
from rollbackd.core.model import Fence, RollbackState
from rollbackd.executors.base import RollbackContext
from rollbackd.executors.placeholders import check_templates, substitute
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.control import Control
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.pipeline import Pipeline, Trigger
from rollbackd.runtime.tenancy import NotHolder
from rollbackd.store.errors import FencedError
from rollbackd.store.postgres import PostgresStore
from support.configs import write_config
from support.daemon_process import TOKEN
from support.notify_peers import eventually
from support.postgres import Database

# Records its argv and ROLLBACKD_* variables, then waits until the gate file exists, so the
# test can take the lease over while it runs; exits 1 with --fail.
GATED_EXECUTOR = """\
import json, os, sys, time
log, gate, *rest = sys.argv[1:]
env = {k: v for k, v in os.environ.items() if k.startswith("ROLLBACKD_")}
with open(log, "a", encoding="utf-8") as handle:
    handle.write(json.dumps({"argv": rest, "env": env}) + "\\n")
while gate != "-" and not os.path.exists(gate):
    time.sleep(0.01)
sys.exit(1 if "--fail" in rest else 0)
"""


class ChosenTenancy:
    """Holds ``api`` with the fence it is given, whatever the lease says now (a daemon that
    believes it still holds a lease it lost), or holds nothing (``fence`` None)."""

    def __init__(self, fence: Fence | None) -> None:
        self.chosen = fence

    def may_act(self, service: str) -> bool:
        return self.chosen is not None

    def evaluates(self, service: str) -> bool:
        return self.may_act(service)

    def fence(self, service: str) -> Fence | None:
        if self.chosen is None:
            raise NotHolder(service)
        return self.chosen


class Setup:
    def __init__(self, tmp_path: Path, database: Database, mode: str, steps: list[str]) -> None:
        self.log = tmp_path / "runs.jsonl"
        self.gate = tmp_path / "gate"
        script = tmp_path / "gated.py"
        script.write_text(GATED_EXECUTOR)
        chain = "".join(self._step(script, extra) for extra in steps)
        rules = f"""
[service]
name = "api"
rollback_window = "1h"

{chain}
[verify]
window = "100ms"

[[alert]]
alertname = "ApiDown"
"""
        # Prometheus is never asked: the service has no checks and no version_query.
        config = write_config(tmp_path, "http://127.0.0.1:9", {"api": rules})
        text = config.read_text().replace("[daemon]\n", f'[daemon]\nmode = "{mode}"\n', 1)
        config.write_text(text)
        self.loaded = load(config)
        self.store = PostgresStore(database.url, password=database.password)
        self.engine = Engine(
            self.loaded, PrometheusClient(self.loaded.config.prometheus), self.store
        )
        self.now = 1_000_000.0

    def _step(self, script: Path, extra: str) -> str:
        gate = str(self.gate) if "--gated" in extra else "-"
        argv = [sys.executable, str(script), str(self.log), gate, "{fencing_token}", *extra.split()]
        return f'[[rollback]]\ntype = "command"\nargv = {json.dumps(argv)}\ntimeout = "20s"\n\n'

    def pipeline(self, tenancy: ChosenTenancy) -> Pipeline:
        return Pipeline(self.engine, tenancy=tenancy)

    def lease(self, holder: str, ttl: float = 60.0) -> Fence:
        lease = self.store.acquire("api", holder, ttl)
        assert lease is not None
        return Fence(holder, lease.epoch)

    def take_over(self, old: Fence) -> Fence:
        """``old`` gives its lease up; another daemon takes it (a higher epoch)."""
        assert self.store.release("api", old.holder)
        new = self.lease("daemon-b")
        assert new.epoch > old.epoch
        return new

    async def releases(self) -> None:
        """1.0.0 baked into the last known good, then the bad 2.0.0."""
        versions = self.engine.versions
        self.now += 10
        await versions.record_release("api", "1.0.0", self.now)
        await versions.update_bake("api", self.now, True, timedelta(seconds=1))
        self.now += 5
        await versions.update_bake("api", self.now, True, timedelta(seconds=1))
        self.now += 10
        await versions.record_release("api", "2.0.0", self.now)

    def trigger(self) -> Trigger:
        self.now += 1
        return Trigger(
            service="api",
            source="alert",
            reason="ApiDown",
            at=self.now,
            breach_started=self.now - 0.5,
        )

    def runs(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def make(tmp_path: Path, postgres_database: Database) -> Iterator[type[Setup]]:
    made: list[Setup] = []

    class Made(Setup):
        def __init__(self, mode: str = "auto", steps: tuple[str, ...] = ("--ok",)) -> None:
            super().__init__(tmp_path, postgres_database, mode, list(steps))
            made.append(self)

    yield Made
    for setup in made:
        setup.store.close()


async def test_the_holder_rolls_back_and_its_executor_gets_the_epoch(make: type[Setup]) -> None:
    s = make()
    fence = s.lease("daemon-a")
    pipeline = s.pipeline(ChosenTenancy(fence))
    await s.releases()
    submitted = await pipeline.submit(s.trigger())
    assert submitted.outcome == "executing", submitted.reason
    await pipeline.wait_idle()
    [run] = s.runs()
    assert run["env"]["ROLLBACKD_FENCING_TOKEN"] == str(fence.epoch)  # type: ignore[index]
    assert run["argv"][0] == str(fence.epoch)  # type: ignore[index]
    assert submitted.rollback is not None
    done = s.store.rollback(submitted.rollback.id)
    assert done is not None and done.state is RollbackState.SUCCEEDED


async def test_a_stale_fence_cannot_create_a_rollback(make: type[Setup]) -> None:
    s = make()
    stale = s.lease("daemon-a", ttl=0.0)  # expired at once
    s.lease("daemon-b")  # taken over after the expiry
    pipeline = s.pipeline(ChosenTenancy(stale))
    await s.releases()
    submitted = await pipeline.submit(s.trigger())
    await pipeline.wait_idle()
    assert submitted.outcome == "not_holder"
    assert str(stale.epoch) in submitted.reason
    assert s.store.rollbacks() == []
    assert s.runs() == []


async def test_a_stale_fence_cannot_approve_a_pending_rollback(make: type[Setup]) -> None:
    s = make(mode="approve")
    fence = s.lease("daemon-a")
    pipeline = s.pipeline(ChosenTenancy(fence))
    await s.releases()
    submitted = await pipeline.submit(s.trigger())
    assert submitted.outcome == "pending_approval" and submitted.rollback is not None
    pending = submitted.rollback
    s.take_over(fence)
    with pytest.raises(FencedError):
        await pipeline.approve(pending.id, "alice")
    await pipeline.wait_idle()
    assert s.store.rollback(pending.id) == pending
    assert s.runs() == []


@pytest.mark.parametrize(
    ("steps", "runs"),
    [
        # The first executor fails after the takeover: the next one must not start.
        (("--gated --fail", "--ok"), 1),
        # The executor succeeds after the takeover: no verification, no success recorded.
        (("--gated",), 1),
    ],
)
async def test_a_lease_lost_mid_rollback_stops_it_where_it_is(
    make: type[Setup], steps: tuple[str, ...], runs: int
) -> None:
    s = make(steps=steps)
    fence = s.lease("daemon-a")
    pipeline = s.pipeline(ChosenTenancy(fence))
    await s.releases()
    submitted = await pipeline.submit(s.trigger())
    assert submitted.outcome == "executing" and submitted.rollback is not None
    await eventually(lambda: len(s.runs()) == 1, what="the first executor started")
    new = s.take_over(fence)
    s.gate.touch()
    await pipeline.wait_idle()
    assert len(s.runs()) == runs
    left = s.store.rollback(submitted.rollback.id)
    assert left is not None
    # Neither success nor failure: left running for the new holder to verify.
    assert (left.state, left.finished_at) == (RollbackState.RUNNING, None)
    assert [step.kind for step in s.store.steps(left.id)] == ["rollback"]
    events = {e.type for e in s.store.events(limit=1000)}
    assert not events & {"rollback.succeeded", "rollback.failed", "verify.failed"}
    # The new holder recovers it as after a crash: never re-run (without a version_query
    # whether it took effect cannot be told, so a person decides).
    holder = s.pipeline(ChosenTenancy(new))
    [recovered] = await holder.recover()
    await holder.wait_idle()
    assert recovered.state is RollbackState.INTERRUPTED
    assert await holder.recover() == []
    assert len(s.runs()) == runs


async def test_a_daemon_that_holds_nothing_decides_nothing_and_writes_nothing(
    make: type[Setup],
) -> None:
    s = make()
    s.lease("daemon-b")
    pipeline = s.pipeline(ChosenTenancy(None))
    await s.releases()
    events_before = s.store.events(limit=1000)
    submitted = await pipeline.submit(s.trigger())
    assert (submitted.outcome, submitted.rollback) == ("not_holder", None)
    assert "does not hold service 'api'" in submitted.reason
    assert await pipeline.reconsider() == []
    assert await pipeline.expire_pending() == []
    assert await pipeline.recover() == []
    assert s.store.rollbacks() == []
    assert s.store.events(limit=1000) == events_before
    assert s.runs() == []


def api_client(pipeline: Pipeline) -> httpx.AsyncClient:
    app = create_app(
        control=Control(pipeline), registry=CollectorRegistry(), token=TOKEN, max_body=8192
    )
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://rollbackd.test",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


async def test_the_api_of_a_daemon_that_is_not_the_holder_answers_409_with_why(
    make: type[Setup],
) -> None:
    s = make(mode="approve")
    fence = s.lease("daemon-a")
    holder = s.pipeline(ChosenTenancy(fence))
    await s.releases()
    submitted = await holder.submit(s.trigger())
    assert submitted.rollback is not None
    s.take_over(fence)
    async with api_client(s.pipeline(ChosenTenancy(None))) as bystander:
        manual = await bystander.post(
            "/api/v1/rollbacks", json={"service": "api", "reason": "by hand"}
        )
        assert manual.status_code == 409
        assert "does not hold service 'api'" in manual.json()["detail"]
        rejected = await bystander.post(f"/api/v1/rollbacks/{submitted.rollback.id}/reject")
        assert rejected.status_code == 409
    async with api_client(holder) as stale:  # believes it still holds the lease it lost
        approved = await stale.post(f"/api/v1/rollbacks/{submitted.rollback.id}/approve")
        assert approved.status_code == 409
        assert "epoch" in approved.json()["detail"]
    assert s.store.rollbacks() == [submitted.rollback]
    assert s.runs() == []


def test_the_fencing_token_is_empty_without_a_fence_and_a_known_placeholder() -> None:
    alone = RollbackContext("api", "2.0.0", "1.0.0", "ApiDown", "rb-1")
    fenced = replace(alone, fencing_token=7)
    assert alone.environment()["ROLLBACKD_FENCING_TOKEN"] == ""
    assert fenced.environment()["ROLLBACKD_FENCING_TOKEN"] == "7"
    assert substitute("deploy --fence={fencing_token}", fenced.placeholders()) == "deploy --fence=7"
    assert check_templates(["deploy --fence={fencing_token}"]) is None
