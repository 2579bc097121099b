"""Two real ``rollbackd run`` daemons sharing one real PostgreSQL: they split the services
between them through leases, and when one is SIGKILLed the other takes its services over
and evaluates their checks.

What each daemon holds is read from the database's ``leases`` table (live by the database's
clock); what it evaluates from its own ``/metrics``. Waiting is bounded polling.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from support.configs import service, write_config
from support.daemon_process import DaemonProcess
from support.ha import LEASE_TIME, live_holders, store_section
from support.postgres import Database
from support.prometheus import PrometheusFactory, poll

SERVICES = ["cart", "checkout", "payments", "search"]
CHECK = '[[check]]\nname = "up"\ntype = "query"\nquery = "vector(0)"\nabove = 1\ninterval = "1s"\n'


def daemon_config(directory: Path, name: str, database: Database, prometheus_url: str) -> Path:
    directory.mkdir()
    rules = {s: service(s, CHECK) for s in SERVICES}
    return write_config(directory, prometheus_url, rules, extra=store_section(database, name))


def evaluations(daemon: DaemonProcess) -> dict[str, float]:
    """The daemon's ``rollbackd_check_evaluations_total`` by service."""
    with daemon.http() as http:
        response = http.get("/metrics")
    assert response.status_code == 200, response.text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        if family.name != "rollbackd_check_evaluations":
            continue
        for sample in family.samples:
            if sample.name == "rollbackd_check_evaluations_total":
                name = sample.labels["service"]
                counts[name] = counts.get(name, 0.0) + sample.value
    return counts


def test_two_daemons_share_the_services_and_one_takes_over_when_the_other_dies(
    postgres_database: Database, prometheus_factory: PrometheusFactory, tmp_path: Path
) -> None:
    prometheus = prometheus_factory()
    config_a = daemon_config(tmp_path / "a", "daemon-a", postgres_database, prometheus.url)
    config_b = daemon_config(tmp_path / "b", "daemon-b", postgres_database, prometheus.url)
    with DaemonProcess(config_a) as a, DaemonProcess(config_b) as b:
        holders: dict[str, str] = {}

        def split_evenly() -> bool:
            nonlocal holders
            a.assert_alive()
            b.assert_alive()
            holders = live_holders(postgres_database)
            counts = Counter(holders.values())
            return len(holders) == 4 and counts == {"daemon-a": 2, "daemon-b": 2}

        poll(split_evenly, timeout=30, interval=0.2, what="each daemon to hold 2 services")
        of_a = sorted(s for s, holder in holders.items() if holder == "daemon-a")

        def b_evaluates_its_own() -> bool:
            counts = evaluations(b)
            return all(counts.get(s, 0) > 0 for s in SERVICES if s not in of_a)

        poll(b_evaluates_its_own, timeout=30, interval=0.2, what="b to evaluate its services")
        before = evaluations(b)
        assert a.process is not None
        a.process.kill()  # SIGKILL: no release, no goodbye; its leases must lapse
        a.process.wait(timeout=10)

        def b_holds_all() -> bool:
            b.assert_alive()
            return live_holders(postgres_database) == dict.fromkeys(SERVICES, "daemon-b")

        poll(b_holds_all, timeout=LEASE_TIME * 6, interval=0.2, what="b to hold all 4")

        def b_evaluates_the_taken_over() -> bool:
            counts = evaluations(b)
            return all(counts.get(s, 0) > before.get(s, 0) for s in of_a)

        poll(
            b_evaluates_the_taken_over,
            timeout=30,
            interval=0.2,
            what=f"b to evaluate the services it took over: {of_a}",
        )
        assert all(before.get(s, 0) == 0 for s in of_a), "b left a's services alone before"
    # b stopped cleanly (SIGTERM): it gave its leases back, for another daemon to take now.
    assert live_holders(postgres_database) == {}
