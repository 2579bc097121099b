"""Chaos under three real ``rollbackd run`` daemons sharing one real PostgreSQL (issue 15's
proofs): each daemon is its own ``[store] member``; a real Prometheus scrapes the fake
``checkout`` (tests/support/fake_service.py), and five more services are judged by a check
that never fires, so that each daemon holds two of the six.

1. The holder of ``checkout`` frozen (SIGSTOP) past its lease while a bad release goes out:
   another daemon takes the service over and rolls the release back under its own epoch;
   thawed, the frozen daemon does nothing stale and keeps running.
2. One daemon cut off from PostgreSQL by a TCP proxy (tests/support/tcp_proxy.py): the
   others take its services over and carry on; it says so on /readyz and acts on nothing;
   restored, it rejoins and the services rebalance.
3. PostgreSQL restarted under all three: every /readyz goes not-ready, all come back, every
   service ends held by one daemon, and a bad release afterwards is rolled back once.
4. Daemons joining and leaving (SIGTERM, then SIGKILL), sampled every 0.2 s throughout: no
   two daemons claim more than the database gives them, and no service goes without a live
   holder for longer than the lease time.

``lease_time = "3s"``: short, so that every takeover takes seconds and the module stays
within a few minutes. The keeper ticks every lease_time / 3 and stops acting at 0.8 of the
lease time after a renewal, whatever the lease time, so the default 10 s behaves the same,
every delay scaled by 10/3; the bounds below are written in lease times and ticks for that
reason. Who holds what is read from the ``leases`` table (live by the database's clock),
what a daemon believes it holds from its ``/metrics``. Waiting is bounded polling.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from support.configs import service, write_config
from support.daemon_process import executions
from support.fake_service import FakeService
from support.ha import (
    GATED_DEPLOY,
    LEASE_TIME,
    Daemon,
    await_rows,
    await_split,
    checkout_rules,
    live_lease,
    log_lines,
    metric,
    owner,
    rows,
    start_all,
    stop_all,
    store_ready,
    store_section,
)
from support.postgres import Database, PostgresServer
from support.prometheus import PrometheusFactory, ScrapeTarget, poll
from support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.faults]

SERVICES = ("cart", "catalog", "checkout", "payments", "search", "shipping")
MEMBERS = ("daemon-a", "daemon-b", "daemon-c")
TICK = LEASE_TIME / 3
"""The lease keeper's round (runtime/leases.py: a tick every lease_time / 3)."""
QUIET = '[[check]]\nname = "up"\ntype = "query"\nquery = "vector(0)"\nabove = 1\ninterval = "2s"\n'
"""A check that never fires: its service only needs holding."""
FINISHED = ("succeeded", "failed", "interrupted", "rejected", "expired", "dry_run")


@pytest.fixture
def started() -> Iterator[list[Daemon]]:
    """The daemons a test started: each stopped at the end (thawed first: a frozen process
    handles SIGTERM only once it runs again)."""
    daemons: list[Daemon] = []
    yield daemons
    for daemon in daemons:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.thaw()
    stop_all(daemons)


@pytest.fixture
def proxy(postgres_server: PostgresServer) -> Iterator[TcpProxy]:
    """A TCP proxy to the session's PostgreSQL. Asked for before ``started``, so that the
    daemons are stopped (and give their leases back) before it closes."""
    with TcpProxy(("127.0.0.1", postgres_server.port)) as forwarder:
        yield forwarder


def chaos_rules(tmp_path: Path, fake_service: FakeService, log: Path) -> dict[str, str]:
    """``checkout`` on the fake service, rolled back by the deploy command that logs each
    run (its parent pid and ROLLBACKD_* environment) in ``log``; the gate is open, so a
    run goes straight through. The other five are quiet."""
    script, gate = tmp_path / "deploy.py", tmp_path / "gate"
    script.write_text(GATED_DEPLOY)
    gate.touch()
    rules = {name: service(name, QUIET) for name in SERVICES}
    rules["checkout"] = checkout_rules(f"{fake_service.url}/control", script, log, gate)
    return rules


