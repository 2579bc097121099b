"""The state store's contract (rollbackd.store.interfaces), whatever the backend.

Every test takes ``open_store``, a factory parametrised over the implementations: each call
opens a store on the same, initially empty, backing storage (so a second call is a restart,
or a second process): a file in the test's directory for SQLite, a fresh database on the
run's PostgreSQL server (conftest's ``postgres_database``) for PostgreSQL. A new backend adds
one entry to ``BACKENDS``. Backend-specific matters are in test_store.py (SQLite) and
test_store_postgres.py.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rollbackd.core.model import (
    AlertDraft,
    Event,
    Fence,
    JSONValue,
    RollbackDraft,
    RollbackState,
    VersionSource,
)
from rollbackd.store.errors import ConflictError, FencedError, StoreError
from rollbackd.store.interfaces import StateStore
from rollbackd.store.postgres import PostgresStore
from rollbackd.store.sqlite import Store
from rollbackd.store.writer import writer_for
from support.store_history import deploy

DISCOVERED = VersionSource.DISCOVERED
LIVE = (RollbackState.PENDING, RollbackState.RUNNING, RollbackState.VERIFYING)

# A guard against a deadlock, not a measurement: a read that waits for a held write never
# returns, and this turns that hang into a failure. Generous, for a loaded CI machine.
DEADLOCK_GUARD = 30.0


@dataclass
class CommitGate:
    """Holds every write of a store at its commit: the transaction is open, its changes
    made, and it waits as a write waits for a slow disk, until ``release`` is set."""

    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def hold(self) -> None:
        self.reached.set()
        if not self.release.wait(DEADLOCK_GUARD):
            raise AssertionError("the commit gate was never released")


@dataclass(frozen=True)
class Backend:
    open: Callable[[Path], StateStore]
    """A store on the backing storage named by the directory (created by the caller)."""
    gate_commits: Callable[[StateStore, CommitGate], AbstractContextManager[None]]
    """While inside, every commit of the store first calls ``gate.hold()``."""


@contextmanager
def _gate_commits(store: StateStore, gate: CommitGate) -> Iterator[None]:
    # Both backends commit every write transaction in one method, `_commit(conn)`.
    assert isinstance(store, Store | PostgresStore)
    commit = store._commit

    def gated(conn: Any) -> None:
        gate.hold()
        commit(conn)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "_commit", gated)
        yield


def _sqlite(request: pytest.FixtureRequest) -> Backend:
    return Backend(open=lambda directory: Store(directory / "state.db"), gate_commits=_gate_commits)


def _postgres(request: pytest.FixtureRequest) -> Backend:
    # Asked for here, not by every test: a SQLite test neither starts the server nor
    # makes a database.
    database = request.getfixturevalue("postgres_database")
    return Backend(
        open=lambda _directory: PostgresStore(database.url, password=database.password),
        gate_commits=_gate_commits,
    )


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "sqlite": _sqlite,
    "postgres": _postgres,
}
"""Each backend's ``Backend``, made for one test (it may use that test's fixtures)."""

StoreFactory = Callable[[], StateStore]


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param](request)


@pytest.fixture
def open_store(backend: Backend, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores on one fresh backing storage; all are closed at teardown."""
    opened: list[StateStore] = []

    def open_one() -> StateStore:
        store = backend.open(tmp_path)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: StoreFactory) -> StateStore:
    return open_store()


def draft(
    service: str = "checkout",
    from_version: str | None = "1.1",
    release_id: int = 2,
    state: RollbackState = RollbackState.RUNNING,
    at: float = 2000.0,
    **overrides: Any,
) -> RollbackDraft:
    fields: dict[str, Any] = {
        "to_version": "1.0",
        "source": "check",
        "automatic": True,
        "reason": "error-rate 0.31 > 0.05",
        "mode": "auto",
        "trigger": {"check": "error-rate", "value": 0.31},
        "guards": [{"name": "cooldown", "ok": True}],
        **overrides,
    }
    return RollbackDraft(
        service=service,
        from_version=from_version,
        release_id=release_id,
        state=state,
        at=at,
        **fields,
    )


def alert_draft(fingerprint: str = "aa", status: str = "firing", **overrides: Any) -> AlertDraft:
    fields: dict[str, Any] = {
        "starts_at": 1000.0,
        "ends_at": None if status == "firing" else 1100.0,
        "alertname": "CheckoutDown",
        "labels": {"alertname": "CheckoutDown", "service": "checkout"},
        "annotations": {"summary": "down"},
        "generator_url": "http://prometheus/graph",
        "receiver": "rollbackd",
        "group_key": "{}:{}",
        "matched_service": "checkout",
        "needs_handling": status == "firing",
        **overrides,
    }
    return AlertDraft(fingerprint=fingerprint, status=status, **fields)


