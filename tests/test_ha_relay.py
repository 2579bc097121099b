"""Every daemon takes every request: three real ``rollbackd run`` daemons on one real
PostgreSQL, each holding one of three alert-only services, and every request sent to a
daemon that does *not* hold its service.

- An alert storm sent round-robin to all three: every alert is stored once (its re-sends
  counted on the one row), every one is handed to the pipeline by the service's holder,
  and the release is rolled back once.
- A person's writes (approve, reject, a manual rollback, a release, pause and resume)
  through a daemon that does not hold the service: the holder carries each out, under its
  own lease, and the asker answers as the holder would have.

``lease_time`` is 3 s (``support.ha``) so that the split settles in seconds; leases play no
part in what is proved here beyond who holds what. Waiting is bounded polling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import cycle
from pathlib import Path
from typing import Any

import pytest

from support import webhooks
from support.configs import write_config
from support.daemon_process import alert_service, executions, set_mode
from support.ha import LEASE_TIME, Daemon, await_rows, await_split, rows, store_section
from support.postgres import Database
from support.prometheus import PrometheusFactory, poll

pytestmark = [pytest.mark.faults]

SERVICES = ["cart", "checkout", "payments"]
MEMBERS = ["daemon-a", "daemon-b", "daemon-c"]
WEBHOOK = webhooks.WEBHOOK


def rules(log: Path) -> dict[str, str]:
    return {
        name: alert_service(name, log, alertname=f"{name.capitalize()}Down", target=False)
        for name in SERVICES
    }


@contextlib.contextmanager
def three_daemons(
    tmp_path: Path, database: Database, prometheus_url: str, log: Path, mode: str = "auto"
) -> Iterator[dict[str, Daemon]]:
    """The three daemons, started, with the services split among them."""
    daemons: dict[str, Daemon] = {}
    try:
        for member in MEMBERS:
            directory = tmp_path / member
            directory.mkdir()
            config = write_config(
                directory, prometheus_url, rules(log), extra=store_section(database, member)
            )
            set_mode(config, mode)
            daemons[member] = Daemon(config, member)
            daemons[member].start()
        yield daemons
    finally:
        for daemon in daemons.values():
            daemon.stop()


def elsewhere(service: str, split: dict[str, str], daemons: dict[str, Daemon]) -> list[Daemon]:
    """The daemons that do not hold ``service``."""
    return [d for m, d in daemons.items() if m != split[service]]


def delivery(service: str, alerts: range) -> str:
    """One Alertmanager delivery of the service's firing alerts numbered ``alerts``."""
    return webhooks.delivery(
        f"{service.capitalize()}Down",
        [
            webhooks.FiringAlert(
                labels={"service": service, "pod": f"p{n}"},
                fingerprint=f"{SERVICES.index(service):04x}{n:012x}",
                annotations={"summary": f"{service} pod p{n} is down"},
            )
            for n in alerts
        ],
    )


def post(daemon: Daemon, path: str, body: Any = None, *, content: str | None = None) -> Any:
    with daemon.http() as http:
        if content is not None:
            response = http.post(path, content=content, headers=webhooks.JSON)
        else:
            response = http.post(path, json=body)
    return response


PENDING = "SELECT id, state, decided_by FROM rollbacks WHERE service = %s AND state = 'pending'"


def rollbacks_of(database: Database, service: str) -> list[tuple[Any, ...]]:
    return rows(
        database,
        "SELECT id, state, decided_by FROM rollbacks WHERE service = %s ORDER BY id",
        service,
    )


def await_state(database: Database, rollback_id: int, state: str, daemons: list[Daemon]) -> None:
    def reached() -> bool:
        for daemon in daemons:
            daemon.assert_alive()
        found = rows(database, "SELECT state FROM rollbacks WHERE id = %s", rollback_id)
        return bool(found) and found[0][0] == state

    poll(reached, timeout=LEASE_TIME * 10, interval=0.1, what=f"rollback {rollback_id} {state}")


def runs_for(log: Path, service: str) -> list[dict[str, Any]]:
    return [e for e in executions(log) if e["env"].get("ROLLBACKD_SERVICE") == service]


