"""The lease keeper (rollbackd.runtime.leases): several daemons' keepers sharing services
through the leases of one real PostgreSQL database.

Each keeper here is driven by calling ``tick()`` (a keeper that is not called has stopped
ticking, as a paused or dead daemon has); expiry is real, by the database's clock, so the
tests that wait for it use a short lease time and poll for the outcome with a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rollbackd.config.loader import load, validate
from rollbackd.core.model import Fence, Lease
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.leases import LeaseKeeper, assign, default_member
from rollbackd.runtime.metrics import Metrics
from rollbackd.runtime.runner import Runner
from rollbackd.runtime.tenancy import NotHolder
from rollbackd.store.errors import MemberTakenError, StoreError
from rollbackd.store.postgres import PostgresStore
from rollbackd.store.sqlite import Store
from support.configs import service, write_config
from support.postgres import Database
from support.prometheus import PrometheusFactory

SERVICES = [f"svc-{i:02d}" for i in range(12)]
LONG = 60.0
"""A lease time no test outlives: only a release or a stop hands such a lease over."""
SHORT = 1.0
"""A lease time the tests that wait for expiry outlive."""


@pytest.fixture
def stores(postgres_database: Database) -> Iterator[Callable[[], PostgresStore]]:
    """Open stores on the test's database (one per daemon); closed at teardown."""
    opened: list[PostgresStore] = []

    def make() -> PostgresStore:
        store = PostgresStore(postgres_database.url, password=postgres_database.password)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


class Keepers:
    """Keepers by member name, each on its own store (its own daemon), and what they hold."""

    def __init__(self, stores: Callable[[], PostgresStore], lease_time: float) -> None:
        self._stores = stores
        self.lease_time = lease_time
        self.by_name: dict[str, LeaseKeeper] = {}
        self.metrics: dict[str, Metrics] = {}

    def add(self, name: str, store: Any = None) -> LeaseKeeper:
        metrics = Metrics()
        keeper = LeaseKeeper(
            store if store is not None else self._stores(),
            name,
            self.lease_time,
            lambda: SERVICES,
            metrics=metrics,
        )
        self.by_name[name], self.metrics[name] = keeper, metrics
        return keeper

    def held(self, names: Sequence[str] | None = None) -> dict[str, set[str]]:
        chosen = names if names is not None else list(self.by_name)
        return {name: set(self.by_name[name].held()) for name in chosen}

    async def tick(self, names: Sequence[str] | None = None) -> None:
        for name in names if names is not None else list(self.by_name):
            await self.by_name[name].tick()

    def close(self) -> None:
        for keeper in self.by_name.values():
            keeper.close()


def shared_fairly(held: dict[str, set[str]]) -> bool:
    """Every service held, none twice, each keeper within ±2 of its share."""
    share = len(SERVICES) / len(held)
    every = set().union(*held.values())
    once = sum(len(services) for services in held.values()) == len(every)
    fair = all(abs(len(services) - share) <= 2 for services in held.values())
    return every == set(SERVICES) and once and fair


