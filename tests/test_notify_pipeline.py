"""Notifications from a real rollback: the decision pipeline on real SQLite and a real
executor process (no Prometheus: the service is judged by alerts only), with the dispatcher
built from the config's [[notify]] list and subscribed to the pipeline's bus, exactly as the
daemon wires it. A notifier that hangs must not delay the rollback."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rollbackd.config.loader import load
from rollbackd.core.model import RollbackState
from rollbackd.notify.dispatcher import Dispatcher, RetryPolicy
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.pipeline import Pipeline, Trigger
from rollbackd.store.sqlite import Store
from support.configs import write_config
from support.notify_peers import (
    ROUTING_KEY,
    HungServer,
    RecordingServer,
    Reply,
    always,
    eventually,
    json_body,
    sample,
)

RECORD = str(Path(__file__).parent / "support" / "record_run.py")
OK = Reply(202, b'{"status":"success"}')


def rules(argv: list[str]) -> str:
    return f"""
[service]
name = "api"
rollback_window = "1h"

[[rollback]]
type = "command"
argv = {json.dumps(argv)}
timeout = "20s"

[verify]
window = "100ms"

[[alert]]
alertname = "ApiDown"
"""


class Daemonish:
    """The parts of the daemon that matter here, wired as daemon.py should wire them."""

    def __init__(self, directory: Path, notify: str, argv: list[str]) -> None:
        config = write_config(
            directory,
            "http://127.0.0.1:9",
            {"api": rules(argv)},
            extra=f'public_url = "https://rollbackd.example"\n\n{notify}',
        )
        loaded = load(config)
        self.store = Store(directory / "state.db")
        self.engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), self.store)
        self.pipeline = Pipeline(self.engine)
        self.dispatcher = Dispatcher(
            loaded.config.notify,
            prometheus_url=loaded.config.prometheus.url,
            public_url=loaded.config.server.public_url,
            metrics_registry=self.engine.metrics.registry,
            retry=RetryPolicy(attempts=2, backoff=0.01, attempt_timeout=60.0),
        )
        self.dispatcher.subscribe(self.pipeline.bus)
        self.dispatcher.start()
        self.now = 1_700_000_000.0

    async def release(self, version: str, *, bake: bool = True) -> None:
        self.now += 10
        await self.engine.versions.record_release("api", version, self.now)
        if bake:
            await self.engine.versions.update_bake("api", self.now, True, timedelta(seconds=1))
            self.now += 5
            await self.engine.versions.update_bake("api", self.now, True, timedelta(seconds=1))

    def trigger(self, *, automatic: bool = True, to: str | None = None) -> Trigger:
        self.now += 1
        return Trigger(
            service="api",
            source="alert" if automatic else "manual",
            reason="alert ApiDown firing",
            at=self.now,
            automatic=automatic,
            breach_started=self.now - 0.5 if automatic else None,
            to_version=to,
            requested_by=None if automatic else "alice",
        )

    def sent(self, notifier: str) -> float:
        return sample(
            self.engine.metrics.registry,
            "rollbackd_notifications_total",
            notifier=notifier,
            outcome="sent",
        )


@pytest.fixture
async def made() -> AsyncIterator[list[Daemonish]]:
    daemons: list[Daemonish] = []
    yield daemons
    for daemon in daemons:
        await daemon.dispatcher.stop(timeout=0.1)
        daemon.store.close()


def webhook(name: str, url: str) -> str:
    return (
        f'[[notify]]\nname = "{name}"\ntype = "webhook"\nurl = "{url}"\nevents = ["rollback.*"]\n'
    )


@pytest.mark.faults
async def test_a_hung_notifier_does_not_delay_a_rollback(
    tmp_path: Path, made: list[Daemonish]
) -> None:
    with HungServer() as hung, RecordingServer(always(OK)) as healthy:
        s = Daemonish(
            tmp_path,
            webhook("stuck", hung.url) + webhook("team", healthy.url),
            [sys.executable, RECORD, str(tmp_path / "runs"), "{to_version}"],
        )
        made.append(s)
        await s.release("1.0.0")
        await s.release("2.0.0", bake=False)
        submitted = await s.pipeline.submit(s.trigger())
        assert submitted.outcome == "executing" and submitted.rollback is not None
        await s.pipeline.wait_idle()
        done = s.store.rollback(submitted.rollback.id)
        assert done is not None and done.state is RollbackState.SUCCEEDED
        # The rollback is over while the stuck notifier still holds its first message.
        assert s.dispatcher.backlog("stuck") == 2
        assert s.sent("stuck") == 0
        await eventually(lambda: healthy.count == 2, what="both events at the healthy peer")
    started, succeeded = (json_body(r) for r in healthy.requests)
    assert [started["type"], succeeded["type"]] == ["rollback.started", "rollback.succeeded"]
    assert succeeded["title"] == "api rolled back 2.0.0 → 1.0.0"
    assert succeeded["rollback_id"] == done.id
    assert succeeded["causes"][0]["reason"] == "alert ApiDown firing"
    assert succeeded["link"] == "https://rollbackd.example/api/v1/rollbacks?service=api"


async def test_a_failed_rollback_pages_and_a_later_success_resolves(
    tmp_path: Path, made: list[Daemonish], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROLLBACKD_TEST_PD_KEY", ROUTING_KEY)
    with RecordingServer(always(OK)) as pagerduty:
        notify = (
            f'[[notify]]\nname = "pager"\ntype = "pagerduty"\nurl = "{pagerduty.url}"\n'
            'routing_key_env = "ROLLBACKD_TEST_PD_KEY"\n'
        )
        # The deployment tool is broken while this file exists.
        broken = tmp_path / "deploy-broken"
        broken.touch()
        s = Daemonish(tmp_path, notify, ["/bin/sh", "-c", f"test ! -e {broken}"])
        made.append(s)
        await s.release("1.0.0")
        await s.release("2.0.0", bake=False)
        await s.pipeline.submit(s.trigger())
        await s.pipeline.wait_idle()
        await s.dispatcher.wait_idle()
        events: list[dict[str, Any]] = [json_body(r) for r in pagerduty.requests]
        # rollback.failed and service.frozen: one problem, one dedup key, one incident.
        assert [(e["event_action"], e["payload"]["class"]) for e in events] == [
            ("trigger", "rollback.failed"),
            ("trigger", "service.frozen"),
        ]
        assert {e["dedup_key"] for e in events} == {"rollbackd/api/rollback"}
        assert events[0]["routing_key"] == ROUTING_KEY
        assert events[0]["payload"]["summary"] == "api rollback 2.0.0 → 1.0.0 FAILED"

        # A person mends the tool and rolls back by hand: the page resolves.
        broken.unlink()
        manual = await s.pipeline.submit(s.trigger(automatic=False, to="1.0.0"))
        assert manual.outcome == "executing"
        await s.pipeline.wait_idle()
        await s.dispatcher.wait_idle()
        assert len(pagerduty.requests) == 3
        resolve = json_body(pagerduty.requests[-1])
    assert resolve == {
        "routing_key": ROUTING_KEY,
        "event_action": "resolve",
        "dedup_key": "rollbackd/api/rollback",
    }