def start(
    tmp_path: Path,
    members: dict[str, Database],
    prometheus_url: str,
    rules: dict[str, str],
    started: list[Daemon],
) -> list[Daemon]:
    """A daemon per member, on the database given for it, started together."""
    daemons = []
    for member, database in members.items():
        directory = tmp_path / member
        directory.mkdir()
        extra = store_section(database, member)
        daemons.append(Daemon(write_config(directory, prometheus_url, rules, extra=extra), member))
    started.extend(daemons)
    start_all(daemons)
    return daemons


def await_baked(database: Database, alive: list[Daemon]) -> None:
    """checkout's 1.0.0 baked: the last known good a rollback goes back to."""
    await_rows(
        database,
        alive,
        "SELECT version FROM versions WHERE service = 'checkout' AND version = '1.0.0'"
        " AND baked_at IS NOT NULL",
    )


def rolled_back_by(
    database: Database, fake_service: FakeService, log: Path, holder: Daemon, alive: list[Daemon]
) -> int:
    """Release the bad checkout 2.0.0 (now, unless already released): its rollback
    succeeds, its executor run once, started by ``holder`` under its lease's epoch. The
    rollback's id."""
    lease = live_lease(database, "checkout")
    assert lease is not None and lease[0] == holder.member, lease
    if fake_service.version != "2.0.0":
        fake_service.update(version="2.0.0", error_ratio=0.5)
    [(rollback_id, state, outcome)] = await_rows(
        database,
        alive,
        "SELECT id, state, outcome FROM rollbacks WHERE state = ANY(%s)",
        list(FINISHED),
        timeout=60,
    )
    assert state == "succeeded", outcome
    assert outcome == "version reads 1.0.0; checks held for 2s"
    [run] = executions(log)
    assert run["ppid"] == holder.pid, "the holder started the executor"
    assert run["version"] == "1.0.0"
    assert run["env"]["ROLLBACKD_FENCING_TOKEN"] == str(lease[1]), "under its epoch"
    assert fake_service.version == "1.0.0"
    assert rows(database, "SELECT count(*) FROM rollbacks") == [(1,)]
    return int(rollback_id)


def rollback_record(database: Database, rollback_id: int) -> list[tuple[Any, ...]]:
    """Everything stored of the rollback: its row, its steps, its triggers, its events."""
    found = rows(database, "SELECT * FROM rollbacks WHERE id = %s", rollback_id)
    for table in ("rollback_steps", "rollback_triggers", "events"):
        found += rows(
            database,
            f"SELECT * FROM {table} WHERE rollback_id = %s ORDER BY id",
            rollback_id,
        )
    return found


def others_than(daemon: Daemon, daemons: list[Daemon]) -> list[Daemon]:
    return [d for d in daemons if d is not daemon]


def by_member(daemons: list[Daemon]) -> dict[str, Daemon]:
    return {d.member: d for d in daemons}


# -- 1. the holder frozen past its lease during a bad release ------------------------------


@pytest.mark.prometheus
def test_a_frozen_holder_is_taken_over_and_once_thawed_does_nothing_stale(
    tmp_path: Path,
    postgres_database: Database,
    prometheus_factory: PrometheusFactory,
    fake_service: FakeService,
    started: list[Daemon],
) -> None:
    prometheus = prometheus_factory(targets=[ScrapeTarget(fake_service.address)])
    log = tmp_path / "runs.jsonl"
    rules = chaos_rules(tmp_path, fake_service, log)
    everyone = dict.fromkeys(MEMBERS, postgres_database)
    daemons = start(tmp_path, everyone, prometheus.url, rules, started)
    await_split(postgres_database, SERVICES, daemons, timeout=30)
    await_baked(postgres_database, daemons)
    frozen = by_member(daemons)[owner("checkout", SERVICES, MEMBERS)]
    awake = others_than(frozen, daemons)
    lease = live_lease(postgres_database, "checkout")
    assert lease is not None and lease[0] == frozen.member

    frozen.freeze()
    fake_service.update(version="2.0.0", error_ratio=0.5)  # the bad release, while it sleeps
    await_split(postgres_database, SERVICES, awake, timeout=LEASE_TIME * 5)
    taker = by_member(awake)[owner("checkout", SERVICES, [d.member for d in awake])]
    taken = live_lease(postgres_database, "checkout")
    assert taken is not None and taken[1] > lease[1], "a new tenure, with a higher epoch"
    rollback_id = rolled_back_by(postgres_database, fake_service, log, taker, awake)
    record = rollback_record(postgres_database, rollback_id)

    frozen.thaw()
    # It wakes trusting leases the database gave away: its own clock says they lapsed (it
    # acts on none), and its first renewal finds them gone.
    poll(
        lambda: any(
            "lease lost" in line and "service=checkout" in line for line in log_lines(frozen)
        ),
        timeout=LEASE_TIME * 5,
        what="the thawed daemon to drop the lease of checkout it lost",
    )
    # Alive again, it is given its share back, checkout among it, under a newer epoch.
    await_split(postgres_database, SERVICES, daemons, timeout=LEASE_TIME * 10)
    back = live_lease(postgres_database, "checkout")
    assert back is not None and back[0] == frozen.member and back[1] > taken[1]
    evaluated = metric(frozen, "rollbackd_check_evaluations_total", service="checkout")
    poll(
        lambda: (
            metric(frozen, "rollbackd_check_evaluations_total", service="checkout") >= evaluated + 3
        ),
        timeout=30,
        what="the thawed daemon to judge checkout 3 more times",
    )
    # Nothing stale: no second run, no new rollback, not a byte of the one rolled back.
    for daemon in daemons:
        daemon.assert_alive()
    assert [run["ppid"] for run in executions(log)] == [taker.pid]
    assert rows(postgres_database, "SELECT count(*) FROM rollbacks") == [(1,)]
    assert rollback_record(postgres_database, rollback_id) == record