async def settle(
    keepers: Keepers, names: Sequence[str] | None = None, *, timeout: float = 20.0
) -> dict[str, set[str]]:
    """Tick ``names`` (default all) in rounds until they share every service fairly: the
    first tick of a keeper that starts alone takes everything, the others' ticks hand
    their shares over; with expiry it takes the lease time. Bounded by ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        await keepers.tick(names)
        held = keepers.held(names)
        if shared_fairly(held):
            return held
        if loop.time() > deadline:
            raise AssertionError(f"not shared fairly within {timeout}s: {held}")
        await asyncio.sleep(0.05)  # the poll's pace, not a synchronisation


def holders_in_database(store: PostgresStore) -> dict[str, str]:
    now = max((lease.acquired_at for lease in store.leases()), default=0.0)
    return {lease.service: lease.holder for lease in store.leases() if lease.expires_at > now}


def takeovers(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("rollbackd_lease_takeovers_total")
    return 0.0 if value is None else value


# --- [store] lease_time and member -------------------------------------------------------


def store_config(directory: Path, lines: str) -> Path:
    check = '[[check]]\nname = "up"\ntype = "query"\nquery = "vector(0)"\nabove = 1\n'
    rules = {"api": service("api", check)}
    extra = f'\n[store]\nurl = "postgresql://rollbackd@db/rollbackd"\n{lines}\n'
    return write_config(directory, "http://127.0.0.1:9", rules, extra=extra)


def test_lease_time_defaults_to_10s_and_member_to_none(tmp_path: Path) -> None:
    loaded, problems = validate(store_config(tmp_path, ""))
    assert problems == [] and loaded is not None and loaded.config.store is not None
    assert loaded.config.store.lease_time == timedelta(seconds=10)
    assert loaded.config.store.member is None
    loaded, problems = validate(store_config(tmp_path, 'lease_time = "3s"\nmember = "db-1"'))
    assert problems == [] and loaded is not None and loaded.config.store is not None
    assert (loaded.config.store.lease_time, loaded.config.store.member) == (
        timedelta(seconds=3),
        "db-1",
    )


def test_a_lease_time_under_3s_is_refused(tmp_path: Path) -> None:
    loaded, problems = validate(store_config(tmp_path, 'lease_time = "2500ms"'))
    assert loaded is None
    assert {str(p.field): p.message for p in problems} == {
        "store.lease_time": "must be at least 3s"
    }


# --- the split, pure ----------------------------------------------------------------------


def test_the_split_is_deterministic_fair_and_moves_few_services_on_a_join() -> None:
    services = [f"service-{i}" for i in range(600)]
    three = assign(services, ["c", "a", "b"])
    assert three == assign(list(reversed(services)), ["a", "b", "c"]), "order does not matter"
    assert sorted(len(mine) for mine in three.values()) == [200, 200, 200]
    four = assign(services, ["a", "b", "c", "d"])
    assert sorted(len(mine) for mine in four.values()) == [150, 150, 150, 150]
    before = {s: member for member, mine in three.items() for s in mine}
    after = {s: member for member, mine in four.items() for s in mine}
    moved = sum(before[s] != after[s] for s in services)
    assert moved <= 150 * 1.25, "about a quarter moves to the new member, little else"
    assert assign(services, []) == {}


def test_a_member_id_names_the_host_and_process_and_differs_per_keeper() -> None:
    first, second = default_member(), default_member()
    assert first != second
    assert first.split("-")[-2].isdigit()


# --- sharing ------------------------------------------------------------------------------


@pytest.mark.parametrize("daemons", [2, 3])
async def test_keepers_share_the_services_fairly_and_none_is_held_twice(
    stores: Callable[[], PostgresStore], daemons: int
) -> None:
    keepers = Keepers(stores, LONG)
    try:
        for i in range(daemons):
            keepers.add(f"daemon-{i}")
        held = await settle(keepers)
        database = holders_in_database(stores())
        assert database == {s: name for name, mine in held.items() for s in mine}
        for name, mine in held.items():
            keeper = keepers.by_name[name]
            assert all(keeper.may_act(s) for s in mine)
            assert not any(keeper.may_act(s) for s in set(SERVICES) - mine)
            for service in mine:
                fence = keeper.fence(service)
                assert fence is not None and fence.holder == name
            other = next(iter(set(SERVICES) - mine))
            with pytest.raises(NotHolder):
                keeper.fence(other)
            gauge = keepers.metrics[name].registry.get_sample_value("rollbackd_leases_held")
            assert gauge == len(mine)
    finally:
        keepers.close()


async def test_a_keeper_that_stops_ticking_loses_its_services_to_the_others(
    stores: Callable[[], PostgresStore],
) -> None:
    keepers = Keepers(stores, SHORT)
    try:
        for name in ("a", "b", "c"):
            keepers.add(name)
        before = await settle(keepers)
        # "c" is no longer called: its heartbeat and its leases lapse by the database's
        # clock, and the others take its share.
        after = await settle(keepers, ["a", "b"])
        assert before["c"] <= after["a"] | after["b"]
        assert keepers.held(["c"]) == {"c": set()}, "c stopped acting by its own clock"
        assert all(not keepers.by_name["c"].may_act(s) for s in SERVICES)
        assert takeovers(keepers.metrics["a"]) + takeovers(keepers.metrics["b"]) >= len(before["c"])
    finally:
        keepers.close()


async def test_a_keeper_that_joins_is_handed_its_share(
    stores: Callable[[], PostgresStore],
) -> None:
    keepers = Keepers(stores, LONG)
    try:
        keepers.add("a")
        keepers.add("b")
        before = await settle(keepers)
        keepers.add("c")
        # Hand-back, not expiry: with a lease time no test outlives, only the holders'
        # releases can give the newcomer its share.
        after = await settle(keepers)
        assert len(after["c"]) == 4
        was = {s: name for name, mine in before.items() for s in mine}
        now = {s: name for name, mine in after.items() for s in mine}
        moved = sum(was.get(s) != now[s] for s in SERVICES)
        # c's 4, and at most a couple more from bounding each member's load.
        assert moved <= 6, (before, after)
        assert takeovers(keepers.metrics["c"]) == 4, "taken from another tenure: epoch 2"
    finally:
        keepers.close()


async def test_releasing_on_stop_hands_the_services_over_at_once(
    stores: Callable[[], PostgresStore],
) -> None:
    keepers = Keepers(stores, LONG)
    try:
        a = keepers.add("a")
        await settle(keepers)
        assert keepers.held() == {"a": set(SERVICES)}
        assert takeovers(keepers.metrics["a"]) == 0, "first tenures: epoch 1"
        keepers.add("b")
        await settle(keepers)
        stop = asyncio.Event()
        stop.set()
        await a.run(stop)  # a tick, then the stop: every lease given back, a gone
        assert a.held() == {}
        assert keepers.metrics["a"].registry.get_sample_value("rollbackd_leases_held") == 0
        # Well within the lease time: b takes everything because a gave it back.
        held = await settle(keepers, ["b"])
        assert held == {"b": set(SERVICES)}
        assert takeovers(keepers.metrics["b"]) == len(SERVICES)
        epochs = {lease.service: lease.epoch for lease in stores().leases()}
        assert min(epochs.values()) >= 2
    finally:
        keepers.close()


# --- a keeper that cannot renew -----------------------------------------------------------


class Breakable:
    """A real store whose lease calls fail while ``broken``: the database unreachable, as
    far as this one daemon can tell."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.broken = False

    def _check(self) -> None:
        if self.broken:
            raise StoreError("the database is unreachable (test)")

    def heartbeat(self, member: str, ttl: float, instance: str) -> list[str]:
        self._check()
        return self.store.heartbeat(member, ttl, instance)

    def acquire(self, service: str, holder: str, ttl: float) -> Lease | None:
        self._check()
        return self.store.acquire(service, holder, ttl)

    def acquire_many(self, services: Sequence[str], holder: str, ttl: float) -> list[Lease]:
        self._check()
        return self.store.acquire_many(services, holder, ttl)

    def renew(self, holder: str, services: Sequence[str], ttl: float) -> list[Lease]:
        self._check()
        return self.store.renew(holder, services, ttl)

    def release(self, service: str, holder: str) -> bool:
        self._check()
        return self.store.release(service, holder)


