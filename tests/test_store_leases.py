"""The store's per-service leases with fencing (rollbackd.store.interfaces.LeaseStore).

The behavioural tests run on every backend of ``test_store_contract.py`` (its ``backend``,
``open_store`` and ``store`` fixtures, so a new backend is tested here too): SQLite on a
file, PostgreSQL on a fresh database of the run's real server. An expired lease or a dead
member is made with ``ttl=0`` (expired at once), never by waiting. The PostgreSQL tests at
the end race several stores (several daemons) on one database, and check that the times
come from the database server's clock.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

import test_store_contract as contract
from rollbackd.core.model import Lease
from rollbackd.store.errors import MemberTakenError
from rollbackd.store.interfaces import StateStore
from rollbackd.store.postgres import PostgresStore
from rollbackd.store.sqlite import Store
from support.postgres import Database

# The contract suite's fixtures, so that every backend it tests is tested here too.
backend = contract.backend
open_store = contract.open_store
store = contract.store
StoreFactory = contract.StoreFactory
DEADLOCK_GUARD = contract.DEADLOCK_GUARD

TTL = 30.0
"""A lease time no test outlives: a lease taken with it is live for the whole test."""

ME = "instance-1"
"""The process id a heartbeat gives: one per process, here one for every member."""

FAR_OFF = 4_000_000_000.0
"""A daemon clock about 2096: a store that read the daemon's clock would show it."""


def test_a_free_lease_is_taken_with_epoch_1(store: StateStore) -> None:
    lease = store.acquire("checkout", "daemon-a", TTL)
    assert lease is not None
    assert (lease.service, lease.holder, lease.epoch) == ("checkout", "daemon-a", 1)
    assert lease.expires_at - lease.acquired_at == pytest.approx(TTL, abs=1e-6)
    assert store.holds("checkout", "daemon-a", 1)
    assert store.leases() == [lease]


def test_the_holder_acquiring_again_renews_with_the_same_epoch(store: StateStore) -> None:
    first = store.acquire("checkout", "daemon-a", TTL)
    again = store.acquire("checkout", "daemon-a", TTL * 2)
    assert first is not None and again is not None
    assert (again.epoch, again.acquired_at) == (first.epoch, first.acquired_at)
    assert again.expires_at > first.expires_at
    assert store.leases() == [again]


def test_another_holder_is_refused_while_the_lease_is_live(store: StateStore) -> None:
    held = store.acquire("checkout", "daemon-a", TTL)
    assert store.acquire("checkout", "daemon-b", TTL) is None
    assert not store.holds("checkout", "daemon-b", 1)
    assert not store.holds("checkout", "daemon-b", 2)
    assert store.leases() == [held]


def test_an_expired_lease_is_taken_over_and_its_old_holder_has_lost_it(
    store: StateStore,
) -> None:
    old = store.acquire("checkout", "daemon-a", 0)
    assert old is not None and old.epoch == 1
    assert not store.holds("checkout", "daemon-a", 1), "ttl 0 expires at once"

    new = store.acquire("checkout", "daemon-b", TTL)
    assert new is not None
    assert (new.holder, new.epoch) == ("daemon-b", 2)
    assert new.expires_at - new.acquired_at == pytest.approx(TTL, abs=1e-6)

    assert store.renew("daemon-a", ["checkout"], TTL) == []
    assert not store.holds("checkout", "daemon-a", 1)
    assert store.acquire("checkout", "daemon-a", TTL) is None
    assert store.holds("checkout", "daemon-b", 2)
    assert not store.holds("checkout", "daemon-b", 1), "the epoch is part of the check"


def test_the_same_holder_after_its_lease_expired_starts_a_new_tenure(store: StateStore) -> None:
    # Whatever it began under epoch 1 (before a GC pause, say) must stay fenced off.
    store.acquire("checkout", "daemon-a", 0)
    again = store.acquire("checkout", "daemon-a", TTL)
    assert again is not None and again.epoch == 2
    assert store.holds("checkout", "daemon-a", 2)
    assert not store.holds("checkout", "daemon-a", 1)