# Lifecycle


def test_reopening_keeps_everything(open_store: StoreFactory) -> None:
    first = open_store()
    deploy(first, "checkout", "1.0", "1.1")
    first.mark_baked("checkout", "1.0", 1050.0)
    first.set_paused("checkout", True)
    first.add_event(Event(type="check.breach", at=1200.0, service="checkout"))
    first.save_check_state("checkout", "errors", '{"v":1}', 1200.0)
    rollback = first.create_rollback(draft())
    schema = first.schema_version()
    first.close()

    second = open_store()
    state = second.service_state("checkout")
    assert state is not None
    assert (state.current_version, state.current_since, state.paused) == ("1.1", 1100.0, True)
    assert [c.to_version for c in second.version_changes("checkout")] == ["1.1", "1.0"]
    lkg = second.last_known_good("checkout", exclude="1.1")
    assert lkg is not None and lkg.version == "1.0"
    assert [e.type for e in second.events()] == ["check.breach"]
    assert list(second.check_states()) == [("checkout", "errors")]
    assert second.rollback(rollback.id) == rollback
    assert second.schema_version() == schema


def test_a_closed_store_refuses_every_call(store: StateStore) -> None:
    assert store.writable()
    store.close()
    store.close()
    assert not store.writable()
    with pytest.raises(StoreError):
        store.service_state("checkout")
    with pytest.raises(StoreError):
        store.add_event(Event(type="check.breach", at=1.0))
    with pytest.raises(StoreError):
        store.check_states()
    with pytest.raises(StoreError):
        store.save_check_state("checkout", "errors", "{}", 100.0)
    with pytest.raises(StoreError):
        store.delete_check_state("checkout", "errors")


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.events(limit=0), id="events"),
        pytest.param(lambda s: s.rollbacks(limit=0), id="rollbacks"),
        pytest.param(lambda s: s.alerts(limit=-1), id="alerts"),
        pytest.param(lambda s: s.firing_alerts("checkout", limit=0), id="firing_alerts"),
        pytest.param(lambda s: s.version_changes("checkout", limit=0), id="version_changes"),
    ],
)
def test_a_limit_below_one_is_refused(store: StateStore, call: Callable[[StateStore], Any]) -> None:
    with pytest.raises(ValueError, match="limit must be positive"):
        call(store)


# Versions and release history


def test_version_changes_are_kept_in_order_with_one_record_per_version(store: StateStore) -> None:
    store.record_version_change("checkout", None, "1.0", 100.0, VersionSource.START)
    store.record_version_change("checkout", "1.0", "1.1", 200.0, DISCOVERED)
    store.record_version_change("checkout", "1.1", "1.0", 300.0, VersionSource.API)
    store.record_version_change("checkout", "1.0", "1.2", 300.0, DISCOVERED)

    history = store.version_changes("checkout")
    assert [(c.from_version, c.to_version, c.at, c.source) for c in history] == [
        ("1.0", "1.2", 300.0, DISCOVERED),
        ("1.1", "1.0", 300.0, VersionSource.API),
        ("1.0", "1.1", 200.0, DISCOVERED),
        (None, "1.0", 100.0, VersionSource.START),
    ]
    assert [c.to_version for c in store.version_changes("checkout", limit=2)] == ["1.2", "1.0"]

    records = {r.version: r for r in store.versions("checkout")}
    assert sorted(records) == ["1.0", "1.1", "1.2"]
    # Deployed twice, still one record: first sighting kept, last sighting moved on.
    assert (records["1.0"].first_seen, records["1.0"].last_seen) == (100.0, 300.0)
    assert records["1.0"].source is VersionSource.START
    assert store.went_live_at("checkout") == {"1.0": 300.0, "1.1": 200.0, "1.2": 300.0}

    state = store.service_state("checkout")
    assert state is not None
    assert (state.current_version, state.current_since) == ("1.2", 300.0)


def test_services_are_kept_apart(store: StateStore) -> None:
    deploy(store, "checkout", "1.0", "1.1")
    deploy(store, "search", "1.0")
    assert [c.to_version for c in store.version_changes("search")] == ["1.0"]
    assert [s.service for s in store.service_states()] == ["checkout", "search"]
    assert store.version("search", "1.1") is None


def test_a_change_from_a_stale_version_is_refused(store: StateStore) -> None:
    deploy(store, "checkout", "1.0", "1.1")
    with pytest.raises(ConflictError, match=r"current version is now '1\.1'"):
        store.record_version_change("checkout", "1.0", "1.2", 500.0, DISCOVERED)
    assert store.version("checkout", "1.2") is None
    assert len(store.version_changes("checkout")) == 2