async def test_a_keeper_that_cannot_renew_stops_acting_before_its_leases_expire(
    stores: Callable[[], PostgresStore],
) -> None:
    lease_time = 3.0
    keepers = Keepers(stores, lease_time)
    breakable = Breakable(stores())
    try:
        keeper = keepers.add("a", breakable)
        await settle(keepers)
        epochs = {s: lease.epoch for s, lease in keeper.held().items()}
        observer = stores()  # opened now: the check below must not wait for a connection
        breakable.broken = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + lease_time * 2
        while any(keeper.may_act(s) for s in SERVICES):
            await keeper.tick()  # fails: the deadlines kept lapse by themselves
            assert loop.time() < deadline, "still acting long after the lease time"
            await asyncio.sleep(0.01)
        # By the database's clock the leases are still live: the keeper stopped first.
        assert all(observer.holds(s, "a", epoch) for s, epoch in epochs.items())
        with pytest.raises(NotHolder):
            keeper.fence(SERVICES[0])
        # Back: renewed (or taken again) at the next tick, acting again.
        breakable.broken = False
        await settle(keepers)
        assert all(keeper.may_act(s) for s in SERVICES)
    finally:
        keepers.close()


# --- one member name, one daemon ---------------------------------------------------------

TAKEN = 3.0
"""The lease time of the member-name tests: a starting keeper waits out up to this."""