# -- 2. one daemon cut off from PostgreSQL --------------------------------------------------


@pytest.mark.prometheus
def test_a_daemon_cut_off_from_postgresql_stops_acting_the_others_carry_on_and_it_rejoins(
    tmp_path: Path,
    postgres_server: PostgresServer,
    postgres_database: Database,
    prometheus_factory: PrometheusFactory,
    fake_service: FakeService,
    proxy: TcpProxy,
    started: list[Daemon],
) -> None:
    prometheus = prometheus_factory(targets=[ScrapeTarget(fake_service.address)])
    log = tmp_path / "runs.jsonl"
    rules = chaos_rules(tmp_path, fake_service, log)
    cut_member = owner("checkout", SERVICES, MEMBERS)
    direct = f"127.0.0.1:{postgres_server.port}/"
    assert direct in postgres_database.url
    proxied = replace(
        postgres_database, url=postgres_database.url.replace(direct, f"127.0.0.1:{proxy.port}/")
    )
    databases = {m: proxied if m == cut_member else postgres_database for m in MEMBERS}
    daemons = start(tmp_path, databases, prometheus.url, rules, started)
    await_split(postgres_database, SERVICES, daemons, timeout=30)
    await_baked(postgres_database, daemons)
    cut = by_member(daemons)[cut_member]
    connected = others_than(cut, daemons)

    proxy.cut()
    # Its leases lapse at most a lease time after the cut (its last renewal came before
    # it); the others take them at their next tick. The rest is slack for a busy host.
    await_split(postgres_database, SERVICES, connected, timeout=LEASE_TIME + 3 * TICK)

    def cut_off() -> bool:
        return not store_ready(cut) and metric(cut, "rollbackd_leases_held") == 0

    poll(cut_off, timeout=LEASE_TIME * 3, what="the cut daemon to say so and hold nothing")
    taker = by_member(connected)[owner("checkout", SERVICES, [d.member for d in connected])]
    rolled_back_by(postgres_database, fake_service, log, taker, connected)
    # Meanwhile the cut daemon acted on nothing: it held no lease and ran nothing (it
    # may go on evaluating the checks it had, Tenancy.evaluates, to have their states
    # current when the store is back; acting on them needs a lease).
    cut.assert_alive()
    assert metric(cut, "rollbackd_leases_held") == 0
    assert not store_ready(cut)

    proxy.restore()
    poll(lambda: store_ready(cut), timeout=LEASE_TIME * 5, what="the cut daemon to be ready")
    # It rejoins: the split among the three again, each acting on its share only (the
    # gauges add up to the services, one row each in the table).
    await_split(postgres_database, SERVICES, daemons, timeout=LEASE_TIME * 10)
    assert sum(metric(d, "rollbackd_leases_held") for d in daemons) == len(SERVICES)
    # And it acts again: it judges checkout, its own once more.
    judged = metric(cut, "rollbackd_check_evaluations_total", service="checkout")
    poll(
        lambda: metric(cut, "rollbackd_check_evaluations_total", service="checkout") >= judged + 2,
        timeout=30,
        what="the rejoined daemon to judge checkout again",
    )
    assert [run["ppid"] for run in executions(log)] == [taker.pid]
    assert rows(postgres_database, "SELECT count(*) FROM rollbacks") == [(1,)]