def test_a_change_to_no_version_is_refused(store: StateStore) -> None:
    with pytest.raises(ValueError, match="to_version"):
        store.record_version_change("checkout", None, "", 1.0, DISCOVERED)
    assert store.service_state("checkout") is None


def test_release_metadata_is_kept_and_replaced_only_when_given(store: StateStore) -> None:
    store.record_version_change("api", None, "1.0", 1.0, VersionSource.API, {"commit": "abc"})
    store.record_version_change("api", "1.0", "1.1", 2.0, VersionSource.API)
    store.record_version_change("api", "1.1", "1.0", 3.0, VersionSource.API)
    record = store.version("api", "1.0")
    assert record is not None and record.meta == {"commit": "abc"}
    store.record_version_change("api", "1.0", "1.1", 4.0, VersionSource.API, {"commit": "def"})
    record = store.version("api", "1.1")
    assert record is not None and record.meta == {"commit": "def"}


def test_touch_moves_last_seen_forward_only(store: StateStore) -> None:
    deploy(store, "checkout", "1.0")
    deploy(store, "search", "2.0")
    store.touch_version("checkout", "1.0", 5000.0)
    store.touch_version("checkout", "1.0", 4000.0)
    store.touch_versions([("search", "2.0", 6000.0), ("checkout", "1.0", 4500.0)])
    store.touch_versions([])
    store.touch_version("checkout", "9.9", 7000.0)  # unknown: nothing to touch
    checkout, search = store.version("checkout", "1.0"), store.version("search", "2.0")
    assert checkout is not None and checkout.last_seen == 5000.0
    assert search is not None and search.last_seen == 6000.0
    assert store.version("checkout", "9.9") is None


def test_bake_clock_restarts_at_a_change_only_if_it_was_running(store: StateStore) -> None:
    deploy(store, "checkout", "1.0")
    store.set_healthy_since("checkout", 1010.0)
    store.record_version_change("checkout", "1.0", "1.1", 2000.0, DISCOVERED)
    state = store.service_state("checkout")
    assert state is not None and state.healthy_since == 2000.0

    store.set_healthy_since("checkout", None)
    store.record_version_change("checkout", "1.1", "1.2", 3000.0, DISCOVERED)
    state = store.service_state("checkout")
    assert state is not None and state.healthy_since is None

    store.set_healthy_since("unknown", 1.0)
    assert store.service_state("unknown") is None


def test_baked_once_and_never_when_bad(store: StateStore) -> None:
    deploy(store, "checkout", "1.0", "1.1")
    assert store.mark_baked("checkout", "1.0", 1050.0)
    assert not store.mark_baked("checkout", "1.0", 1060.0)
    record = store.version("checkout", "1.0")
    assert record is not None and record.baked_at == 1050.0

    assert store.mark_bad("checkout", "1.1", "error-rate 0.31 > 0.05")
    assert not store.mark_baked("checkout", "1.1", 1200.0)
    record = store.version("checkout", "1.1")
    assert record is not None
    assert (record.bad, record.bad_reason, record.baked_at) == (
        True,
        "error-rate 0.31 > 0.05",
        None,
    )
    assert not store.mark_bad("checkout", "9.9", "unknown")


@pytest.mark.parametrize(
    ("deployed", "baked", "bad", "exclude", "expected"),
    [
        pytest.param([], [], [], None, None, id="nothing-known"),
        pytest.param(["1", "2"], [], [], "2", None, id="nothing-baked"),
        pytest.param(["1", "2", "3"], ["1", "2"], [], "3", "2", id="latest-baked"),
        pytest.param(["1", "2"], ["1", "2"], [], "2", "1", id="excludes-current"),
        pytest.param(["1", "2"], ["1", "2"], [], None, "2", id="no-exclusion"),
        pytest.param(["1", "2", "3"], ["1", "2"], ["2"], "3", "1", id="skips-bad"),
        # 2 baked after 1 but 1 was deployed again later: 1 ran most recently.
        pytest.param(["1", "2", "1", "3"], ["1", "2"], [], "3", "1", id="redeployed-counts"),
    ],
)
def test_last_known_good(
    store: StateStore,
    deployed: list[str],
    baked: list[str],
    bad: list[str],
    exclude: str | None,
    expected: str | None,
) -> None:
    deploy(store, "checkout", *deployed)
    for version in baked:
        assert store.mark_baked("checkout", version, 5000.0 + int(version))
    for version in bad:
        store.mark_bad("checkout", version, "rolled back")
    record = store.last_known_good("checkout", exclude=exclude)
    assert (None if record is None else record.version) == expected


# Service switches and pauses