def test_renew_extends_the_holders_live_leases_only(store: StateStore) -> None:
    live = store.acquire("checkout", "daemon-a", TTL)
    store.acquire("search", "daemon-a", 0)
    store.acquire("billing", "daemon-b", TTL)
    assert live is not None

    renewed = store.renew("daemon-a", ["search", "checkout", "billing", "unknown"], TTL * 2)
    assert [lease.service for lease in renewed] == ["checkout"]
    (checkout,) = renewed
    assert (checkout.holder, checkout.epoch, checkout.acquired_at) == (
        "daemon-a",
        live.epoch,
        live.acquired_at,
    )
    assert checkout.expires_at > live.expires_at
    assert store.renew("daemon-a", [], TTL) == []
    assert store.holds("checkout", "daemon-a", 1)
    assert not store.holds("search", "daemon-a", 1)
    assert store.holds("billing", "daemon-b", 1)


def test_renew_returns_every_renewed_lease_sorted_by_service(store: StateStore) -> None:
    for service in ("search", "billing", "checkout"):
        store.acquire(service, "daemon-a", TTL)
    renewed = store.renew("daemon-a", ["search", "checkout", "billing"], TTL)
    assert [lease.service for lease in renewed] == ["billing", "checkout", "search"]


def test_release_lets_another_take_it_at_once(store: StateStore) -> None:
    store.acquire("checkout", "daemon-a", TTL)
    assert not store.release("checkout", "daemon-b"), "not b's to give up"
    assert store.holds("checkout", "daemon-a", 1)

    assert store.release("checkout", "daemon-a")
    assert not store.holds("checkout", "daemon-a", 1)
    assert not store.release("checkout", "daemon-a"), "no longer held"
    assert store.renew("daemon-a", ["checkout"], TTL) == []

    taken = store.acquire("checkout", "daemon-b", TTL)
    assert taken is not None and (taken.holder, taken.epoch) == ("daemon-b", 2)
    assert not store.release("unknown", "daemon-a")


def test_epochs_never_go_back_even_after_release_or_a_restart(open_store: StoreFactory) -> None:
    first = open_store()
    epochs = []
    for holder in ("daemon-a", "daemon-b", "daemon-a", "daemon-a"):
        lease = first.acquire("checkout", holder, TTL)
        assert lease is not None
        epochs.append(lease.epoch)
        assert first.release("checkout", holder)
    assert epochs == [1, 2, 3, 4]
    first.close()

    second = open_store()
    (kept,) = second.leases()
    assert (kept.holder, kept.epoch) == ("daemon-a", 4)
    lease = second.acquire("checkout", "daemon-c", TTL)
    assert lease is not None and lease.epoch == 5


def test_services_are_leased_apart(store: StateStore) -> None:
    a = store.acquire("checkout", "daemon-a", TTL)
    b = store.acquire("search", "daemon-b", TTL)
    assert a is not None and b is not None
    assert (a.epoch, b.epoch) == (1, 1)
    assert store.holds("checkout", "daemon-a", 1)
    assert not store.holds("search", "daemon-a", 1)


def test_leases_lists_every_lease_live_or_expired_by_service(store: StateStore) -> None:
    assert store.leases() == []
    store.acquire("search", "daemon-a", TTL)
    store.acquire("checkout", "daemon-b", 0)
    store.acquire("billing", "daemon-a", TTL)
    store.release("billing", "daemon-a")
    found = store.leases()
    assert [(lease.service, lease.holder) for lease in found] == [
        ("billing", "daemon-a"),
        ("checkout", "daemon-b"),
        ("search", "daemon-a"),
    ]
    assert all(isinstance(lease, Lease) for lease in found)