def keeper_named(store: PostgresStore, name: str) -> LeaseKeeper:
    """A keeper of its own process (its own random instance) on ``store``."""
    return LeaseKeeper(store, name, TAKEN, lambda: SERVICES)


def epochs_in(store: PostgresStore) -> dict[str, tuple[str, int]]:
    return {lease.service: (lease.holder, lease.epoch) for lease in store.live_leases()}


async def test_a_second_keeper_with_a_live_member_name_refuses_to_start(
    stores: Callable[[], PostgresStore],
) -> None:
    first, second = keeper_named(stores(), "daemon-a"), keeper_named(stores(), "daemon-a")
    assert first.instance != second.instance
    stop = asyncio.Event()
    try:
        await first.start()
        assert set(first.held()) == set(SERVICES)
        before = epochs_in(stores())
        running = asyncio.ensure_future(first.run(stop))  # renewing, as a live daemon does
        with pytest.raises(MemberTakenError, match="another daemon is running as member"):
            await second.start()  # waits the first's heartbeat out once: it is renewed
        assert second.held() == {}
        assert not any(second.may_act(s) for s in SERVICES)
        assert set(first.held()) == set(SERVICES), "the first goes on holding everything"
        assert epochs_in(stores()) == before, "nothing taken, released or re-tenured"
        await second.release_all()  # a refused daemon's stop gives nothing back
        assert epochs_in(stores()) == before
        stop.set()
        await running
    finally:
        first.close()
        second.close()


async def test_a_killed_keepers_member_name_is_waited_out_at_start(
    stores: Callable[[], PostgresStore],
) -> None:
    dead, restarted = keeper_named(stores(), "daemon-a"), keeper_named(stores(), "daemon-a")
    try:
        await dead.start()  # then never again: killed, its heartbeat and leases lapse
        await restarted.start()
        assert set(restarted.held()) == set(SERVICES)
        assert all(epoch == 2 for _, epoch in epochs_in(stores()).values()), "new tenures"
    finally:
        dead.close()
        restarted.close()


async def test_a_lease_left_live_under_its_member_name_is_taken_as_a_new_tenure(
    stores: Callable[[], PostgresStore],
) -> None:
    # A previous run of "daemon-a", killed: its lease lives on a while. What that run began
    # under its epoch must stay fenced off from the new run.
    store = stores()
    previous = store.acquire(SERVICES[0], "daemon-a", LONG)
    assert previous is not None
    keeper = keeper_named(stores(), "daemon-a")
    try:
        await keeper.start()
        held = keeper.held()[SERVICES[0]]
        assert held.epoch == previous.epoch + 1
        assert not store.holds(SERVICES[0], "daemon-a", previous.epoch)
        assert store.holds(SERVICES[0], "daemon-a", held.epoch)
    finally:
        keeper.close()