def test_pause_and_freeze_work_before_any_version_is_known(store: StateStore) -> None:
    store.set_paused("checkout", True)
    store.set_frozen("checkout", True, "3 rollbacks in 1h")
    state = store.service_state("checkout")
    assert state is not None
    assert (state.current_version, state.paused, state.frozen) == (None, True, True)
    assert state.frozen_reason == "3 rollbacks in 1h"

    deploy(store, "checkout", "1.0")
    store.set_frozen("checkout", False, "ignored when thawing")
    state = store.service_state("checkout")
    assert state is not None
    assert (state.current_version, state.paused, state.frozen, state.frozen_reason) == (
        "1.0",
        True,
        False,
        None,
    )
    assert store.service_state("unknown") is None


def test_pause_scopes_are_set_replaced_and_lifted(store: StateStore) -> None:
    assert store.paused() == set()
    store.set_pause("checkout", True, 10.0, "alice")
    store.set_pause("*", True, 11.0)
    store.set_pause("checkout", True, 12.0, "bob")
    assert store.paused() == {"checkout", "*"}
    store.set_pause("*", False, 13.0)
    store.set_pause("never-paused", False, 14.0)
    assert store.paused() == {"checkout"}


# Check states


def test_check_states_are_saved_replaced_and_deleted(store: StateStore) -> None:
    assert store.check_states() == {}
    store.save_check_state("checkout", "errors", '{"v":1}', 100.0)
    store.save_check_state("checkout", "p99", '{"v":2}', 101.0)
    store.save_check_state("checkout", "errors", '{"v":3}', 102.0)
    store.delete_check_state("checkout", "p99")
    store.delete_check_state("checkout", "never-saved")
    [row] = store.check_states().values()
    assert (row.service, row.check, row.state, row.updated_at) == (
        "checkout",
        "errors",
        '{"v":3}',
        102.0,
    )


def test_a_check_state_that_is_not_json_is_refused(store: StateStore) -> None:
    with pytest.raises(StoreError):
        store.save_check_state("checkout", "errors", "not json", 100.0)
    assert store.check_states() == {}
    assert store.write_failure is None  # a refused write, not a failing store


# Rollbacks, triggers and steps


def test_a_rollback_round_trips_and_is_found_by_its_release(store: StateStore) -> None:
    created = store.create_rollback(draft(trigger={"value": math.inf}))
    assert created.id > 0
    assert (created.service, created.from_version, created.release_id) == ("checkout", "1.1", 2)
    assert (created.state, created.created_at, created.updated_at) == (
        RollbackState.RUNNING,
        2000.0,
        2000.0,
    )
    assert created.trigger == {"value": "+Inf"}
    assert created.guards == [{"name": "cooldown", "ok": True}]
    assert (created.started_at, created.finished_at, created.decided_by) == (None, None, None)
    assert store.rollback(created.id) == created
    assert store.rollback(created.id + 1000) is None
    assert store.latest_rollback("checkout", "1.1", 2) == created
    assert store.latest_rollback("checkout", "1.1", 3) is None


def test_a_release_has_at_most_one_live_or_successful_rollback(store: StateStore) -> None:
    first = store.create_rollback(draft())
    with pytest.raises(ConflictError, match="already has"):
        store.create_rollback(draft(at=2001.0))
    # The same version deployed again is another release: it may be rolled back again.
    store.create_rollback(draft(release_id=5, at=2002.0))
    # An unknown version is one value of the key, not a fresh one each time.
    store.create_rollback(draft(from_version=None, release_id=0, at=2003.0))
    with pytest.raises(ConflictError):
        store.create_rollback(draft(from_version=None, release_id=0, at=2004.0))

    store.set_rollback_state(first.id, RollbackState.FAILED, 2100.0)
    again = store.create_rollback(draft(at=2200.0))
    assert store.latest_rollback("checkout", "1.1", 2) == again
    store.set_rollback_state(again.id, RollbackState.SUCCEEDED, 2300.0)
    with pytest.raises(ConflictError):
        store.create_rollback(draft(at=2400.0))


def test_a_rollback_that_is_not_live_is_finished_when_recorded(store: StateStore) -> None:
    dry = store.create_rollback(draft(state=RollbackState.DRY_RUN, outcome="dry run"))
    assert (dry.finished_at, dry.outcome) == (2000.0, "dry run")
    # Not live, not succeeded: it holds no claim on the release.
    store.create_rollback(draft(at=2001.0))