def test_heartbeat_lists_the_live_members_only(store: StateStore) -> None:
    assert store.heartbeat("daemon-b", TTL, ME) == ["daemon-b"]
    assert store.heartbeat("daemon-a", TTL, ME) == ["daemon-a", "daemon-b"]
    assert store.heartbeat("daemon-c", 0, ME) == ["daemon-a", "daemon-b"], "ttl 0: dead at once"
    assert store.heartbeat("daemon-a", TTL, ME) == ["daemon-a", "daemon-b"]
    assert store.heartbeat("daemon-b", 0, ME) == ["daemon-a"]
    assert store.heartbeat("daemon-c", TTL, ME) == ["daemon-a", "daemon-c"], "back to life"


def test_live_leases_lists_the_held_ones_only(store: StateStore) -> None:
    assert store.live_leases() == []
    search = store.acquire("search", "daemon-a", TTL)
    store.acquire("checkout", "daemon-b", 0)
    billing = store.acquire("billing", "daemon-a", TTL)
    store.acquire("cart", "daemon-a", TTL)
    store.release("cart", "daemon-a")
    assert store.live_leases() == [billing, search]


# One member name, one process


def test_a_member_name_live_for_another_process_is_refused(store: StateStore) -> None:
    assert store.heartbeat("daemon-a", TTL, "first") == ["daemon-a"]
    assert store.heartbeat("daemon-b", TTL, "other") == ["daemon-a", "daemon-b"]
    with pytest.raises(MemberTakenError) as refused:
        store.heartbeat("daemon-a", TTL, "second")
    assert str(refused.value) == (
        f"another daemon is running as member 'daemon-a' on {store.location}: "
        "give each daemon its own [store] member"
    )
    taken = refused.value
    assert taken.member == "daemon-a"
    assert taken.now < taken.expires_at <= taken.now + TTL, "the first's heartbeat, live"
    with pytest.raises(MemberTakenError):
        store.heartbeat("daemon-a", 0, "second")  # not even to say it left
    # Nothing written: the first process keeps its name, and renews it as before.
    assert store.heartbeat("daemon-a", TTL, "first") == ["daemon-a", "daemon-b"]


def test_a_dead_member_name_is_free_for_another_process(store: StateStore) -> None:
    # The first process stopped (ttl 0, as a keeper's goodbye) or was killed and lapsed.
    store.heartbeat("daemon-a", TTL, "first")
    assert store.heartbeat("daemon-a", 0, "first") == []
    assert store.heartbeat("daemon-a", TTL, "second") == ["daemon-a"]
    with pytest.raises(MemberTakenError):
        store.heartbeat("daemon-a", TTL, "first")


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.heartbeat("daemon-a", -1.0, ME), id="heartbeat-negative"),
        pytest.param(lambda s: s.heartbeat("daemon-a", math.inf, ME), id="heartbeat-inf"),
        pytest.param(lambda s: s.heartbeat("", TTL, ME), id="heartbeat-no-member"),
        pytest.param(lambda s: s.heartbeat("daemon-a", TTL, ""), id="heartbeat-no-instance"),
        pytest.param(lambda s: s.acquire("checkout", "daemon-a", -0.5), id="acquire-negative"),
        pytest.param(lambda s: s.acquire("checkout", "daemon-a", math.nan), id="acquire-nan"),
        pytest.param(lambda s: s.acquire("checkout", "", TTL), id="acquire-no-holder"),
        pytest.param(lambda s: s.acquire("", "daemon-a", TTL), id="acquire-no-service"),
        pytest.param(lambda s: s.renew("daemon-a", ["checkout"], -math.inf), id="renew-inf"),
        pytest.param(lambda s: s.renew("", ["checkout"], TTL), id="renew-no-holder"),
        pytest.param(lambda s: s.release("checkout", ""), id="release-no-holder"),
    ],
)
def test_bad_arguments_are_refused(store: StateStore, call: Callable[[StateStore], Any]) -> None:
    with pytest.raises(ValueError, match=r"ttl must be|must not be empty"):
        call(store)
    assert store.leases() == []
    assert store.heartbeat("daemon-z", TTL, ME) == ["daemon-z"]


