"""Requests to a daemon that does not hold the service (issue 15): how soon the holder acts.

Three real ``rollbackd run`` daemons share one real PostgreSQL (``tests/support/postgres.py``)
and split three alert-only services. For each run the benchmark sends, to a daemon that
does NOT hold the service:

* one Alertmanager delivery of a new firing alert, and measures the webhook's answer time
  and the time from sending it to the alert's ``handled_at`` (written by the holder once
  its pipeline decided: the request crossed the database, ``NOTIFY`` woke the holder);
* for comparison, the same delivery sent to the holder itself;
* a rejection of a pending rollback (mode approve), measuring the API call's round trip
  (asker -> ``handoffs`` row -> holder -> answer -> asker).

Times are the benchmark's wall clock for the sends and the database's ``handled_at`` (the
daemons' wall clock) for the hand-over: one machine, one clock.

    .venv/bin/python bench/ha_relay.py [--runs 20]

Prints a table and one JSON line. Everything started is stopped. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import webhooks  # noqa: E402
from support.configs import write_config  # noqa: E402
from support.daemon_process import alert_service, set_mode  # noqa: E402
from support.ha import Daemon, await_split, store_section  # noqa: E402
from support.postgres import Database, PostgresServer  # noqa: E402
from support.prometheus import PrometheusServer, poll  # noqa: E402

SERVICES = ["cart", "checkout", "payments"]
MEMBERS = ["daemon-a", "daemon-b", "daemon-c"]


def delivery(service: str, n: int) -> str:
    alert = webhooks.FiringAlert(
        labels={"service": service, "run": str(n)},
        fingerprint=f"{SERVICES.index(service):04x}{n:012x}",
        # Now: each run is a new firing episode of the version-less service.
        starts_at=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    )
    return webhooks.delivery(f"{service.capitalize()}Down", [alert], group_key=f"bench-{n}")


def handled_at(database: Database, fingerprint: str) -> float | None:
    with psycopg.connect(database.url, password=database.password) as conn:
        row = conn.execute(
            "SELECT handled_at FROM alerts WHERE fingerprint = %s", (fingerprint,)
        ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def pending(database: Database, service: str) -> int | None:
    with psycopg.connect(database.url, password=database.password) as conn:
        row = conn.execute(
            "SELECT id FROM rollbacks WHERE service = %s AND state = 'pending'", (service,)
        ).fetchone()
    return None if row is None else int(row[0])


def send_alert(daemon: Daemon, database: Database, service: str, n: int) -> tuple[float, float]:
    """(webhook answer time, send -> handled_at), seconds."""
    fingerprint = f"{SERVICES.index(service):04x}{n:012x}"
    sent = time.time()
    with daemon.http() as http:
        response = http.post(webhooks.WEBHOOK, content=delivery(service, n), headers=webhooks.JSON)
    answered = time.time()
    assert response.status_code == 200, response.text
    found: list[float] = []

    def done() -> bool:
        at = handled_at(database, fingerprint)
        if at is not None:
            found.append(at)
        return at is not None

    poll(done, timeout=30, interval=0.005, what="the alert handed over")
    return answered - sent, found[0] - sent


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p90_ms": round(ordered[max(0, int(len(ordered) * 0.9) - 1)] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    results: dict[str, list[float]] = {
        "webhook answer, non-holder": [],
        "alert handed over by the holder, sent to a non-holder": [],
        "webhook answer, holder": [],
        "alert handed over, sent to the holder": [],
        "reject through a non-holder (round trip)": [],
    }
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rollbackd-bench-")))
        prometheus = stack.enter_context(PrometheusServer(tmp / "prometheus"))
        server = stack.enter_context(PostgresServer())
        database = server.create_database("bench")
        daemons: dict[str, Daemon] = {}
        log = tmp / "runs.log"
        for member in MEMBERS:
            directory = tmp / member
            directory.mkdir()
            rules = {
                s: alert_service(s, log, alertname=f"{s.capitalize()}Down", target=False)
                for s in SERVICES
            }
            config = write_config(
                directory, prometheus.url, rules, extra=store_section(database, member)
            )
            set_mode(config, "approve")
            daemons[member] = stack.enter_context(Daemon(config, member))
        split = await_split(database, SERVICES, list(daemons.values()), timeout=60)
        service = "checkout"
        holder = daemons[split[service]]
        others = [d for m, d in daemons.items() if m != split[service]]
        n = 0
        for run in range(args.runs):
            other = others[run % len(others)]
            n += 1
            answer, handed = send_alert(other, database, service, n)
            results["webhook answer, non-holder"].append(answer)
            results["alert handed over by the holder, sent to a non-holder"].append(handed)
            rollback_id = None

            def waiting() -> bool:
                nonlocal rollback_id
                rollback_id = pending(database, service)
                return rollback_id is not None

            poll(waiting, timeout=30, interval=0.01, what="a pending rollback")
            started = time.time()
            with other.http() as http:
                response = http.post(
                    f"/api/v1/rollbacks/{rollback_id}/reject", json={"by": "bench"}
                )
            results["reject through a non-holder (round trip)"].append(time.time() - started)
            assert response.status_code == 200, response.text
            n += 1
            answer, handed = send_alert(holder, database, service, n)
            results["webhook answer, holder"].append(answer)
            results["alert handed over, sent to the holder"].append(handed)
    out: dict[str, Any] = {"runs": args.runs, "results": {}}
    print(f"{'what':58} {'median':>8} {'p90':>8} {'max':>8}")
    for name, values in results.items():
        s = summary(values)
        out["results"][name] = s
        print(f"{name:58} {s['median_ms']:7.1f}ms {s['p90_ms']:7.1f}ms {s['max_ms']:7.1f}ms")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