# -- 3. PostgreSQL restarted under all three --------------------------------------------------


@pytest.mark.prometheus
def test_postgresql_restarted_under_three_daemons_they_pause_come_back_and_roll_back_once(
    tmp_path: Path,
    postgres_server: PostgresServer,
    postgres_database: Database,
    prometheus_factory: PrometheusFactory,
    fake_service: FakeService,
    started: list[Daemon],
) -> None:
    prometheus = prometheus_factory(targets=[ScrapeTarget(fake_service.address)])
    log = tmp_path / "runs.jsonl"
    rules = chaos_rules(tmp_path, fake_service, log)
    database = postgres_database
    daemons = start(tmp_path, dict.fromkeys(MEMBERS, database), prometheus.url, rules, started)
    await_split(database, SERVICES, daemons, timeout=30)
    await_baked(database, daemons)

    # The session's server, restarted on its port with its data (an initdb of a server of
    # this test's own costs more than the rest of it); started again whatever happens.
    postgres_server.stop()
    try:

        def all_paused() -> bool:
            return all(
                not store_ready(d) and metric(d, "rollbackd_leases_held") == 0 for d in daemons
            )

        poll(all_paused, timeout=LEASE_TIME * 5, what="every daemon to stop acting")
    finally:
        postgres_server.start()
    poll(
        lambda: all(store_ready(d) for d in daemons),
        timeout=LEASE_TIME * 10,
        what="every daemon to be ready again",
    )
    await_split(database, SERVICES, daemons, timeout=LEASE_TIME * 10)
    assert sum(metric(d, "rollbackd_leases_held") for d in daemons) == len(SERVICES)
    holder = by_member(daemons)[owner("checkout", SERVICES, MEMBERS)]
    rolled_back_by(database, fake_service, log, holder, daemons)


# -- 4. joining and leaving ----------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One look at who holds what: the table, then each daemon's claim, then the table."""

    at: float
    """The database's clock at the first read of the table."""
    before: dict[str, str]
    claims: dict[str, float]
    """member -> its ``rollbackd_leases_held``: the leases it acts on."""
    after_at: float
    after: dict[str, str]


