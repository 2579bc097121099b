"""Shared fixtures: real Prometheus servers (fresh or backfilled with support.dataset), a
fake service for them to scrape, and one real PostgreSQL server per run with a fresh
database per test. See tests/support/."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from support import dataset
from support.fake_service import FakeService
from support.postgres import Database, PostgresServer
from support.prometheus import (
    PrometheusFactory,
    PrometheusServer,
    ScrapeTarget,
    prometheus_available,
    promtool_available,
)

FakeServiceFactory = Callable[..., FakeService]


def _require_prometheus(backfill: bool = False) -> None:
    if not prometheus_available():
        pytest.skip("the 'prometheus' binary is not on PATH (Debian package: prometheus)")
    if backfill and not promtool_available():
        pytest.skip("the 'promtool' binary is not on PATH (Debian package: prometheus)")


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[PrometheusFactory]:
    """Make PrometheusServers in tmp_path; every one is stopped at teardown."""
    _require_prometheus()
    servers: list[PrometheusServer] = []
    numbers = itertools.count(1)

    def make(
        *,
        targets: Iterable[ScrapeTarget] = (),
        rule_files: Iterable[Path] = (),
        alertmanagers: Iterable[str] = (),
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        extra_args: Sequence[str] = (),
        backfill: bool = False,
        start: bool = True,
    ) -> PrometheusServer:
        if backfill:
            _require_prometheus(backfill=True)
        server = PrometheusServer(
            tmp_path / f"prometheus-{next(numbers)}",
            targets=targets,
            rule_files=rule_files,
            alertmanagers=alertmanagers,
            scrape_interval=scrape_interval,
            evaluation_interval=evaluation_interval,
            extra_args=extra_args,
        )
        servers.append(server)
        if backfill:
            dataset.backfill(server.storage_dir)
        if start:
            server.start()
            server.wait_ready()
        return server

    yield make
    errors: list[BaseException] = []
    for server in servers:
        try:
            server.close()
        except Exception as exc:  # stop the others all the same
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def backfilled_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """One Prometheus for the session holding support.dataset (query it at
    dataset.EVAL_TIME). It scrapes nothing; do not change it."""
    _require_prometheus(backfill=True)
    server = PrometheusServer(tmp_path_factory.mktemp("backfilled-prometheus"))
    try:
        dataset.backfill(server.storage_dir)
        server.start()
        server.wait_ready()
        if not server.vector("count(app_build_info)", time=dataset.EVAL_TIME):
            raise RuntimeError(
                f"the backfilled dataset is not visible; log tail:\n{server.log_tail()}"
            )
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the run, started only when a test asks for it. A missing
    PostgreSQL fails the test with where to get it, never skips it."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[Database]:
    """A fresh, empty database owned by the role ``rollbackd``; dropped at teardown
    (connections still open to it are ended)."""
    database = postgres_server.create_database()
    yield database
    postgres_server.drop_database(database.name)


@pytest.fixture
def fake_service_factory() -> Iterator[FakeServiceFactory]:
    """Make started FakeServices (arguments as FakeService's); all stopped at teardown."""
    services: list[FakeService] = []

    def make(*args: Any, **kwargs: Any) -> FakeService:
        service = FakeService(*args, **kwargs)
        service.start()
        services.append(service)
        return service

    yield make
    for service in services:
        service.stop()


@pytest.fixture
def fake_service(fake_service_factory: FakeServiceFactory) -> FakeService:
    """A started fake "checkout" at version 1.0.0, no errors, 10 requests/s, 30ms."""
    return fake_service_factory("checkout", "1.0.0")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is a failed run: the only skips are for a missing Prometheus,
    promtool or Alertmanager binary, and a suite that quietly skipped its real-server tests
    proves nothing. The set-up script installs them."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == pytest.ExitCode.OK:
        reporter.ensure_newline()  # type: ignore[union-attr]
        reporter.write_line(  # type: ignore[union-attr]
            f"{len(skipped)} test(s) skipped: a skip fails the run (install what they need: "
            "bash scripts/setup.sh)",
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