def test_rollback_state_moves_record_when_it_ran_and_finished(store: StateStore) -> None:
    pending = store.create_rollback(draft(state=RollbackState.PENDING, expires_at=3000.0))
    running = store.set_rollback_state(
        pending.id,
        RollbackState.RUNNING,
        2100.0,
        expected=[RollbackState.PENDING],
        decided_by="alice",
        to_version="0.9",
        canary=True,
    )
    assert (running.state, running.started_at, running.finished_at) == (
        RollbackState.RUNNING,
        2100.0,
        None,
    )
    assert (running.decided_by, running.to_version, running.canary) == ("alice", "0.9", True)
    verifying = store.set_rollback_state(running.id, RollbackState.VERIFYING, 2200.0)
    assert verifying.started_at == 2100.0  # the first move to running only
    done = store.set_rollback_state(running.id, RollbackState.SUCCEEDED, 2300.0, outcome="verified")
    assert (done.finished_at, done.updated_at, done.outcome) == (2300.0, 2300.0, "verified")
    assert (done.decided_by, done.to_version, done.canary, done.expires_at) == (
        "alice",
        "0.9",
        True,
        3000.0,
    )
    assert store.rollback(done.id) == done


def test_a_rollback_state_move_from_an_unexpected_state_is_refused(store: StateStore) -> None:
    pending = store.create_rollback(draft(state=RollbackState.PENDING))
    store.set_rollback_state(pending.id, RollbackState.REJECTED, 2100.0, decided_by="bob")
    with pytest.raises(ConflictError, match="rejected, not pending"):
        store.set_rollback_state(
            pending.id, RollbackState.RUNNING, 2200.0, expected=[RollbackState.PENDING]
        )
    after = store.rollback(pending.id)
    assert after is not None
    assert (after.state, after.updated_at, after.decided_by) == (
        RollbackState.REJECTED,
        2100.0,
        "bob",
    )
    with pytest.raises(StoreError, match="no rollback"):
        store.set_rollback_state(pending.id + 1000, RollbackState.FAILED, 2300.0)


def test_rollbacks_filter_and_come_latest_first(store: StateStore) -> None:
    a = store.create_rollback(draft(service="a", at=1.0, state=RollbackState.FAILED))
    b = store.create_rollback(draft(service="b", at=2.0, state=RollbackState.PENDING))
    c = store.create_rollback(draft(service="a", release_id=3, at=3.0))

    def ids(found: list[Any]) -> list[int]:
        return [r.id for r in found]

    assert ids(store.rollbacks()) == [c.id, b.id, a.id]
    assert ids(store.rollbacks(limit=1)) == [c.id]
    assert ids(store.rollbacks(service="a")) == [c.id, a.id]
    assert ids(store.rollbacks(states=LIVE)) == [c.id, b.id]
    assert ids(store.rollbacks(states=[])) == []
    assert ids(store.rollbacks(since=2.0)) == [c.id, b.id]
    assert ids(store.rollbacks(service="a", states=LIVE, since=1.0)) == [c.id]


def test_triggers_join_a_rollback_in_order(store: StateStore) -> None:
    rollback = store.create_rollback(draft())
    other = store.create_rollback(draft(service="search"))
    first = store.add_trigger(rollback.id, 2001.0, "alert", {"alertname": "Down"})
    second = store.add_trigger(rollback.id, 2002.0, "check", {"value": math.nan})
    store.add_trigger(other.id, 2003.0, "alert", {})
    assert second > first > 0
    triggers = store.triggers(rollback.id)
    assert [(t.id, t.rollback_id, t.at, t.source, t.detail) for t in triggers] == [
        (first, rollback.id, 2001.0, "alert", {"alertname": "Down"}),
        (second, rollback.id, 2002.0, "check", {"value": "NaN"}),
    ]
    assert [t.id for t in store.triggers(rollback.id, limit=1)] == [first]
    assert store.count_triggers(rollback.id) == 2
    assert store.count_triggers(rollback.id + 1000) == 0
    with pytest.raises(StoreError):
        store.add_trigger(rollback.id + 1000, 2004.0, "alert", {})


def test_steps_are_recorded_before_they_run_and_finished_after(store: StateStore) -> None:
    rollback = store.create_rollback(draft())
    first = store.start_step(rollback.id, "rollback", "command", 2001.0)
    second = store.start_step(rollback.id, "verify", "verify", 2002.0)
    store.finish_step(first, 2010.0, True, "exit 0", "out", "err", ["deploy", "1.0"])
    store.finish_step(second + 1000, 2011.0, False, "unknown step: nothing to finish")
    steps = store.steps(rollback.id)
    assert [s.id for s in steps] == [first, second]
    done, unfinished = steps
    assert (done.kind, done.executor, done.started_at, done.finished_at, done.ok) == (
        "rollback",
        "command",
        2001.0,
        2010.0,
        True,
    )
    assert (done.summary, done.stdout_tail, done.stderr_tail, list(done.command)) == (
        "exit 0",
        "out",
        "err",
        ["deploy", "1.0"],
    )
    assert (unfinished.finished_at, unfinished.ok, unfinished.summary) == (None, None, "")
    assert store.steps(rollback.id + 1000) == []
    with pytest.raises(StoreError):
        store.start_step(rollback.id + 1000, "rollback", "command", 2020.0)


