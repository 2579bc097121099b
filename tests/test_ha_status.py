"""``rollbackd status`` with several daemons on one real PostgreSQL, and one member name per
daemon.

- Each daemon's status names who holds each service (``holder``, ``held_since``, ``epoch``,
  as the ``leases`` table has them by the database's clock) and itself (``member``); a
  service another daemon holds shows its checks as that holder saved them (``check_states``),
  not this daemon's own (it never evaluated them). The CLI says it in words.
- Alone on SQLite the answer has none of those fields: it is what it was before leases.
- A second ``rollbackd run`` given a member name a live daemon already has exits 1 and says
  why; the first keeps running and holding.

Real ``rollbackd run`` processes, a real Prometheus; waiting is bounded polling.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from rollbackd.cli.timeparse import format_time
from support.configs import service, write_config
from support.daemon_process import TOKEN, TOKEN_ENV, InProcessDaemon, alert_service, run_cli
from support.fake_service import FakeService
from support.ha import (
    LEASE_TIME,
    Daemon,
    await_split,
    live_holders,
    metric,
    owner,
    rows,
    store_section,
)
from support.postgres import Database
from support.prometheus import PrometheusFactory, ScrapeTarget, poll

SERVICES = ["cart", "search"]
MEMBERS = ("daemon-a", "daemon-b")
# Breaching once the fake cart runs 2.0.0, then pending for an hour: a state worth saving
# that never fires (no rollback), which only cart's holder can know, since the split was
# made before it.
CART = (
    '[[check]]\nname = "new_build"\ntype = "query"\n'
    'query = \'max(app_build_info{service="cart", version="2.0.0"})\'\n'
    'above = 0\nfor = "1h"\ninterval = "1s"\n'
)
SEARCH = '[[check]]\nname = "up"\ntype = "query"\nquery = "vector(0)"\nabove = 1\ninterval = "1s"\n'
RULES = {"cart": service("cart", CART), "search": service("search", SEARCH)}
LEASE_FIELDS = {"holder", "held_since", "epoch"}


def configs(tmp_path: Path, database: Database, prometheus_url: str) -> dict[str, Path]:
    found = {}
    for member in MEMBERS:
        directory = tmp_path / member
        directory.mkdir()
        extra = store_section(database, member)
        found[member] = write_config(directory, prometheus_url, RULES, extra=extra)
    return found


def status_of(daemon: Daemon) -> dict[str, dict[str, Any]]:
    with daemon.http() as http:
        answer = http.get("/api/v1/status")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["member"] == daemon.member
    return {s["name"]: s for s in body["services"]}


def cart_phase(daemon: Daemon) -> str:
    return str(status_of(daemon)["cart"]["checks"][0]["phase"])


@pytest.mark.prometheus
def test_status_names_each_services_holder_and_shows_the_holders_check_states(
    tmp_path: Path,
    postgres_database: Database,
    prometheus_factory: PrometheusFactory,
    fake_service_factory: Callable[..., FakeService],
) -> None:
    cart = fake_service_factory("cart", "1.0.0")
    prometheus = prometheus_factory(targets=[ScrapeTarget(cart.address)])
    prometheus.wait_for('app_build_info{service="cart", version="1.0.0"}')
    paths = configs(tmp_path, postgres_database, prometheus.url)
    daemons = [Daemon(paths[m], m) for m in MEMBERS]
    try:
        for daemon in daemons:
            daemon.start()
        holders = await_split(postgres_database, SERVICES, daemons, timeout=LEASE_TIME * 10)
        assert set(holders.values()) == set(MEMBERS), "one service each"
        [holder] = [d for d in daemons if d.member == holders["cart"]]
        [other] = [d for d in daemons if d is not holder]
        assert cart_phase(holder) == cart_phase(other) == "ok"
        evaluated = metric(other, "rollbackd_check_evaluations_total", service="cart")

        cart.update(version="2.0.0")
        prometheus.wait_for('app_build_info{service="cart", version="2.0.0"}')
        poll(lambda: cart_phase(holder) == "pending", timeout=30, what="cart pending")
        # The other daemon no longer evaluates cart: what it shows is what cart's holder
        # saved.
        poll(lambda: cart_phase(other) == "pending", timeout=30, what="cart pending elsewhere")
        assert metric(other, "rollbackd_check_evaluations_total", service="cart") == evaluated

        leases = {
            str(name): (str(held_by), int(epoch), float(since))
            for name, held_by, epoch, since in rows(
                postgres_database, "SELECT service, holder, epoch, acquired_at FROM leases"
            )
        }
        for daemon in daemons:
            shown = status_of(daemon)
            for name in SERVICES:
                held = (shown[name]["holder"], shown[name]["epoch"], shown[name]["held_since"])
                assert held == leases[name], (daemon.member, name)
                assert held[0] == owner(name, SERVICES, MEMBERS)

        told = run_cli("status", "-c", str(other.config), env={TOKEN_ENV: TOKEN})
        assert told.returncode == 0, told.stderr
        lines = told.stdout.splitlines()
        assert f"this daemon is member {other.member}" in lines
        since = format_time(leases["cart"][2])
        assert (
            f"  cart: held by {holder.member} since {since}, epoch {leases['cart'][1]}" in lines
        ), told.stdout
        [search] = [line for line in lines if line.startswith("  search: held by ")]
        assert search.startswith(f"  search: held by {other.member} (this daemon) since ")
        assert "new_build PENDING" in told.stdout
    finally:
        for daemon in daemons:
            daemon.stop()


async def test_alone_on_sqlite_the_status_has_no_lease_fields(tmp_path: Path) -> None:
    daemon = InProcessDaemon(
        tmp_path, {"api": alert_service("api", tmp_path / "runs.jsonl", alertname="ApiDown")}
    )
    try:
        async with daemon.client() as client:
            answer = (await client.get("/api/v1/status")).json()
    finally:
        daemon.close()
    assert "member" not in answer
    [api] = answer["services"]
    assert LEASE_FIELDS.isdisjoint(api)
    assert set(api) == {
        "name",
        "current_version",
        "current_since",
        "healthy_since",
        "last_known_good",
        "paused",
        "frozen",
        "frozen_reason",
        "canary_active",
        "checks",
        "alerts",
        "bake",
    }


def test_a_second_daemon_with_a_live_member_name_refuses_to_start(
    tmp_path: Path, postgres_database: Database, prometheus_factory: PrometheusFactory
) -> None:
    prometheus = prometheus_factory()
    first_config, second_config = (
        write_config(
            tmp_path / name,
            prometheus.url,
            {"search": service("search", SEARCH)},
            extra=store_section(postgres_database, "daemon-a"),
        )
        for name in ("first", "second")
    )
    first = Daemon(first_config, "daemon-a")
    try:
        first.start()
        poll(
            lambda: live_holders(postgres_database) == {"search": "daemon-a"},
            timeout=LEASE_TIME * 10,
            interval=0.2,
            what="the first daemon to hold everything",
        )
        epochs = rows(postgres_database, "SELECT service, epoch FROM leases ORDER BY service")
        second = subprocess.run(
            [sys.executable, "-m", "rollbackd", "run", "-c", str(second_config)],
            capture_output=True,
            text=True,
            env=first.env,
            timeout=LEASE_TIME * 10,
            check=False,
        )
        assert second.returncode == 1, second.stderr
        assert (
            second.stderr.strip()
            .splitlines()[-1]
            .startswith("rollbackd: another daemon is running as member 'daemon-a' on ")
        ), second.stderr
        assert second.stderr.strip().endswith(": give each daemon its own [store] member")
        assert f"/{postgres_database.name}" in second.stderr, "the database is named"
        # The first never noticed: running, holding, the same tenures.
        first.assert_alive()
        assert live_holders(postgres_database) == {"search": "daemon-a"}
        assert rows(postgres_database, "SELECT service, epoch FROM leases ORDER BY service") == (
            epochs
        )
        assert httpx.get(f"{first.url}/healthz", timeout=5).status_code == 200
        assert not (second_config.parent / "state" / "api.address").exists()
    finally:
        first.stop()
