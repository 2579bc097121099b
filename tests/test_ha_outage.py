"""While PostgreSQL is unreachable nothing is acted on, and everything resumes once it is
back: one real ``rollbackd run`` on a real PostgreSQL that the test stops and starts.

During the outage the webhook answers 503 (Alertmanager retries; nothing was stored, so
nothing is lost), ``/readyz`` says the store is why, and the daemon keeps evaluating the
checks of the services it held — past its leases' lapse — so that their state is current
when the database is back. After it, a delivery is stored and rolled back.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from support import webhooks
from support.configs import service, write_config
from support.daemon_process import alert_service, executions
from support.ha import LEASE_TIME, Daemon, metric, rows, store_ready, store_section
from support.postgres import PostgresServer
from support.prometheus import PrometheusFactory, poll

pytestmark = [pytest.mark.faults]

CHECK = '[[check]]\nname = "up"\ntype = "query"\nquery = "vector(0)"\nabove = 1\ninterval = "1s"\n'


def delivery() -> str:
    alert = webhooks.FiringAlert(labels={"service": "checkout"}, fingerprint="c0ffee")
    return webhooks.delivery("CheckoutDown", [alert])


def send(daemon: Daemon) -> httpx.Response:
    with daemon.http() as http:
        return http.post(webhooks.WEBHOOK, content=delivery(), headers=webhooks.JSON)


@pytest.mark.prometheus
def test_nothing_is_acted_on_while_postgres_is_down_and_everything_resumes_after(
    prometheus_factory: PrometheusFactory, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    prometheus = prometheus_factory()
    with PostgresServer() as server:
        database = server.create_database("rollbackd")
        directory = tmp_path / "daemon"
        directory.mkdir()
        rules = {
            "api": service("api", CHECK),
            "checkout": alert_service("checkout", log, alertname="CheckoutDown", target=False),
        }
        config = write_config(
            directory, prometheus.url, rules, extra=store_section(database, "daemon-a")
        )
        daemon = Daemon(config, "daemon-a")
        with daemon:
            poll(
                lambda: metric(daemon, "rollbackd_leases_held") == 2,
                timeout=LEASE_TIME * 10,
                what="both services held",
            )
            poll(
                lambda: metric(daemon, "rollbackd_check_evaluations_total", service="api") >= 2,
                timeout=30,
                what="the api check evaluated",
            )
            server.stop()
            poll(lambda: not store_ready(daemon), timeout=30, what="/readyz to see the outage")

            refused = send(daemon)
            assert refused.status_code == 503, refused.text
            assert refused.json()["detail"].startswith("alerts not stored, retry: state database")

            # Past the leases' lapse (it acts on nothing now), it still evaluates.
            poll(
                lambda: metric(daemon, "rollbackd_leases_held") == 0,
                timeout=LEASE_TIME * 10,
                what="the leases to lapse on the daemon's own clock",
            )
            lapsed = metric(daemon, "rollbackd_check_evaluations_total", service="api")
            poll(
                lambda: (
                    metric(daemon, "rollbackd_check_evaluations_total", service="api") >= lapsed + 3
                ),
                timeout=30,
                what="the api check to go on being evaluated",
            )
            assert httpx.get(f"{daemon.url}/healthz", timeout=5).status_code == 200

            server.start()
            poll(lambda: store_ready(daemon), timeout=60, what="/readyz once PostgreSQL is back")
            poll(
                lambda: metric(daemon, "rollbackd_leases_held") == 2,
                timeout=LEASE_TIME * 10,
                what="both services held again",
            )
            # Alertmanager's retry of the refused delivery: stored now, and rolled back.
            accepted = send(daemon)
            assert accepted.status_code == 200, accepted.text

            def rolled_back() -> bool:
                daemon.assert_alive()
                found = rows(database, "SELECT state FROM rollbacks WHERE service = 'checkout'")
                return found == [("succeeded",)]

            poll(rolled_back, timeout=30, interval=0.1, what="the checkout rollback to succeed")
            assert len(executions(log)) == 1
            assert rows(database, "SELECT count(*) FROM alerts") == [(1,)]
