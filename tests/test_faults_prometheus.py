"""Prometheus failing under a running daemon, in every way it fails: `rollbackd run` asks a
real Prometheus through a proxy that, on the test's word, answers 503 as a starting
Prometheus does, answers garbage, hangs, or hangs up; and the real Prometheus is restarted
mid-run. While it fails the checks go blind and report it; nothing is rolled back on errors;
when it is back they see again — and a bad release after all that is still caught, once."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from support.configs import checkout_rules, write_config
from support.daemon_process import DaemonProcess, executions
from support.fake_service import FakeService
from support.hostile_http import STARTING, Recorded, RecordingServer, Reply
from support.prometheus import PrometheusServer, ScrapeTarget, poll

pytestmark = [pytest.mark.prometheus, pytest.mark.faults]


GARBAGE = Reply(200, b'{"status": "success", "data": {"resultType": "vector", "result": [{')
WRONG_SHAPE = Reply(200, b'{"status": "success", "data": {"resultType": "matrix", "result": 7}}')


class FaultyProxy:
    """Stands in front of a real Prometheus. ``mode`` says what it does with each request:
    ``pass`` forwards it, ``hang`` holds it unanswered until the mode changes or the proxy
    stops, ``close`` hangs up without answering, or a fixed :class:`Reply`."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode: str | Reply = "pass"
        self._released = threading.Event()
        self._client = httpx.Client(base_url=upstream, timeout=10)
        self._server = RecordingServer(self._answer)

    @property
    def url(self) -> str:
        return self._server.url

    def set(self, mode: str | Reply) -> None:
        self.mode = mode
        if mode == "hang":
            self._released.clear()
        else:
            self._released.set()  # frees requests held by an earlier "hang"

    def _answer(self, request: Recorded, _number: int) -> Reply | None:
        mode = self.mode
        if isinstance(mode, Reply):
            return mode
        if mode == "hang":
            self._released.wait()
            return None
        if mode == "close":
            return None
        try:
            answer = self._client.request(
                request.method,
                request.path,
                params=request.query,
                content=request.body,
                headers={"Content-Type": request.headers.get("content-type", "")},
            )
        except httpx.HTTPError:
            return None  # Prometheus itself is down: so is the proxy
        content_type = answer.headers.get("content-type", "application/json")
        return Reply(answer.status_code, answer.content, content_type)

    def __enter__(self) -> FaultyProxy:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._server.stop()
        self._client.close()


@pytest.fixture
def stack(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service: FakeService,
) -> Iterator[tuple[DaemonProcess, FaultyProxy, PrometheusServer, Path]]:
    prometheus = prometheus_factory(targets=[ScrapeTarget(fake_service.address)])
    prometheus.wait_for('sum(rate(http_requests_total{service="checkout"}[10s])) > 0')
    log = tmp_path / "executions.jsonl"
    rules = checkout_rules(
        f"{fake_service.url}/control", log, verify_window="1s", version_timeout="20s"
    )
    with FaultyProxy(prometheus.url) as proxy:
        config = write_config(
            tmp_path,
            proxy.url,
            {"checkout": rules},
            timeout="1s",
        )
        daemon = DaemonProcess(config)
        daemon.start()
        try:
            yield daemon, proxy, prometheus, log
        finally:
            proxy.set("pass")  # a held request must not hold up the daemon's stop
            with contextlib.suppress(Exception):
                daemon.stop()


def count(daemon: DaemonProcess, kind: str) -> int:
    [(n,)] = daemon.rows("SELECT count(*) FROM events WHERE type = ?", kind) or [(0,)]
    return int(n)


def await_count(daemon: DaemonProcess, kind: str, at_least: int) -> None:
    poll(
        lambda: (daemon.assert_alive(), count(daemon, kind) >= at_least)[1],
        timeout=40,
        interval=0.1,
        what=f"{at_least} {kind} events (log: {daemon.log})",
    )


FAULTS: list[tuple[str, str | Reply]] = [
    ("503 while starting", STARTING),
    ("500", Reply(500, b"internal error", "text/plain")),
    ("garbage JSON", GARBAGE),
    ("an answer of the wrong shape", WRONG_SHAPE),
    ("hung", "hang"),
    ("hanging up", "close"),
]


def test_every_prometheus_failure_blinds_never_rolls_back_and_recovers(
    stack: tuple[DaemonProcess, FaultyProxy, PrometheusServer, Path],
    fake_service: FakeService,
) -> None:
    daemon, proxy, prometheus, log = stack
    daemon.await_rows(
        "SELECT version FROM versions WHERE baked_at IS NOT NULL", what="1.0.0 to bake"
    )

    episodes = 0
    for name, mode in FAULTS:
        proxy.set(mode)
        episodes += 1
        await_count(daemon, "prometheus.unreachable", episodes)
        proxy.set("pass")
        await_count(daemon, "prometheus.recovered", episodes)
        assert daemon.rows("SELECT id FROM rollbacks") == [], f"rolled back on {name}"

    # The real Prometheus restarted mid-run: its storage is kept, the daemon sees again.
    prometheus.stop()
    episodes += 1
    await_count(daemon, "prometheus.unreachable", episodes)
    prometheus.restart()
    await_count(daemon, "prometheus.recovered", episodes)

    # Nothing of that was acted on: no rollback, no check fired, the release still good.
    assert daemon.rows("SELECT id FROM rollbacks") == []
    assert count(daemon, "check.fired") == 0
    assert executions(log) == []
    unreachable = daemon.rows(
        "SELECT json_extract(data, '$.reason') FROM events WHERE type = 'prometheus.unreachable' "
        "ORDER BY id"
    )
    assert len(unreachable) == episodes
    assert all(reason for (reason,) in unreachable), unreachable

    # A bad release after all that is caught, and rolled back once.
    fake_service.update(version="2.0.0", error_ratio=0.5)
    [(rollback_id,)] = daemon.await_rows(
        "SELECT id FROM rollbacks WHERE state = 'succeeded'", timeout=60, what="the rollback"
    )
    assert len(executions(log)) == 1
    assert fake_service.version == "1.0.0"
    assert daemon.rows("SELECT count(*) FROM rollbacks") == [(1,)]
    steps = daemon.rows(
        "SELECT kind, ok FROM rollback_steps WHERE rollback_id = ? ORDER BY id", rollback_id
    )
    assert steps == [("rollback", 1), ("verify", 1)]
