"""Several real ``rollbackd run`` daemons on one real PostgreSQL: the helpers the HA tests
share (tests/test_ha_daemons.py, test_ha_failover.py, test_ha_chaos.py).

Who holds what is read from the ``leases`` table, live by the database's clock (one row per
service, so the table itself can never show a service held twice); what a daemon believes it
holds from its own ``/metrics`` (``rollbackd_leases_held``). Waiting is bounded polling.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from rollbackd.runtime.leases import assign
from support.daemon_process import DaemonProcess
from support.postgres import Database
from support.prometheus import poll

LEASE_TIME = 3.0
"""The HA tests' ``[store] lease_time``: short, so that a takeover takes seconds."""

# A deploy command that logs its run, then waits for a gate file before switching the fake
# service: a test can kill the daemon while it waits (or create the gate first, for a run
# that goes straight through). The parent pid tells which daemon started it (the command
# executor runs the program directly, without a shell).
GATED_DEPLOY = """\
import json, os, sys, time, urllib.request

control, version, log, gate = sys.argv[1:5]
entry = {
    "pid": os.getpid(),
    "ppid": os.getppid(),
    "version": version,
    "env": {k: v for k, v in os.environ.items() if k.startswith("ROLLBACKD_")},
}
with open(log, "a", encoding="utf-8") as handle:
    handle.write(json.dumps(entry) + "\\n")
deadline = time.monotonic() + 300  # a test that never opens the gate must not leave it
while not os.path.exists(gate):
    if time.monotonic() > deadline:
        sys.exit(2)
    time.sleep(0.05)
body = json.dumps({"version": version, "error_ratio": 0.0}).encode()
request = urllib.request.Request(
    control, data=body, headers={"Content-Type": "application/json"}
)
urllib.request.urlopen(request, timeout=10).close()
"""


class Daemon(DaemonProcess):
    """``rollbackd run`` as member ``member`` of the shared store: killable without warning,
    and freezable (SIGSTOP) as a long GC pause or a stalled VM would freeze it."""

    def __init__(self, config: Path, member: str) -> None:
        super().__init__(config)
        self.member = member

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL to the daemon's pid only: its executors, each leading a process group of
        its own, live on."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def start_all(daemons: Sequence[DaemonProcess]) -> None:
    """Start the daemons together (each start waits for its own /healthz): starting one
    takes seconds on a busy host, and their order does not matter."""
    with ThreadPoolExecutor(max_workers=max(1, len(daemons))) as pool:
        list(pool.map(lambda daemon: daemon.start(), daemons))


def stop_all(daemons: Sequence[DaemonProcess]) -> None:
    """SIGTERM to each, together; wait for all of them."""
    with ThreadPoolExecutor(max_workers=max(1, len(daemons))) as pool:
        list(pool.map(lambda daemon: daemon.stop(), daemons))


# -- the configs ------------------------------------------------------------------------


def store_section(database: Database, member: str) -> str:
    return (
        f'\n[store]\nurl = "{database.url}"\npassword_file = "{database.password_file}"\n'
        f'lease_time = "{LEASE_TIME:g}s"\nmember = "{member}"\n'
    )


def checkout_rules(control: str, script: Path, log: Path, gate: Path) -> str:
    """``checkout`` as the fake service serves it (support.configs.checkout_rules), rolled
    back by the gated deploy command (``script`` holds GATED_DEPLOY)."""
    argv = [sys.executable, str(script), control, "{to_version}", str(log), str(gate)]
    return f"""
[service]
name = "checkout"
version_query = 'max by (version) (app_build_info{{service="checkout"}})'
version_label = "version"
bake_time = "2s"

[[rollback]]
type = "command"
argv = {json.dumps(argv)}
timeout = "10m"

[verify]
window = "2s"
version_timeout = "30s"

[[check]]
name = "errors"
type = "error_rate"
selector = 'service="checkout"'
errors = 'code=~"5.."'
above = 0.1
window = "10s"
breaches = 2
interval = "1s"
"""


# -- reading the shared state -------------------------------------------------------------


