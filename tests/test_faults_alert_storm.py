"""Fault injection: an alert storm. 10,000 distinct firing alerts for one service within
a minute lead to one rollback, run once.

* Straight at a real ``rollbackd run``: Alertmanager-shaped deliveries (payload version 4,
  100 alerts each) from several client threads, with re-sends mixed in. Every alert is
  stored exactly once, every delivery is answered (a 503 is retried, as Alertmanager
  retries it), there is one rollback, and the other alerts join it as triggers.
* Through a real Alertmanager 0.25, which sends a whole alert group as one delivery. With
  its defaults, the 10,000-alert group is one body of about 3 MB: under rollbackd's
  ``webhook_max_body`` (16 MiB) it is taken whole and leads to one rollback. A group over
  the limit is refused with 413, which Alertmanager never retries, so the release would
  never be rolled back: rollbackd logs a warning naming ``max_alerts``. With the
  configuration the README recommends (``max_alerts: 100``, grouped by service), the storm
  leads to one rollback, and another service's alert in the same storm still reaches
  rollbackd.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.alertmanager import AlertmanagerServer, alertmanager_available
from support.configs import write_config
from support.daemon_process import TOKEN, DaemonProcess, alert_service, executions
from support.prometheus import poll

pytestmark = [pytest.mark.faults]

needs_alertmanager = pytest.mark.skipif(
    not alertmanager_available(),
    reason="the 'prometheus-alertmanager' binary is not on PATH (Debian package)",
)

STORM = 10_000
PER_DELIVERY = 100
CLIENTS = 4
RESENT_EVERY = 10
"""Every 10th delivery is sent a second time, as Alertmanager re-sends a firing group."""
ATTEMPTS = 5
"""Attempts per delivery: a 503 or a connection error is retried, as Alertmanager does."""
ALERTNAME = "ApiHighErrorRate"
WEBHOOK = "/api/v1/alertmanager"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def storm_labels(seq: int, service: str = "api") -> dict[str, str]:
    return {
        "alertname": ALERTNAME,
        "service": service,
        "severity": "critical",
        "instance": f"10.{seq // 62500}.{seq // 250 % 250}.{seq % 250}:8080",
    }


def fingerprint(labels: dict[str, str]) -> str:
    """16 hex characters derived from the labels, as Alertmanager's are."""
    return hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]


def delivery(first: int, starts_at: str) -> bytes:
    """One Alertmanager webhook body: alerts ``first`` .. ``first + PER_DELIVERY - 1``."""
    alerts = []
    for seq in range(first, min(STORM, first + PER_DELIVERY)):
        labels = storm_labels(seq)
        alerts.append(
            {
                "status": "firing",
                "labels": labels,
                "annotations": {"summary": f"5xx above 5% on {labels['instance']}"},
                "startsAt": starts_at,
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": fingerprint(labels),
            }
        )
    return json.dumps(
        {
            "version": "4",
            "groupKey": f'{{}}:{{alertname="{ALERTNAME}"}}',
            "truncatedAlerts": 0,
            "status": "firing",
            "receiver": "rollbackd",
            "groupLabels": {"alertname": ALERTNAME},
            "commonLabels": {"alertname": ALERTNAME, "service": "api", "severity": "critical"},
            "commonAnnotations": {},
            "externalURL": "http://alertmanager.invalid",
            "alerts": alerts,
        }
    ).encode()


def schedule(bodies: Sequence[bytes]) -> list[bytes]:
    """Every delivery once, plus every RESENT_EVERY-th again a few deliveries later."""
    order: list[bytes] = []
    for i, body in enumerate(bodies):
        order.append(body)
        if i >= 5 and (i - 5) % RESENT_EVERY == 0:
            order.append(bodies[i - 5])
    return order