# Alerts


def test_alerts_are_recorded_once_and_resends_counted(store: StateStore) -> None:
    firing, resolved = alert_draft("aa"), alert_draft("bb", "resolved", outcome="resolved")
    [(stored, new), (other, other_new)] = store.record_alerts([firing, resolved], 10.0)
    assert new and other_new
    assert (stored.deliveries, stored.received_at, stored.last_received_at) == (1, 10.0, 10.0)
    assert (stored.handled_at, stored.outcome) == (None, "")
    assert (other.handled_at, other.outcome) == (10.0, "resolved")
    assert (stored.labels, stored.annotations) == (firing.labels, firing.annotations)
    assert (stored.alertname, stored.matched_service, stored.ends_at) == (
        "CheckoutDown",
        "checkout",
        None,
    )

    [(again, again_new)] = store.record_alerts([firing], 20.0)
    assert not again_new
    assert (again.id, again.deliveries, again.received_at, again.last_received_at) == (
        stored.id,
        2,
        10.0,
        20.0,
    )
    [(late, _)] = store.record_alerts([firing], 15.0)  # an older delivery arriving late
    assert (late.deliveries, late.last_received_at) == (3, 20.0)
    assert store.record_alerts([], 30.0) == []

    store.set_alert_handled(stored.id, 21.0, "rolled back", rollback_id=7)
    store.set_alert_handled(stored.id + 1000, 21.0, "unknown: no-op")
    [handled] = [a for a in store.alerts() if a.id == stored.id]
    assert (handled.handled_at, handled.outcome, handled.rollback_id) == (21.0, "rolled back", 7)


def test_alerts_filter_and_firing_ones_are_those_not_resolved(store: StateStore) -> None:
    store.record_alerts([alert_draft("aa"), alert_draft("bb")], 10.0)
    store.record_alerts([alert_draft("cc", matched_service="search")], 20.0)
    store.record_alerts([alert_draft("aa", "resolved")], 30.0)
    store.record_alerts([alert_draft("dd", matched_service=None, needs_handling=False)], 40.0)

    def fingerprints(found: list[Any]) -> list[str]:
        return [a.fingerprint for a in found]

    assert fingerprints(store.alerts()) == ["dd", "aa", "cc", "bb", "aa"]
    assert fingerprints(store.alerts(limit=2)) == ["dd", "aa"]
    assert fingerprints(store.alerts(service="checkout")) == ["aa", "bb", "aa"]
    assert fingerprints(store.alerts(since=20.0)) == ["dd", "aa", "cc"]
    assert fingerprints(store.alerts(service="checkout", since=20.0)) == ["aa"]
    assert fingerprints(store.firing_alerts("checkout")) == ["bb"]
    assert fingerprints(store.firing_alerts("search")) == ["cc"]
    # Fired again later (a new startsAt): a new alert, firing again.
    store.record_alerts([alert_draft("aa", starts_at=2000.0)], 50.0)
    assert fingerprints(store.firing_alerts("checkout")) == ["aa", "bb"]
    assert fingerprints(store.firing_alerts("checkout", limit=1)) == ["aa"]


def test_one_delivery_is_stored_all_or_none(store: StateStore) -> None:
    # The second alert cannot be stored (its labels are no JSON): the first, already
    # written in the same transaction, is not kept either.
    unstorable = alert_draft("bb", labels={"x": object()})
    with pytest.raises((StoreError, TypeError)):
        store.record_alerts([alert_draft("aa"), unstorable], 1.0)
    assert store.alerts() == []
    [(stored, new)] = store.record_alerts([alert_draft("aa")], 2.0)
    assert new and stored.deliveries == 1


# The audit log


def test_events_round_trip_with_json_data(store: StateStore) -> None:
    data: dict[str, JSONValue] = {
        "check": "error-rate",
        "value": 0.31,
        "threshold": 0.05,
        "labels": {"code": "500"},
        "versions": ["1.0", "1.1"],
        "firing": True,
        "note": None,
    }
    event_id = store.add_event(
        Event(type="check.breach", at=10.0, service="checkout", rollback_id=7, data=data)
    )
    (event,) = store.events()
    assert event == Event(
        type="check.breach", at=10.0, service="checkout", rollback_id=7, data=data, id=event_id
    )
    assert store.add_event(Event(type="check.recovered", at=11.0)) > event_id
    with pytest.raises(ValueError, match="needs a type"):
        store.add_event(Event(type="", at=12.0))