@dataclass
class LeaseSampler:
    """Samples the ``leases`` table and each watched daemon's claim every 0.2 s, on a
    thread of its own (the rate of looking, not a wait for anything)."""

    database: Database
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _watched: dict[str, Daemon] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def watch(self, daemon: Daemon) -> None:
        with self._lock:
            self._watched[daemon.member] = daemon

    def unwatch(self, daemon: Daemon) -> None:
        """Before it is stopped or killed: a daemon going away answers no more."""
        with self._lock:
            self._watched.pop(daemon.member, None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        url, password = self.database.url, self.database.password
        with psycopg.connect(url, password=password, autocommit=True) as conn:
            while not self._stop.is_set():
                self._sample(conn)
                self._stop.wait(0.2)
            self._sample(conn)  # a last look, after the test saw the state it ends in

    def _sample(self, conn: psycopg.Connection[Any]) -> None:
        at, before = _holders(conn)
        claims = self._claims()
        after_at, after = _holders(conn)
        self.samples.append(Sample(at, before, claims, after_at, after))

    def _claims(self) -> dict[str, float]:
        with self._lock:
            watched = list(self._watched.values())
        claims: dict[str, float] = {}
        for daemon in watched:
            try:
                claims[daemon.member] = metric(daemon, "rollbackd_leases_held")
            except (httpx.HTTPError, AssertionError) as exc:
                with self._lock:
                    if daemon.member in self._watched:
                        self.errors.append(f"{daemon.member}'s /metrics: {exc!r}")
        return claims


def _holders(conn: psycopg.Connection[Any]) -> tuple[float, dict[str, str]]:
    found = conn.execute(
        "SELECT extract(epoch FROM clock_timestamp())::double precision, service, holder"
        " FROM (SELECT 1) AS one LEFT JOIN leases"
        " ON expires_at > extract(epoch FROM clock_timestamp())"
    ).fetchall()
    return float(found[0][0]), {str(s): str(h) for _, s, h in found if s is not None}


def overclaims(sample: Sample) -> list[str]:
    """Claims beyond what the database gives: more in all than there are services, or a
    daemon acting on more than it held in the table just before or just after. (A daemon
    stops acting before its lease can expire, SAFETY in runtime/leases.py, so it may hold
    a lease in the table it no longer acts on; never the other way round.)"""
    found = []
    if sum(sample.claims.values()) > len(SERVICES):
        found.append(f"at {sample.at:.1f}: {sample.claims} claim more than {len(SERVICES)}")
    for member, claimed in sample.claims.items():
        held = {s for s, h in [*sample.before.items(), *sample.after.items()] if h == member}
        if claimed > len(held):
            found.append(f"at {sample.at:.1f}: {member} claims {claimed:g}, held {sorted(held)}")
    return found


def longest_unheld(samples: list[Sample], name: str) -> float:
    """The longest stretch ``name`` was seen without a live holder in the table (both reads
    of each sample count): from the last read that saw it held to the next one that does,
    so an over-estimate by up to two intervals between reads, counting only stretches with
    at least one read seeing it unheld."""
    reads = [(s.at, s.before) for s in samples] + [(s.after_at, s.after) for s in samples]
    longest, last_held, unheld_seen = 0.0, None, False
    for at, holders in sorted(reads, key=lambda read: read[0]):
        if name not in holders:
            unheld_seen = True
            continue
        if last_held is not None and unheld_seen:
            longest = max(longest, at - last_held)
        last_held, unheld_seen = at, False
    return longest


def assert_fair(database: Database, daemons: list[Daemon]) -> None:
    """Each daemon holds services / daemons of them, rounded down or up, and acts on them."""
    split = await_split(database, SERVICES, daemons, timeout=LEASE_TIME * 10)
    counts = Counter(split.values())
    share = len(SERVICES) / len(daemons)
    assert sum(counts.values()) == len(SERVICES)
    assert all(counts[d.member] in (math.floor(share), math.ceil(share)) for d in daemons)


@pytest.mark.prometheus
def test_daemons_joining_and_leaving_share_the_services_never_twice_never_long_unheld(
    tmp_path: Path,
    postgres_database: Database,
    prometheus_factory: PrometheusFactory,
    started: list[Daemon],
) -> None:
    prometheus = prometheus_factory()
    rules = {name: service(name, QUIET) for name in SERVICES}
    sampler = LeaseSampler(postgres_database)

    def join(member: str) -> Daemon:
        [daemon] = start(tmp_path, {member: postgres_database}, prometheus.url, rules, started)
        sampler.watch(daemon)
        return daemon

    a = join("daemon-a")
    assert_fair(postgres_database, [a])  # alone, it holds all six
    sampler.start()
    try:
        b = join("daemon-b")
        assert_fair(postgres_database, [a, b])
        c = join("daemon-c")
        assert_fair(postgres_database, [a, b, c])
        sampler.unwatch(b)
        assert b.stop() == 0  # SIGTERM: it gives its leases back
        assert_fair(postgres_database, [a, c])
        sampler.unwatch(a)
        a.kill()  # SIGKILL: its leases lapse by themselves
        assert_fair(postgres_database, [c])
    finally:
        sampler.stop()

    samples = sampler.samples
    assert len(samples) > 20, "the sampler looked often enough to prove anything"
    assert sampler.errors == []
    assert [found for sample in samples for found in overclaims(sample)] == []
    # The bound: a lease lapses at most a lease time after its holder's last renewal, and
    # the others take it over at their next tick, one tick later at most; a service handed
    # over (a join, a clean stop) waits one tick only. Correctness, not speed: a service
    # unheld for longer would be a service nobody watches.
    bound = LEASE_TIME + TICK
    gaps = {name: longest_unheld(samples, name) for name in SERVICES}
    assert all(gap <= bound for gap in gaps.values()), (gaps, bound)
    assert all(name in samples[-1].before for name in SERVICES)
    c.assert_alive()