def rows(database: Database, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(database.url, password=database.password) as conn:
        return [tuple(row) for row in conn.execute(sql, params).fetchall()]


def await_rows(
    database: Database, alive: Sequence[Daemon], sql: str, *params: object, timeout: float = 30.0
) -> list[tuple[Any, ...]]:
    """The rows of ``sql`` once there are any, the daemons in ``alive`` running meanwhile."""
    found: list[tuple[Any, ...]] = []

    def ready() -> bool:
        nonlocal found
        for daemon in alive:
            daemon.assert_alive()
        found = rows(database, sql, *params)
        return bool(found)

    poll(ready, timeout=timeout, interval=0.1, what=sql)
    return found


def live_lease(database: Database, service: str) -> tuple[str, int] | None:
    """(holder, epoch) of the service's live lease, by the database's clock."""
    found = rows(
        database,
        "SELECT holder, epoch FROM leases WHERE service = %s"
        " AND expires_at > extract(epoch FROM clock_timestamp())",
        service,
    )
    return (str(found[0][0]), int(found[0][1])) if found else None


def live_holders(database: Database) -> dict[str, str]:
    """service -> holder of its live lease, by the database's clock."""
    found = rows(
        database,
        "SELECT service, holder FROM leases"
        " WHERE expires_at > extract(epoch FROM clock_timestamp())",
    )
    return {str(s): str(h) for s, h in found}


def events(database: Database, rollback_id: int) -> list[str]:
    found = rows(
        database, "SELECT type FROM events WHERE rollback_id = %s ORDER BY id", rollback_id
    )
    return [str(kind) for (kind,) in found]


def steps(database: Database, rollback_id: int) -> list[tuple[Any, ...]]:
    return rows(
        database,
        "SELECT kind, finished_at IS NOT NULL, ok, summary FROM rollback_steps"
        " WHERE rollback_id = %s ORDER BY id",
        rollback_id,
    )


# -- reading a daemon -----------------------------------------------------------------------


def metric(daemon: DaemonProcess, name: str, **labels: str) -> float:
    """The sum of a daemon's samples named ``name`` (with ``labels``) on its /metrics."""
    with daemon.http() as http:
        response = http.get("/metrics")
    assert response.status_code == 200, response.text
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def log_lines(daemon: DaemonProcess) -> list[str]:
    """The daemon's log so far, without the console renderer's colours."""
    if not daemon.log.exists():
        return []
    return _COLOURS.sub("", daemon.log.read_text(errors="replace")).splitlines()


def store_ready(daemon: DaemonProcess) -> bool:
    """What the daemon's /readyz says of its state store (503 when it is not ready)."""
    response = httpx.get(f"{daemon.url}/readyz", timeout=10)
    assert response.status_code in (200, 503), response.text
    ok = bool(response.json()["checks"]["store"]["ok"])
    assert ok or response.status_code == 503, response.text
    return ok


# -- who holds what -----------------------------------------------------------------------


def owner(service: str, services: Sequence[str], members: Sequence[str]) -> str:
    """The member the fair split of ``services`` among ``members`` gives ``service`` to."""
    [found] = [m for m, held in assign(services, members).items() if service in held]
    return found


def await_holder(database: Database, service: str, daemon: Daemon, others: Sequence[Daemon]) -> int:
    """Wait until ``daemon`` holds ``service`` in the database and acts on all it holds (its
    own gauge counts as many as the table gives it); the epoch of its lease."""

    def holds() -> bool:
        for each in [daemon, *others]:
            each.assert_alive()
        holders = live_holders(database)
        if holders.get(service) != daemon.member:
            return False
        mine = sum(1 for holder in holders.values() if holder == daemon.member)
        return metric(daemon, "rollbackd_leases_held") == mine

    poll(holds, timeout=LEASE_TIME * 10, interval=0.1, what=f"{daemon.member} to hold {service}")
    lease = live_lease(database, service)
    assert lease is not None and lease[0] == daemon.member
    return lease[1]


def await_split(
    database: Database, services: Sequence[str], daemons: Sequence[Daemon], *, timeout: float
) -> dict[str, str]:
    """Wait until the ``leases`` table holds every service as the fair split among
    ``daemons`` gives it, and each daemon acts on its share (its gauge equals its count);
    service -> holder."""
    members = [d.member for d in daemons]
    wanted = {s: m for m, held in assign(services, members).items() for s in held}

    def split() -> bool:
        for daemon in daemons:
            daemon.assert_alive()
        if live_holders(database) != wanted:
            return False
        counts = Counter(wanted.values())
        return all(metric(d, "rollbackd_leases_held") == counts[d.member] for d in daemons)

    poll(split, timeout=timeout, interval=0.2, what=f"the services split as {wanted}")
    return wanted
