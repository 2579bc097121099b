"""Failover with the defaults as shipped: two real ``rollbackd run`` daemons on one real
PostgreSQL with no ``lease_time`` set (10 s) and checks at their default ``interval``
(15 s). The holder is SIGKILLed; the other takes the service over once the lease lapses
by the database's clock, and goes on evaluating its check.

The other HA tests use ``lease_time = "3s"`` to take seconds; this one proves the shipped
default behaves the same, bounded by the lease time and one keeper tick.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.configs import service, write_config
from support.ha import Daemon, live_holders, metric
from support.postgres import Database
from support.prometheus import PrometheusFactory, poll

pytestmark = [pytest.mark.faults]

DEFAULT_LEASE_TIME = 10.0
"""``[store] lease_time``'s default (config/settings.py)."""
CHECK = '[[check]]\nname = "up"\ntype = "query"\nquery = "vector(0)"\nabove = 1\n'


def default_store(database: Database, member: str) -> str:
    """``[store]`` as a user writes it: the URL, the password file, a member name."""
    return (
        f'\n[store]\nurl = "{database.url}"\npassword_file = "{database.password_file}"\n'
        f'member = "{member}"\n'
    )


def evaluations(daemon: Daemon) -> float:
    return metric(daemon, "rollbackd_check_evaluations_total", service="api")


@pytest.mark.prometheus
def test_with_the_default_lease_time_the_other_daemon_takes_over_and_evaluates(
    prometheus_factory: PrometheusFactory, postgres_database: Database, tmp_path: Path
) -> None:
    prometheus = prometheus_factory()
    daemons = {}
    for member in ("daemon-a", "daemon-b"):
        directory = tmp_path / member
        directory.mkdir()
        config = write_config(
            directory,
            prometheus.url,
            {"api": service("api", CHECK)},
            extra=default_store(postgres_database, member),
        )
        daemons[member] = Daemon(config, member)
    a, b = daemons["daemon-a"], daemons["daemon-b"]
    with a:
        poll(
            lambda: live_holders(postgres_database) == {"api": "daemon-a"},
            timeout=DEFAULT_LEASE_TIME * 3,
            what="daemon-a to hold api",
        )
        with b:
            # Joined: the split may hand api to b; either way one holder evaluates it.
            poll(
                lambda: evaluations(a) + evaluations(b) >= 1,
                timeout=60,
                what="api evaluated once",
            )
            holder_name = live_holders(postgres_database)["api"]
            holder, other = (a, b) if holder_name == "daemon-a" else (b, a)
            poll(
                lambda: metric(holder, "rollbackd_leases_held") == 1,
                timeout=DEFAULT_LEASE_TIME * 3,
                what="the holder to act on api",
            )
            before = evaluations(other)
            holder.kill()

            def other_holds() -> bool:
                other.assert_alive()
                return live_holders(postgres_database) == {"api": other.member}

            # Bounded by the lease time plus one keeper tick (a third of it), with room for
            # a loaded machine: a correctness bound, not a speed measurement.
            poll(other_holds, timeout=DEFAULT_LEASE_TIME * 4, what="the other to take api")
            poll(
                lambda: evaluations(other) > before,
                timeout=60,
                what="the new holder to evaluate api (default interval 15 s)",
            )
            assert metric(other, "rollbackd_lease_takeovers_total") >= 1