def test_non_finite_values_are_stored_as_prometheus_spells_them(store: StateStore) -> None:
    store.add_event(
        Event(type="check.recovered", at=1.0, data={"values": [math.nan, math.inf, -math.inf]})
    )
    (event,) = store.events()
    assert event.data == {"values": ["NaN", "+Inf", "-Inf"]}


def test_events_filter_and_come_latest_first(store: StateStore) -> None:
    for at, kind, service in [
        (1.0, "check.breach", "checkout"),
        (2.0, "prometheus.unreachable", None),
        (3.0, "rollback.started", "checkout"),
        (4.0, "check.breach", "search"),
        (5.0, "rollback.succeeded", "checkout"),
    ]:
        store.add_event(Event(type=kind, at=at, service=service))

    def ats(events: list[Event]) -> list[float]:
        return [e.at for e in events]

    assert ats(store.events()) == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert ats(store.events(limit=2)) == [5.0, 4.0]
    assert ats(store.events(service="checkout")) == [5.0, 3.0, 1.0]
    assert ats(store.events(since=3.0)) == [5.0, 4.0, 3.0]
    assert ats(store.events(types=["check.breach"])) == [4.0, 1.0]
    assert ats(store.events(types="check.breach")) == [4.0, 1.0]
    assert ats(store.events(types=[])) == []
    assert ats(store.events(service="checkout", since=2.0, types=["rollback.started"])) == [3.0]


# Concurrency


def test_concurrent_writes_from_threads_all_land(store: StateStore) -> None:
    threads, per_thread = 8, 40
    start = threading.Barrier(threads)

    def work(worker: int) -> None:
        start.wait()
        service = f"svc-{worker}"
        previous = None
        for i in range(per_thread):
            store.add_event(Event(type="check.breach", at=float(i), service=service))
            version = f"1.{i}"
            store.record_version_change(service, previous, version, float(i), DISCOVERED)
            store.touch_version(service, version, float(i) + 0.5)
            previous = version
            assert store.writable()

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(work, n) for n in range(threads)]:
            future.result()

    assert len(store.events(limit=10_000)) == threads * per_thread
    for worker in range(threads):
        state = store.service_state(f"svc-{worker}")
        assert state is not None and state.current_version == f"1.{per_thread - 1}"
        assert len(store.version_changes(f"svc-{worker}", limit=1000)) == per_thread


def test_two_stores_on_one_backing_storage_wait_for_each_other(open_store: StoreFactory) -> None:
    # A second store (the CLI, say) must queue behind the other's writes, not fail.
    first, second = open_store(), open_store()

    def work(store: StateStore, name: str) -> None:
        for i in range(50):
            store.add_event(Event(type="check.breach", at=float(i), service=name))

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(work, first, "a"), pool.submit(work, second, "b")]
        for future in futures:
            future.result()
    assert len(first.events(limit=1000)) == 100
    assert len(second.events(limit=1000)) == 100


# Reads beside a write in flight


def snapshot(store: StateStore) -> tuple[object, ...]:
    """A read of every aggregate."""
    return (
        store.service_state("checkout"),
        store.versions("checkout"),
        store.paused(),
        store.check_states(),
        store.rollbacks(),
        store.alerts(),
        store.events(),
        store.schema_version(),
    )


@contextmanager
def write_held_at_commit(
    backend: Backend, store: StateStore, write: Callable[[], object]
) -> Iterator[Future[object]]:
    """Runs ``write`` on a thread of its own and holds it at its commit for the body;
    yields the write's future, which completes once the body has ended."""
    gate = CommitGate()
    with backend.gate_commits(store, gate), ThreadPoolExecutor(1) as writer:
        written = writer.submit(write)
        try:
            assert gate.reached.wait(DEADLOCK_GUARD), "the write never reached its commit"
            yield written
        finally:
            gate.release.set()
        written.result(DEADLOCK_GUARD)


def test_reads_on_another_thread_complete_while_a_write_is_held(
    backend: Backend, store: StateStore
) -> None:
    deploy(store, "checkout", "1.0")
    store.add_event(Event(type="check.breach", at=1.0, service="checkout"))
    before = snapshot(store)
    with (
        write_held_at_commit(
            backend,
            store,
            lambda: store.record_version_change("checkout", "1.0", "1.1", 2000.0, DISCOVERED),
        ) as written,
        ThreadPoolExecutor(1) as reader,
    ):
        # The read sees the last committed state: nothing of the write held open.
        assert reader.submit(snapshot, store).result(DEADLOCK_GUARD) == before
        assert not written.done()
    state = store.service_state("checkout")
    assert state is not None and state.current_version == "1.1"