@pytest.mark.prometheus
def test_an_alert_storm_sent_round_robin_is_stored_once_and_rolled_back_once(
    prometheus_factory: PrometheusFactory, postgres_database: Database, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    prometheus = prometheus_factory()
    with three_daemons(tmp_path, postgres_database, prometheus.url, log) as daemons:
        split = await_split(postgres_database, SERVICES, list(daemons.values()), timeout=60)
        # 40 alerts of one release, in deliveries of 10 that overlap (Alertmanager re-sends
        # a group's alerts), every delivery to the next daemon in turn: holder included.
        targets = cycle(daemons.values())
        sent = 0
        for _round in range(3):
            for first in range(0, 40, 5):
                body = delivery("checkout", range(first, min(40, first + 10)))
                response = post(next(targets), WEBHOOK, content=body)
                assert response.status_code == 200, response.text
                sent += len(range(first, min(40, first + 10)))
        alive = list(daemons.values())

        def all_handled() -> bool:
            for daemon in alive:
                daemon.assert_alive()
            found = rows(
                postgres_database,
                "SELECT count(*), count(handled_at) FROM alerts WHERE matched_service = %s",
                "checkout",
            )
            return found == [(40, 40)]

        poll(all_handled, timeout=30, interval=0.1, what="every checkout alert handed over")
        [(stored, deliveries)] = rows(
            postgres_database,
            "SELECT count(*), sum(deliveries) FROM alerts WHERE matched_service = 'checkout'",
        )
        assert (stored, deliveries) == (40, sent)  # once each, every re-send counted on it
        [(rollback_id, _, _)] = await_rows(
            postgres_database,
            alive,
            "SELECT id, state, decided_by FROM rollbacks WHERE service = 'checkout'",
        )
        await_state(postgres_database, rollback_id, "succeeded", alive)
        assert len(rollbacks_of(postgres_database, "checkout")) == 1
        assert len(runs_for(log, "checkout")) == 1
        # Every alert went to the one rollback (executing, or joined to it), by the holder.
        outcomes = rows(
            postgres_database,
            "SELECT DISTINCT rollback_id FROM alerts WHERE matched_service = 'checkout'",
        )
        assert outcomes == [(rollback_id,)]
        holder = daemons[split["checkout"]]
        assert "alert left for the service's holder" not in holder.log.read_text()
        for other in elsewhere("checkout", split, daemons):
            assert "alert left for the service's holder" in other.log.read_text()
        for service in ("cart", "payments"):
            assert rollbacks_of(postgres_database, service) == []


@pytest.mark.prometheus
def test_a_persons_writes_through_a_daemon_that_does_not_hold_the_service_take_effect_on_the_holder(
    prometheus_factory: PrometheusFactory, postgres_database: Database, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    prometheus = prometheus_factory()
    with three_daemons(tmp_path, postgres_database, prometheus.url, log, mode="approve") as daemons:
        alive = list(daemons.values())
        split = await_split(postgres_database, SERVICES, alive, timeout=60)
        # Two approvals wait, each recorded by its holder from an alert sent elsewhere.
        for service in ("cart", "payments"):
            response = post(
                elsewhere(service, split, daemons)[0], WEBHOOK, content=delivery(service, range(1))
            )
            assert response.status_code == 200, response.text
        [(cart_id, _, _)] = await_rows(
            postgres_database,
            alive,
            PENDING,
            "cart",
        )
        [(payments_id, _, _)] = await_rows(
            postgres_database,
            alive,
            PENDING,
            "payments",
        )

        # Approved through a daemon that does not hold cart: its holder runs it, once.
        asked = elsewhere("cart", split, daemons)[1]
        approved = post(asked, f"/api/v1/rollbacks/{cart_id}/approve", {"by": "alice"})
        assert approved.status_code == 200, approved.text
        assert (approved.json()["id"], approved.json()["state"]) == (cart_id, "running")
        assert approved.json()["decided_by"] == "alice"
        await_state(postgres_database, cart_id, "succeeded", alive)
        [run] = runs_for(log, "cart")
        held = rows(postgres_database, "SELECT epoch FROM leases WHERE service = 'cart'")
        assert run["env"]["ROLLBACKD_FENCING_TOKEN"] == str(held[0][0])  # the holder's epoch
        again = post(asked, f"/api/v1/rollbacks/{cart_id}/approve", {"by": "alice"})
        assert again.status_code == 409, again.text  # the holder's answer: not pending
        assert "not pending" in again.json()["detail"]

        # Rejected through a daemon that does not hold payments: it never runs.
        rejected = post(
            elsewhere("payments", split, daemons)[0],
            f"/api/v1/rollbacks/{payments_id}/reject",
            {"by": "bob", "reason": "a planned load test"},
        )
        assert rejected.status_code == 200, rejected.text
        assert rejected.json()["state"] == "rejected"
        assert rollbacks_of(postgres_database, "payments") == [(payments_id, "rejected", "bob")]

        # A release recorded by CI through a daemon that does not hold checkout.
        other = elsewhere("checkout", split, daemons)[0]
        released = post(other, "/api/v1/releases", {"service": "checkout", "version": "2.0"})
        assert released.status_code == 200, released.text
        assert (released.json()["changed"], released.json()["previous"]) == (True, None)
        assert rows(
            postgres_database,
            "SELECT current_version FROM service_state WHERE service = 'checkout'",
        ) == [("2.0",)]
        holder = daemons[split["checkout"]]
        assert "handed-off request answered" in holder.log.read_text()

        # A person's rollback through a daemon that does not hold checkout: executed (a
        # person's request needs no approval), by the holder.
        requested = post(
            other,
            "/api/v1/rollbacks",
            {"service": "checkout", "reason": "bad deploy", "requested_by": "carol"},
        )
        assert requested.status_code == 202, requested.text  # accepted: it runs on
        answer = requested.json()
        assert answer["outcome"] == "executing", answer
        assert answer["rollback"]["service"] == "checkout"
        await_state(postgres_database, answer["rollback_id"], "succeeded", alive)
        assert len(runs_for(log, "checkout")) == 1
        assert len(runs_for(log, "payments")) == 0

        # An unknown rollback is unknown wherever it is asked.
        missing = post(other, "/api/v1/rollbacks/999999/approve", {"by": "alice"})
        assert missing.status_code == 404, missing.text


@pytest.mark.prometheus
def test_pause_and_resume_through_daemons_that_do_not_hold_the_service_govern_its_holder(
    prometheus_factory: PrometheusFactory, postgres_database: Database, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    prometheus = prometheus_factory()
    with three_daemons(tmp_path, postgres_database, prometheus.url, log) as daemons:
        alive = list(daemons.values())
        split = await_split(postgres_database, SERVICES, alive, timeout=60)
        first, second = elsewhere("checkout", split, daemons)
        paused = post(first, "/api/v1/services/checkout/pause", {"by": "alice"})
        assert paused.status_code == 200, paused.text
        sent = post(second, WEBHOOK, content=delivery("checkout", range(1)))
        assert sent.status_code == 200, sent.text

        def refused() -> bool:
            for daemon in alive:
                daemon.assert_alive()
            found = rows(
                postgres_database,
                "SELECT outcome FROM alerts WHERE matched_service = 'checkout'"
                " AND handled_at IS NOT NULL",
            )
            return bool(found)

        poll(refused, timeout=30, interval=0.1, what="the holder to decide the alert")
        [(outcome,)] = rows(postgres_database, "SELECT outcome FROM alerts")
        assert outcome.startswith("refused") and "paused" in outcome, outcome
        assert rollbacks_of(postgres_database, "checkout") == []

        resumed = post(second, "/api/v1/services/checkout/resume", {"by": "alice"})
        assert resumed.status_code == 200, resumed.text
        # The holder decides the still-firing alert again (its housekeeping) and rolls back.
        [(rollback_id, _, _)] = await_rows(
            postgres_database,
            alive,
            "SELECT id, state, decided_by FROM rollbacks WHERE service = 'checkout'",
        )
        await_state(postgres_database, rollback_id, "succeeded", alive)
        assert len(runs_for(log, "checkout")) == 1