async def test_a_keeper_whose_member_name_was_taken_meanwhile_stops_holding_everything(
    stores: Callable[[], PostgresStore],
) -> None:
    # The first is cut off (does not tick) past its lease time; a second daemon given the
    # same name starts meanwhile; then the first comes back.
    first, second = keeper_named(stores(), "daemon-a"), keeper_named(stores(), "daemon-a")
    try:
        await first.start()
        await second.start()  # the first's heartbeat lapses while it waits
        assert set(second.held()) == set(SERVICES)
        taken = epochs_in(stores())
        await first.tick()
        assert first.held() == {}
        assert not any(first.may_act(s) for s in SERVICES)
        with pytest.raises(NotHolder):
            first.fence(SERVICES[0])
        await first.release_all()  # its stop must not end the second's tenures
        await second.tick()
        assert set(second.held()) == set(SERVICES)
        assert epochs_in(stores()) == taken
    finally:
        first.close()
        second.close()


# --- the runner acts only on what its tenancy holds ---------------------------------------


class Holding:
    """A tenancy holding a fixed set of services (what a keeper holds at one moment)."""

    def __init__(self, services: set[str]) -> None:
        self.services = services

    def may_act(self, service: str) -> bool:
        return service in self.services

    def evaluates(self, service: str) -> bool:
        return self.may_act(service)

    def fence(self, service: str) -> Fence | None:
        if service not in self.services:
            raise NotHolder(service)
        return Fence(holder="test", epoch=1)


def error_rate(name: str) -> str:
    return service(
        name,
        f"""
[[check]]
name = "errors"
type = "error_rate"
selector = 'service="{name}"'
errors = 'code=~"5.."'
above = 0.05
interval = "1s"
""",
    )


async def test_the_runner_evaluates_only_the_held_members_of_a_batch_in_one_query(
    tmp_path: Path, prometheus_factory: PrometheusFactory
) -> None:
    prometheus = prometheus_factory()
    rules = {name: error_rate(name) for name in ("a", "b", "c")}
    loaded = load(write_config(tmp_path, prometheus.url, rules))
    engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), Store(tmp_path / "s.db"))
    try:
        runner = Runner(engine, tenancy=Holding({"a", "c"}))
        [batch] = engine.plan.batches.values()
        assert len(batch.members) == 3

        def queries() -> float:
            value = engine.metrics.registry.get_sample_value(
                "rollbackd_prometheus_queries_total", {"outcome": "ok"}
            )
            return 0.0 if value is None else value

        evaluations = await runner.run_batch(batch, 1000.0)
        assert sorted(e.service for e in evaluations) == ["a", "c"]
        assert queries() == len(batch.queries), "one query per role, as for the whole batch"
        b = loaded.services["b"]
        assert await runner.run_check(b, b.rules.check[0], 1001.0) is None
        assert ("a", "errors") in engine.states and ("b", "errors") not in engine.states
        runner.tenancy = Holding(set())
        assert await runner.run_batch(batch, 1002.0) == []
        assert queries() == len(batch.queries), "no query for a batch held by another daemon"
    finally:
        engine.store.close()


async def test_the_services_taken_are_announced_before_the_keeper_acts_on_them(
    stores: Callable[[], PostgresStore],
) -> None:
    """``on_acquired`` hears of each newly taken service once, while the keeper does not
    act on it yet (the daemon re-reads what another holder recorded first); a renewal is
    not announced."""
    keepers = Keepers(stores, 30.0)
    try:
        keeper = keepers.add("a")
        heard: list[tuple[list[str], bool]] = []

        def taken(services: list[str]) -> None:
            heard.append((services, any(keeper.may_act(s) for s in services)))

        keeper.on_acquired = taken
        await keeper.tick()
        await keeper.tick()  # renewals only
        assert heard == [(sorted(SERVICES), False)]
        assert set(keeper.held()) == set(SERVICES)
    finally:
        keepers.close()
