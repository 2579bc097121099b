"""The API as `rollbackd run` serves it on a real socket (uvicorn inside the daemon's loop):
the token on every route its OpenAPI document lists, malformed and oversized bodies, and
the server's start and stop as part of the daemon's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.configs import write_config
from support.daemon_process import TOKEN_ENV, DaemonProcess, alert_service

MAX_BODY = 4096
WEBHOOK_MAX_BODY = 8192


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    directory = tmp_path_factory.mktemp("daemon")
    config = write_config(
        directory,
        "http://127.0.0.1:9",
        {"api": alert_service("api", directory / "runs.jsonl", alertname="ApiDown")},
        extra=f"max_body = {MAX_BODY}\nwebhook_max_body = {WEBHOOK_MAX_BODY}",
    )
    with DaemonProcess(config) as running:
        yield running


def operations(daemon: DaemonProcess) -> list[tuple[str, str]]:
    document = httpx.get(f"{daemon.url}/openapi.json", timeout=5).json()
    return [
        (method.upper(), path.replace("{rollback_id}", "1").replace("{name}", "api"))
        for path, entries in document["paths"].items()
        if path.startswith("/api/")
        for method in entries
    ]


@pytest.mark.faults
def test_every_route_of_the_document_refuses_a_missing_or_wrong_token(
    daemon: DaemonProcess,
) -> None:
    found = operations(daemon)
    assert len(found) == 11
    with httpx.Client(base_url=daemon.url, timeout=5) as http:
        for method, path in found:
            for headers in ({}, {"Authorization": "Bearer nope"}):
                response = http.request(method, path, headers=headers, json={})
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == 'Bearer realm="rollbackd"'
    assert daemon.rows("SELECT count(*) FROM pauses") == [(0,)]


@pytest.mark.faults
def test_malformed_json_is_a_4xx_and_the_daemon_stays_up(daemon: DaemonProcess) -> None:
    with daemon.http() as http:
        for body in (b"{", b'{"version": "4", "alerts": [', b"\x00\xff", b"[" * 2000):
            response = http.post(
                "/api/v1/alertmanager",
                content=body,
                headers={"content-type": "application/json"},
            )
            assert 400 <= response.status_code < 500, response.text
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/api/v1/status").status_code == 200
    daemon.assert_alive()


@pytest.mark.faults
@pytest.mark.parametrize(
    ("path", "limit", "key"),
    [
        ("/api/v1/rollbacks", MAX_BODY, "[server].max_body"),
        ("/api/v1/alertmanager", WEBHOOK_MAX_BODY, "[server].webhook_max_body"),
    ],
)
def test_an_oversized_body_is_413_declared_or_streamed(
    daemon: DaemonProcess, path: str, limit: int, key: str
) -> None:
    with daemon.http() as http:
        declared = http.post(path, content=b" " * (limit + 1))
        assert declared.status_code == 413
        assert f"larger than {limit} bytes ({key})" in declared.json()["detail"]
        # At the limit the body is read (and is no valid JSON).
        assert http.post(path, content=b" " * limit).status_code == 422

        def chunks() -> Iterator[bytes]:
            for _ in range(64):
                yield b" " * 1024

        streamed = http.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert http.get("/healthz").status_code == 200


def test_sigterm_stops_the_server_with_the_daemon(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        {"api": alert_service("api", tmp_path / "runs.jsonl", alertname="ApiDown")},
    )
    daemon = DaemonProcess(config)
    daemon.start()
    url = daemon.url
    assert daemon.stop() == 0
    assert not daemon.address_file.exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)


def start_failure(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollbackd", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )


def test_an_address_in_use_stops_the_start_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path,
            "http://127.0.0.1:9",
            {"api": alert_service("api", tmp_path / "runs.jsonl", alertname="ApiDown")},
        )
        config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        result = start_failure(config, {TOKEN_ENV: "t"})
    assert result.returncode == 1
    assert f"rollbackd: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_no_token_no_start(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        {"api": alert_service("api", tmp_path / "runs.jsonl", alertname="ApiDown")},
    )
    result = start_failure(config, {TOKEN_ENV: ""})
    assert result.returncode == 1
    assert (
        f"rollbackd: [server] API token: environment variable {TOKEN_ENV} is not set"
        in result.stderr
    )