class Sender:
    """Posts deliveries from CLIENTS threads, each with its own connection, and keeps
    every final answer."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.answers: list[tuple[int, dict[str, Any]]] = []
        self.retried = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def post(self, http: httpx.Client, body: bytes) -> None:
        last = ""
        for _ in range(ATTEMPTS):
            try:
                response = http.post(WEBHOOK, content=body)
            except httpx.TransportError as exc:
                last = repr(exc)
            else:
                if response.status_code != 503:
                    with self._lock:
                        self.answers.append((response.status_code, response.json()))
                    return
                last = response.text
            with self._lock:
                self.retried += 1
        with self._lock:
            self.failures.append(f"no answer after {ATTEMPTS} attempts: {last}")

    def run(self, share: Sequence[bytes]) -> None:
        try:
            with httpx.Client(
                base_url=self.daemon.url,
                headers={
                    "Authorization": f"Bearer {self.daemon.token}",
                    "content-type": "application/json",
                },
                timeout=30,
            ) as http:
                for body in share:
                    self.post(http, body)
        except Exception as exc:  # reported by the test, never lost with the thread
            with self._lock:
                self.failures.append(repr(exc))

    def send(self, order: Sequence[bytes]) -> None:
        threads = [
            threading.Thread(target=self.run, args=(order[k::CLIENTS],), daemon=True)
            for k in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a client thread did not finish"


def webhook_answers(daemon: DaemonProcess, code: int) -> float:
    """How often the daemon answered the webhook with ``code``, from its /metrics."""
    text = httpx.get(f"{daemon.url}/metrics", timeout=5).text
    labels = f'code="{code}",method="POST",route="{WEBHOOK}"'
    found = re.search(rf"^rollbackd_http_requests_total\{{{labels}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def daemon_log(daemon: DaemonProcess) -> str:
    return _ANSI.sub("", daemon.log.read_text(errors="replace"))


def count(daemon: DaemonProcess, sql: str, *params: object) -> int:
    [(value,)] = daemon.rows(sql, *params)
    return int(value or 0)


def release(daemon: DaemonProcess, service: str, version: str) -> None:
    with daemon.http() as api:
        answer = api.post("/api/v1/releases", json={"service": service, "version": version})
        assert answer.status_code == 200, answer.text


def await_succeeded(daemon: DaemonProcess, service: str) -> int:
    [(rollback_id,)] = daemon.await_rows(
        "SELECT id FROM rollbacks WHERE service = ? AND state = 'succeeded'",
        service,
        timeout=60,
        what=f"the rollback of {service} to succeed",
    )
    return int(rollback_id)


# -- 1. the storm straight at the daemon ---------------------------------------------------


def test_ten_thousand_alerts_for_one_service_make_one_rollback(tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        {"api": alert_service("api", log, alertname=ALERTNAME, target=False)},
    )
    with DaemonProcess(config) as daemon:
        release(daemon, "api", "2.0.0")
        # The storm began after 2.0.0 went live (a breach older than the release is not
        # its doing: the guards refuse it). Go writes timestamps with 9 fractional digits.
        began = datetime.fromtimestamp(time.time(), UTC)
        starts_at = began.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"
        bodies = [delivery(first, starts_at) for first in range(0, STORM, PER_DELIVERY)]
        order = schedule(bodies)
        resent = len(order) - len(bodies)
        assert resent == 10
        sender = Sender(daemon)
        sender.send(order)  # 110 deliveries, 11,000 alerts: a few seconds, well within a minute

        assert sender.failures == []
        assert [code for code, _ in sender.answers] == [200] * len(order), sender.answers[:3]
        # Every alert is reported new exactly once, whichever of its deliveries came first.
        assert sum(answer["new"] for _, answer in sender.answers) == STORM
        assert sum(answer["received"] for _, answer in sender.answers) == STORM + resent * 100

        rollback_id = await_succeeded(daemon, "api")
        assert daemon.rows("SELECT service, from_version, source, automatic FROM rollbacks") == [
            ("api", "2.0.0", "alert", 1)
        ]
        assert len(executions(log)) == 1

        # Every distinct alert stored exactly once; the re-sends only counted deliveries.
        assert count(daemon, "SELECT count(*) FROM alerts") == STORM
        assert count(daemon, "SELECT count(DISTINCT fingerprint) FROM alerts") == STORM
        assert count(daemon, "SELECT sum(deliveries) FROM alerts") == STORM + resent * 100
        assert count(daemon, "SELECT count(*) FROM alerts WHERE deliveries = 2") == resent * 100
        # Every alert reached the pipeline and points at the one rollback.
        assert (
            count(
                daemon,
                "SELECT count(*) FROM alerts WHERE matched_service = 'api' "
                "AND handled_at IS NOT NULL AND rollback_id = ?",
                rollback_id,
            )
            == STORM
        )
        # The first alert made the rollback; the 9,999 others joined it as triggers.
        assert daemon.rows(
            "SELECT rollback_id, source, count(*) FROM rollback_triggers GROUP BY 1, 2"
        ) == [(rollback_id, "alert", STORM - 1)]
        assert (
            count(daemon, "SELECT count(*) FROM alerts WHERE outcome LIKE 'joined:%'") == STORM - 1
        )

        daemon.assert_alive()
        assert httpx.get(f"{daemon.url}/healthz", timeout=5).json() == {"status": "ok"}
        with daemon.http() as api:
            assert api.get("/api/v1/status").json()["in_flight"] == []
            # The record shows the first 100 joined triggers and counts them all.
            shown = api.get(f"/api/v1/rollbacks/{rollback_id}").json()
            assert len(shown["triggers"]) == 100 and shown["triggers_total"] == STORM - 1
    assert len(executions(log)) == 1


# -- 2. the storm through a real Alertmanager ----------------------------------------------


@pytest.fixture
def alertmanagers(tmp_path: Path) -> Iterator[list[AlertmanagerServer]]:
    started: list[AlertmanagerServer] = []
    yield started
    for server in started:
        server.close()


def start_alertmanager(
    started: list[AlertmanagerServer], workdir: Path, daemon: DaemonProcess, **options: Any
) -> AlertmanagerServer:
    credentials = workdir.parent / f"{workdir.name}.token"
    credentials.write_text(TOKEN + "\n")
    # group_wait 3s: the whole storm is posted well before the first flush, so the first
    # delivery already holds the whole group (posting 10,000 alerts takes a fraction of it).
    server = AlertmanagerServer(
        workdir,
        webhook_url=f"{daemon.url}{WEBHOOK}",
        credentials_file=credentials,
        group_wait="3s",
        **options,
    )
    started.append(server)
    server.start()
    return server


def post_storm(alertmanager: AlertmanagerServer, extra: Sequence[dict[str, Any]] = ()) -> None:
    """10,000 firing alerts for ``api`` (and ``extra``), posted as Prometheus posts them."""
    alerts: list[dict[str, Any]] = [
        {"labels": storm_labels(seq), "annotations": {"summary": "5xx above 5%"}}
        for seq in range(STORM)
    ]
    alerts.extend(extra)
    for first in range(0, len(alerts), 1000):
        alertmanager.post_alerts(alerts[first : first + 1000])


@needs_alertmanager
def test_a_storm_in_one_alertmanager_group_is_taken_whole_by_default(
    tmp_path: Path, alertmanagers: list[AlertmanagerServer]
) -> None:
    """Alertmanager's defaults (no max_alerts) and rollbackd's: the group is one delivery of
    about 3 MB, under webhook_max_body, stored whole, and it rolls the service back once."""
    log = tmp_path / "runs.jsonl"
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        {"api": alert_service("api", log, alertname=ALERTNAME, target=False)},
    )
    with DaemonProcess(config) as daemon:
        release(daemon, "api", "2.0.0")
        alertmanager = start_alertmanager(alertmanagers, tmp_path / "am", daemon)
        post_storm(alertmanager)
        rollback = await_succeeded(daemon, "api")
        poll(
            lambda: count(daemon, "SELECT count(*) FROM alerts") == STORM,
            timeout=40,
            interval=0.2,
            what="every alert of the group stored",
        )
        assert webhook_answers(daemon, 413) == 0
        assert daemon.rows("SELECT id FROM rollbacks") == [(rollback,)]
        assert len(executions(log)) == 1
        daemon.assert_alive()


@needs_alertmanager
def test_a_storm_over_the_webhook_limit_is_refused_whole_and_said_so(
    tmp_path: Path, alertmanagers: list[AlertmanagerServer]
) -> None:
    """A group over ``webhook_max_body`` (set to 1 MiB here) is refused with 413 on every
    flush, never retried, nothing stored, no rollback: rollbackd says so in its log and in
    the 413 Alertmanager logs, naming max_alerts, the fix."""
    log = tmp_path / "runs.jsonl"
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        {"api": alert_service("api", log, alertname=ALERTNAME, target=False)},
        extra="webhook_max_body = 1048576",
    )
    with DaemonProcess(config) as daemon:
        release(daemon, "api", "2.0.0")
        alertmanager = start_alertmanager(alertmanagers, tmp_path / "am", daemon)
        post_storm(alertmanager)
        # Two flushes (group_wait, then group_interval): the same group, refused each time.
        poll(
            lambda: webhook_answers(daemon, 413) >= 2,
            timeout=40,
            interval=0.2,
            what="two deliveries of the storm refused with 413",
        )
        assert webhook_answers(daemon, 200) == 0
        assert count(daemon, "SELECT count(*) FROM alerts") == 0
        assert count(daemon, "SELECT count(*) FROM rollbacks") == 0
        assert executions(log) == []

        text = daemon_log(daemon)
        assert "alertmanager delivery refused, over [server].webhook_max_body" in text
        assert "set max_alerts in Alertmanager's webhook_config" in text
        sizes = [int(s) for s in re.findall(r"size_at_least=(\d+)", text)]
        assert sizes and min(sizes) > 2 * 1_048_576  # the whole group: about 3 MB
        am_log = alertmanager.log_tail(400)
        assert "unexpected status code 413" in am_log
        assert "set max_alerts in the webhook_config" in am_log
        daemon.assert_alive()


@needs_alertmanager
def test_with_max_alerts_and_grouping_by_service_the_storm_makes_one_rollback(
    tmp_path: Path, alertmanagers: list[AlertmanagerServer]
) -> None:
    """The README's receiver: max_alerts 100, group_by alertname and service. The storm's
    group arrives truncated to 100 alerts, re-sent unchanged, and rolls ``api`` back once.
    One alert of ``checkout`` with the same alertname, posted in the same storm, is in its
    own group, so the truncation of api's group cannot hide it."""
    api_log = tmp_path / "api.jsonl"
    checkout_log = tmp_path / "checkout.jsonl"
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        {
            name: alert_service(
                name, path, alertname=ALERTNAME, matchers=[f'service="{name}"'], target=False
            )
            for name, path in (("api", api_log), ("checkout", checkout_log))
        },
    )
    with DaemonProcess(config) as daemon:
        release(daemon, "api", "2.0.0")
        release(daemon, "checkout", "7.1.0")
        alertmanager = start_alertmanager(
            alertmanagers,
            tmp_path / "am",
            daemon,
            group_by=("alertname", "service"),
            max_alerts=PER_DELIVERY,
        )
        # Sorted last by instance, so in a group shared with api's storm it would be cut.
        checkout = storm_labels(0, "checkout") | {"instance": "10.250.0.1:8080"}
        post_storm(alertmanager, [{"labels": checkout}])

        api_rollback = await_succeeded(daemon, "api")
        checkout_rollback = await_succeeded(daemon, "checkout")
        # Re-sends of the truncated group (repeat_interval) arrive and change nothing.
        daemon.await_rows(
            "SELECT id FROM alerts WHERE matched_service = 'api' AND deliveries >= 2",
            timeout=40,
            what="a re-send of the storm's group",
        )
        assert webhook_answers(daemon, 413) == 0
        assert daemon.rows("SELECT service, from_version, source FROM rollbacks ORDER BY id") in (
            [("api", "2.0.0", "alert"), ("checkout", "7.1.0", "alert")],
            [("checkout", "7.1.0", "alert"), ("api", "2.0.0", "alert")],
        )
        assert len(executions(api_log)) == 1
        assert len(executions(checkout_log)) == 1

        # Only the first 100 of the group ever arrive; every one joined the one rollback.
        assert daemon.rows(
            "SELECT matched_service, count(*), count(DISTINCT rollback_id), min(rollback_id) "
            "FROM alerts GROUP BY 1 ORDER BY 1"
        ) == [("api", PER_DELIVERY, 1, api_rollback), ("checkout", 1, 1, checkout_rollback)]
        assert daemon.rows("SELECT rollback_id, count(*) FROM rollback_triggers GROUP BY 1") == [
            (api_rollback, PER_DELIVERY - 1)
        ]
        text = daemon_log(daemon)
        assert f"truncated={STORM - PER_DELIVERY}" in text
        daemon.assert_alive()
        assert httpx.get(f"{daemon.url}/healthz", timeout=5).status_code == 200