def test_many_reads_at_once_complete_while_a_write_is_held(
    backend: Backend, store: StateStore
) -> None:
    readers = 4
    together = threading.Barrier(readers)

    def read() -> list[Event]:
        together.wait(DEADLOCK_GUARD)  # all of them in flight at once
        return store.events()

    with (
        write_held_at_commit(
            backend, store, lambda: store.add_event(Event(type="check.breach", at=1.0))
        ),
        ThreadPoolExecutor(readers) as pool,
    ):
        futures = [pool.submit(read) for _ in range(readers)]
        assert [f.result(DEADLOCK_GUARD) for f in futures] == [[]] * readers
    assert [e.type for e in store.events()] == ["check.breach"]


async def test_the_event_loop_reads_while_the_writer_holds_a_write(
    backend: Backend, store: StateStore
) -> None:
    """The daemon's own arrangement: writes through StoreWriter, reads direct on the loop."""
    writer = writer_for(store)
    gate = CommitGate()
    with backend.gate_commits(store, gate), ThreadPoolExecutor(1) as reader:
        written = asyncio.ensure_future(writer.add_event(Event(type="check.breach", at=1.0)))
        try:
            assert await asyncio.to_thread(gate.reached.wait, DEADLOCK_GUARD)
            # On a thread with a guard rather than on the loop itself, so that a broken
            # store fails the test instead of hanging the loop that would release it.
            assert reader.submit(store.events).result(DEADLOCK_GUARD) == []
            assert not written.done()
        finally:
            gate.release.set()
        event_id = await written
    assert [e.id for e in store.events()] == [event_id]
    writer.close()


def test_a_read_after_a_write_sees_it_on_every_thread(store: StateStore) -> None:
    # Reads may run on connections of their own: each must see every committed write.
    with ThreadPoolExecutor(4) as pool:
        for i in range(20):
            store.add_event(Event(type="check.breach", at=float(i)))
            futures = [pool.submit(store.events, limit=1000) for _ in range(4)]
            seen = [len(future.result()) for future in futures]
            assert seen == [i + 1] * 4


# Fencing: a rollback's state changes only under its service's live lease


def test_fenced_rollback_writes_land_under_the_live_lease(store: StateStore) -> None:
    lease = store.acquire("checkout", "daemon-a", ttl=60.0)
    assert lease is not None
    fence = Fence("daemon-a", lease.epoch)
    created = store.create_rollback(draft(state=RollbackState.PENDING), fence=fence)
    running = store.set_rollback_state(
        created.id, RollbackState.RUNNING, 2100.0, expected=[RollbackState.PENDING], fence=fence
    )
    assert running.state is RollbackState.RUNNING
    assert store.rollback(created.id) == running


def test_fenced_rollback_writes_are_refused_once_the_lease_expired(store: StateStore) -> None:
    lease = store.acquire("checkout", "daemon-a", ttl=0.0)  # expired at once
    assert lease is not None
    fence = Fence("daemon-a", lease.epoch)
    with pytest.raises(FencedError, match="checkout"):
        store.create_rollback(draft(), fence=fence)
    assert store.rollbacks() == []
    unfenced = store.create_rollback(draft())
    with pytest.raises(FencedError):
        store.set_rollback_state(unfenced.id, RollbackState.SUCCEEDED, 2100.0, fence=fence)
    assert store.rollback(unfenced.id) == unfenced


def test_fenced_rollback_writes_are_refused_with_a_stale_epoch(store: StateStore) -> None:
    old = store.acquire("checkout", "daemon-a", ttl=0.0)
    new = store.acquire("checkout", "daemon-b", ttl=60.0)  # taken over after expiry
    assert old is not None and new is not None and new.epoch > old.epoch
    pending = store.create_rollback(
        draft(state=RollbackState.PENDING), fence=Fence("daemon-b", new.epoch)
    )
    for stale in (Fence("daemon-a", old.epoch), Fence("daemon-b", old.epoch)):
        with pytest.raises(FencedError):
            store.create_rollback(draft(release_id=3), fence=stale)
        with pytest.raises(FencedError):
            store.set_rollback_state(pending.id, RollbackState.RUNNING, 2100.0, fence=stale)
    assert [r.id for r in store.rollbacks()] == [pending.id]
    assert store.rollback(pending.id) == pending


def test_a_fence_counts_only_for_its_own_service(store: StateStore) -> None:
    lease = store.acquire("payments", "daemon-a", ttl=60.0)
    assert lease is not None
    with pytest.raises(FencedError):
        store.create_rollback(draft(service="checkout"), fence=Fence("daemon-a", lease.epoch))
    with pytest.raises(StoreError, match="no rollback"):
        store.set_rollback_state(999, RollbackState.FAILED, 2100.0, fence=Fence("x", 1))
    assert store.rollbacks() == []
