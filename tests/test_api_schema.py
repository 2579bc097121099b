"""Schemathesis against a running `rollbackd run`, from the OpenAPI document it serves: for
every operation, generated requests (valid and invalid) must never get a 5xx and every
answer must match the document (status codes, content types, schemas), with the token and
without it."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from support.configs import write_config
from support.daemon_process import TOKEN, DaemonProcess, InProcessDaemon, alert_service, set_mode
from support.prometheus import PrometheusServer, prometheus_available

pytestmark = [pytest.mark.prometheus, pytest.mark.faults]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """A real Prometheus, so that /readyz is ready: its 503 would be a 5xx too."""
    if not prometheus_available():
        pytest.skip("the 'prometheus' binary is not on PATH (Debian package: prometheus)")
    with PrometheusServer(tmp_path_factory.mktemp("prometheus")) as server:
        yield server


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory, prometheus: PrometheusServer
) -> Iterator[DaemonProcess]:
    directory = tmp_path_factory.mktemp("schema")
    log = directory / "runs.jsonl"
    config = write_config(
        directory,
        prometheus.url,
        {
            "api": alert_service("api", log, alertname="ApiDown", target=False),
            "web": alert_service("web", log, alertname="WebDown", matchers=['severity=~"crit.*"']),
        },
        extra="max_body = 65536",
    )
    # Approve mode: generated alerts leave rollbacks pending, so approve and reject meet
    # real pending ones too.
    set_mode(config, "approve")
    with DaemonProcess(config) as daemon:
        yield daemon
        daemon.assert_alive()


def openapi_document() -> dict[str, Any]:
    """The document the app serves; it depends on the code only, not on the config or the
    state, so it is built here, at collection, and compared with the daemon's below.
    (Schemathesis' lazy loading from a fixture does not work with this pytest.)"""
    with tempfile.TemporaryDirectory() as directory:
        log = Path(directory) / "runs.jsonl"
        daemon = InProcessDaemon(
            Path(directory), {"api": alert_service("api", log, alertname="ApiDown")}
        )
        try:
            document: dict[str, Any] = daemon.app.openapi()
        finally:
            daemon.close()
    return document


DOCUMENT = openapi_document()
# The token through the document's own security scheme, not as an extra header: then
# Schemathesis knows a request it sends without it is meant to be refused.
CONFIG = schemathesis.Config.from_dict(
    {
        "auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}},
        # 413 (over [server].max_body) is a rejection too.
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
            }
        },
    }
)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_the_api_keeps_to_its_openapi_document(
    case: schemathesis.Case, running: DaemonProcess
) -> None:
    case.call_and_validate(base_url=running.url, timeout=10)


def test_the_daemon_serves_the_document_tested(running: DaemonProcess) -> None:
    with running.http() as http:
        assert http.get("/openapi.json").json() == DOCUMENT


def test_the_document_describes_the_bearer_scheme() -> None:
    raw = DOCUMENT
    assert "HTTPBearer" in raw["components"]["securitySchemes"]
    secured = {
        path
        for path, operations in raw["paths"].items()
        for operation in operations.values()
        if operation.get("security")
    }
    assert secured == {p for p in raw["paths"] if p.startswith("/api/")}


def test_the_daemon_survived(running: DaemonProcess) -> None:
    running.assert_alive()
    with running.http() as http:
        assert http.get("/healthz").status_code == 200
    assert Path(running.log).exists()