# The store's clock, not the daemon's


def _server_clock(database: Database) -> float:
    with psycopg.connect(database.url, password=database.password) as conn:
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::double precision")
        found = row.fetchone()
    assert found is not None
    return float(found[0])


def _sqlite_clock() -> float:
    with sqlite3.connect(":memory:") as conn:
        return float(conn.execute("SELECT (julianday('now') - 2440587.5) * 86400.0").fetchone()[0])


@pytest.fixture
def daemon_clock_far_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's clock decades off: a store that read it would be found out."""
    monkeypatch.setattr(time, "time", lambda: FAR_OFF)
    monkeypatch.setattr(time, "time_ns", lambda: int(FAR_OFF * 1e9))


def _assert_times_from(clock: Callable[[], float], store: StateStore) -> None:
    before = clock()
    lease = store.acquire("checkout", "daemon-a", TTL)
    after = clock()
    assert lease is not None
    assert before <= lease.acquired_at <= after
    assert lease.expires_at - lease.acquired_at == pytest.approx(TTL, abs=1e-6)
    assert abs(lease.acquired_at - FAR_OFF) > 1e6
    assert store.holds("checkout", "daemon-a", 1), "judged live by the store's clock"


@pytest.mark.usefixtures("daemon_clock_far_off")
def test_postgres_lease_times_come_from_the_server_clock(postgres_database: Database) -> None:
    with _postgres_stores(postgres_database, 1) as (store,):
        _assert_times_from(lambda: _server_clock(postgres_database), store)


