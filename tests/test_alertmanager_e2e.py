"""A real Alertmanager 0.25 notifying a real `rollbackd run` through webhook_configs with
http_config.authorization: a firing alert mapped to a service rolls it back exactly once,
however often Alertmanager re-sends it; an alert no [[alert]] maps is recorded and does
nothing; a wrong token is refused and nothing is stored."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from support.alertmanager import AlertmanagerServer, alertmanager_available
from support.configs import write_config
from support.daemon_process import TOKEN, DaemonProcess, alert_service, executions, recorder
from support.prometheus import PrometheusServer, free_port, poll

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        not alertmanager_available(),
        reason="the 'prometheus-alertmanager' binary is not on PATH (Debian package)",
    ),
]


def checkout_rules(log: Path) -> str:
    # The check never fires (vector(0) is never above 1): it is there so the service is
    # judged every second, which bakes a healthy release into the last known good quickly.
    return f"""
[service]
name = "checkout"
bake_time = "1s"
rollback_window = "1h"

{recorder(log)}

[verify]
window = "1s"

[[check]]
name = "alive"
type = "query"
query = "vector(0)"
above = 1
interval = "1s"

[[alert]]
alertname = "CheckoutHighErrorRate"
matchers = ['severity="critical"']
"""


@pytest.fixture
def alertmanagers(tmp_path: Path) -> Iterator[Callable[..., AlertmanagerServer]]:
    started: list[AlertmanagerServer] = []

    def make(name: str, daemon: DaemonProcess, token: str) -> AlertmanagerServer:
        credentials = tmp_path / f"{name}.token"
        credentials.write_text(token + "\n")
        server = AlertmanagerServer(
            tmp_path / name,
            webhook_url=f"{daemon.url}/api/v1/alertmanager",
            credentials_file=credentials,
        )
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.close()


def webhook_answers(daemon: DaemonProcess, code: int) -> float:
    """How often the daemon answered the webhook with ``code``, from its /metrics."""
    text = httpx.get(f"{daemon.url}/metrics", timeout=5).text
    labels = f'code="{code}",method="POST",route="/api/v1/alertmanager"'
    pattern = rf"^rollbackd_http_requests_total\{{{labels}\}} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.faults
def test_a_firing_alert_rolls_back_once_through_every_resend(
    tmp_path: Path,
    prometheus_factory: Callable[..., PrometheusServer],
    alertmanagers: Callable[..., AlertmanagerServer],
) -> None:
    prometheus = prometheus_factory()
    log = tmp_path / "deploys.jsonl"
    config = write_config(tmp_path, prometheus.url, {"checkout": checkout_rules(log)})
    with DaemonProcess(config) as daemon, daemon.http() as api:
        assert api.post(
            "/api/v1/releases", json={"service": "checkout", "version": "1.0.0"}
        ).is_success
        daemon.await_rows(
            "SELECT version FROM versions WHERE version = '1.0.0' AND baked_at IS NOT NULL",
            what="1.0.0 to bake",
        )
        assert api.post(
            "/api/v1/releases", json={"service": "checkout", "version": "2.0.0"}
        ).is_success

        alertmanager = alertmanagers("alertmanager", daemon, TOKEN)
        alertmanager.post_alerts(
            [
                {
                    "labels": {
                        "alertname": "CheckoutHighErrorRate",
                        "severity": "critical",
                        # Outside input: never a service, an executor or a version.
                        "service": "payments",
                        "version": "6.6.6",
                    },
                    "annotations": {"summary": "5xx above 5% for 2m"},
                },
                {"labels": {"alertname": "DiskFull", "severity": "critical"}},
            ]
        )

        # Alertmanager re-sends the firing group every repeat_interval: three deliveries of
        # the same alert, recorded by the daemon, prove the re-sends arrived.
        daemon.await_rows(
            "SELECT id FROM alerts WHERE alertname = 'CheckoutHighErrorRate' AND deliveries >= 3",
            timeout=60,
            what="three deliveries of the mapped alert",
        )
        [(rollback_id, service, to_version, source)] = daemon.await_rows(
            "SELECT id, service, to_version, source FROM rollbacks WHERE state = 'succeeded'",
            what="the rollback to succeed",
        )
        assert (service, to_version, source) == ("checkout", "1.0.0", "alert")
        assert daemon.rows("SELECT count(*) FROM rollbacks") == [(1,)]
        assert daemon.rows("SELECT count(*) FROM rollback_triggers") == [(0,)]
        assert [run["argv"] for run in executions(log)] == [["1.0.0"]]

        [(alert_service_name, alert_rollback, outcome)] = daemon.rows(
            "SELECT matched_service, rollback_id, outcome FROM alerts "
            "WHERE alertname = 'CheckoutHighErrorRate'"
        )
        assert (alert_service_name, alert_rollback) == ("checkout", rollback_id)
        assert outcome.startswith("executing")

        [(unmatched_service, unmatched_rollback, unmatched_outcome)] = daemon.await_rows(
            "SELECT matched_service, rollback_id, outcome FROM alerts WHERE alertname = 'DiskFull'",
            what="the unmapped alert to be stored",
        )
        assert (unmatched_service, unmatched_rollback) == (None, None)
        assert unmatched_outcome == "matches no [[alert]]: recorded and ignored"

        status = api.get("/api/v1/status").json()
        assert status["in_flight"] == []
        assert webhook_answers(daemon, 200) >= 4
        assert httpx.get(f"{daemon.url}/readyz", timeout=5).status_code == 200


@pytest.mark.faults
def test_an_alertmanager_with_a_wrong_token_is_refused(
    tmp_path: Path, alertmanagers: Callable[..., AlertmanagerServer]
) -> None:
    log = tmp_path / "runs.jsonl"
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        {"api": alert_service("api", log, alertname="ApiDown", target=False)},
    )
    with DaemonProcess(config) as daemon:
        alertmanager = alertmanagers("alertmanager", daemon, "not-the-token")
        alertmanager.post_alerts([{"labels": {"alertname": "ApiDown"}}])
        poll(
            lambda: webhook_answers(daemon, 401) >= 1,
            timeout=30,
            interval=0.2,
            what="the daemon to refuse Alertmanager's delivery",
        )
        assert daemon.rows("SELECT count(*) FROM alerts") == [(0,)]
        assert daemon.rows("SELECT count(*) FROM rollbacks") == [(0,)]
        assert executions(log) == []


def test_an_alert_only_service_bakes_on_alertmanager_and_its_bad_release_is_rolled_back(
    tmp_path: Path,
) -> None:
    """A service with only [[alert]] mappings, as a user first writes one: the healthy
    version bakes from a quiet Alertmanager (read through [alertmanager] url), the bad
    release's alert rolls it back to it once, and the bad release never bakes."""
    log = tmp_path / "deploys.jsonl"
    port = free_port()
    credentials = tmp_path / "alertmanager.token"
    credentials.write_text(TOKEN + "\n")
    alertmanager = AlertmanagerServer(
        tmp_path / "alertmanager",
        webhook_url=f"http://127.0.0.1:{port}/api/v1/alertmanager",
        credentials_file=credentials,
    )
    rules = alert_service(
        "shop",
        log,
        alertname="ShopDown",
        matchers=['severity="critical"'],
        header='bake_time = "1s"',  # one poll of a quiet Alertmanager; evidence, not time
    )
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",  # never asked: no checks, no version_query
        {"shop": rules},
        extra=f'[alertmanager]\nurl = "{alertmanager.url}"\n',
    )
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    with alertmanager, DaemonProcess(config) as daemon, daemon.http() as api:
        assert api.post("/api/v1/releases", json={"service": "shop", "version": "1.0.0"}).is_success
        daemon.await_rows(
            "SELECT version FROM versions WHERE version = '1.0.0' AND baked_at IS NOT NULL",
            timeout=60,
            what="1.0.0 to bake while Alertmanager is quiet",
        )
        assert api.post("/api/v1/releases", json={"service": "shop", "version": "2.0.0"}).is_success
        alertmanager.post_alerts(
            [
                {
                    "labels": {"alertname": "ShopDown", "severity": "critical"},
                    "annotations": {"summary": "shop is down"},
                }
            ]
        )
        [(to_version, source)] = daemon.await_rows(
            "SELECT to_version, source FROM rollbacks WHERE state = 'succeeded'",
            timeout=60,
            what="the rollback to succeed",
        )
        assert (to_version, source) == ("1.0.0", "alert")
        assert [run["argv"] for run in executions(log)] == [["1.0.0"]]
        assert daemon.rows("SELECT baked_at, bad FROM versions WHERE version = '2.0.0'") == [
            (None, 1)
        ]