@pytest.mark.usefixtures("daemon_clock_far_off")
def test_sqlite_lease_times_come_from_sqlites_clock(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        _assert_times_from(_sqlite_clock, store)
    finally:
        store.close()


# Several daemons on one PostgreSQL


@contextmanager
def _postgres_stores(database: Database, count: int) -> Iterator[list[PostgresStore]]:
    """``count`` PostgresStores on one database, as ``count`` daemons: each has its own
    connections, so their writes race in the server, not behind one process's lock."""
    stores: list[PostgresStore] = []
    try:
        for _ in range(count):
            stores.append(PostgresStore(database.url, password=database.password))
        yield stores
    finally:
        for store in stores:
            store.close()


def _race(stores: list[PostgresStore], acquire: Callable[[PostgresStore, int], Any]) -> list[Any]:
    """Runs ``acquire(store, n)`` on every store at once; each call's result, in order."""
    start = threading.Barrier(len(stores))

    def work(n: int) -> Any:
        start.wait(DEADLOCK_GUARD)
        return acquire(stores[n], n)

    with ThreadPoolExecutor(len(stores)) as pool:
        futures = [pool.submit(work, n) for n in range(len(stores))]
        return [future.result(DEADLOCK_GUARD) for future in futures]


DAEMONS = 8


def test_postgres_racing_daemons_never_both_win_a_free_lease(postgres_database: Database) -> None:
    with _postgres_stores(postgres_database, DAEMONS) as stores:
        for round_ in range(5):
            service = f"svc-{round_}"
            won = _race(stores, lambda store, n, s=service: store.acquire(s, f"daemon-{n}", TTL))
            winners = [lease for lease in won if lease is not None]
            assert len(winners) == 1, won
            (winner,) = winners
            assert winner.epoch == 1
            for store in stores:
                assert store.holds(service, winner.holder, 1)


def test_postgres_racing_daemons_never_both_take_over_an_expired_lease(
    postgres_database: Database,
) -> None:
    with _postgres_stores(postgres_database, DAEMONS) as stores:
        for round_ in range(5):
            service = f"svc-{round_}"
            stores[0].acquire(service, "daemon-gone", 0)
            won = _race(stores, lambda store, n, s=service: store.acquire(s, f"daemon-{n}", TTL))
            winners = [lease for lease in won if lease is not None]
            assert len(winners) == 1, won
            assert winners[0].epoch == 2
            assert stores[-1].leases()[-1] == winners[0]


def test_postgres_racing_processes_for_one_member_name_never_both_win(
    postgres_database: Database,
) -> None:
    def heartbeat(store: PostgresStore, n: int) -> bool:
        try:
            store.heartbeat("daemon-a", TTL, f"instance-{n}")
        except MemberTakenError:
            return False
        return True

    with _postgres_stores(postgres_database, DAEMONS) as stores:
        won = _race(stores, heartbeat)
        assert won.count(True) == 1, won
        winner = won.index(True)
        for n, store in enumerate(stores):
            if n != winner:
                with pytest.raises(MemberTakenError):
                    store.heartbeat("daemon-a", TTL, f"instance-{n}")
        assert stores[winner].heartbeat("daemon-a", TTL, f"instance-{winner}") == ["daemon-a"]


def test_postgres_daemons_see_each_others_leases_and_members(postgres_database: Database) -> None:
    with _postgres_stores(postgres_database, 2) as (first, second):
        assert first.heartbeat("daemon-a", TTL, ME) == ["daemon-a"]
        assert second.heartbeat("daemon-b", TTL, ME) == ["daemon-a", "daemon-b"]
        held = first.acquire("checkout", "daemon-a", TTL)
        assert held is not None
        assert second.acquire("checkout", "daemon-b", TTL) is None
        assert second.holds("checkout", "daemon-a", 1)
        assert first.release("checkout", "daemon-a")
        taken = second.acquire("checkout", "daemon-b", TTL)
        assert taken is not None and taken.epoch == 2
        assert not first.holds("checkout", "daemon-a", 1)


def test_acquire_many_takes_the_free_and_expired_in_one_call_and_skips_the_live(
    store: StateStore,
) -> None:
    assert store.acquire("cart", "daemon-b", TTL) is not None  # live for another
    expired = store.acquire("search", "daemon-b", 0.0)  # expired at once
    own = store.acquire("payments", "daemon-a", TTL)  # this holder's own, live
    assert expired is not None and own is not None
    won = store.acquire_many(["search", "checkout", "cart", "payments"], "daemon-a", TTL)
    assert [held.service for held in won] == ["checkout", "payments", "search"]
    by_service = {held.service: held for held in won}
    assert by_service["checkout"].epoch == 1
    assert by_service["search"].epoch == expired.epoch + 1  # a new tenure
    assert (by_service["payments"].epoch, by_service["payments"].acquired_at) == (
        own.epoch,
        own.acquired_at,
    )  # a renewal
    assert {h.holder for h in won} == {"daemon-a"}
    assert store.holds("cart", "daemon-b", 1)
    assert store.acquire_many([], "daemon-a", TTL) == []
    with pytest.raises(ValueError):
        store.acquire_many(["ok", ""], "daemon-a", TTL)


def test_racing_acquire_many_calls_split_the_services_without_deadlock(
    postgres_database: Database,
) -> None:
    names = [f"svc-{n:04d}" for n in range(300)]
    stores = [
        PostgresStore(postgres_database.url, password=postgres_database.password) for _ in range(3)
    ]
    try:
        barrier = threading.Barrier(len(stores))

        def take(index: int) -> list[str]:
            barrier.wait()
            # Each asks for all, in its own order: rows are locked in one order anyway.
            order = names[index::3] + names
            return [held.service for held in stores[index].acquire_many(order, f"d{index}", TTL)]

        with ThreadPoolExecutor(len(stores)) as pool:
            won = [s for got in pool.map(take, range(len(stores))) for s in got]
        assert sorted(won) == names  # every one taken, by exactly one
    finally:
        for one in stores:
            one.close()
