"""Requests handed to a service's holder (``HandoffStore``), the alerts left for a holder
to hand over (``AlertStore.unhandled_alerts``), and PostgreSQL's wake-ups.

The behavioural tests run on every backend of ``test_store_contract.py``. The PostgreSQL
tests at the end race several stores (several daemons) on one database, and listen for
the wake-ups a real server delivers.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import test_store_contract as contract
from rollbackd.core.model import HandoffDraft, HandoffKind
from rollbackd.store.interfaces import StateStore
from rollbackd.store.postgres import PostgresStore
from support.postgres import Database

backend = contract.backend
open_store = contract.open_store
store = contract.store


def approval(service: str = "checkout", rollback_id: int = 7) -> HandoffDraft:
    return HandoffDraft(
        service=service,
        kind=HandoffKind.APPROVE,
        body={"rollback_id": rollback_id, "who": "alice"},
        asked_by="daemon-a",
    )


def test_a_handed_off_request_is_stored_open_and_read_back(store: StateStore) -> None:
    handoff_id = store.hand_off(approval(), 100.0)
    found = store.handoff(handoff_id)
    assert found is not None
    assert (found.service, found.kind, dict(found.body), found.asked_by) == (
        "checkout",
        HandoffKind.APPROVE,
        {"rollback_id": 7, "who": "alice"},
        "daemon-a",
    )
    assert (found.asked_at, found.taken_by, found.answer) == (100.0, None, None)
    assert store.handoff(handoff_id + 1000) is None


def test_requests_are_taken_once_oldest_first_and_only_for_the_given_services(
    store: StateStore,
) -> None:
    first = store.hand_off(approval("checkout", 1), 100.0)
    other = store.hand_off(approval("cart", 2), 101.0)
    second = store.hand_off(approval("checkout", 3), 102.0)
    taken = store.take_handoffs("daemon-b", ["checkout"], 110.0)
    assert [h.id for h in taken] == [first, second]
    assert {(h.taken_by, h.taken_at) for h in taken} == {("daemon-b", 110.0)}
    assert store.take_handoffs("daemon-c", ["checkout"], 111.0) == []
    assert [h.id for h in store.take_handoffs("daemon-c", ["cart", "search"], 112.0)] == [other]
    assert store.take_handoffs("daemon-c", [], 113.0) == []


def test_take_honours_its_limit(store: StateStore) -> None:
    ids = [store.hand_off(approval(rollback_id=n), 100.0 + n) for n in range(3)]
    assert [h.id for h in store.take_handoffs("daemon-b", ["checkout"], 110.0, limit=2)] == ids[:2]
    assert [h.id for h in store.take_handoffs("daemon-b", ["checkout"], 111.0)] == ids[2:]


def test_an_answer_is_recorded_once(store: StateStore) -> None:
    handoff_id = store.hand_off(approval(), 100.0)
    store.take_handoffs("daemon-b", ["checkout"], 101.0)
    store.answer_handoff(handoff_id, {"ok": True, "rollback_id": 7}, 102.0)
    store.answer_handoff(handoff_id, {"ok": False}, 103.0)
    found = store.handoff(handoff_id)
    assert found is not None
    assert (dict(found.answer or {}), found.answered_at) == ({"ok": True, "rollback_id": 7}, 102.0)


def test_a_withdrawn_request_is_never_taken_and_a_taken_one_cannot_be_withdrawn(
    store: StateStore,
) -> None:
    withdrawn = store.hand_off(approval(rollback_id=1), 100.0)
    taken = store.hand_off(approval(rollback_id=2), 100.0)
    assert store.withdraw_handoff(withdrawn, 101.0) is True
    assert [h.id for h in store.take_handoffs("daemon-b", ["checkout"], 102.0)] == [taken]
    assert store.withdraw_handoff(taken, 103.0) is False
    assert store.withdraw_handoff(withdrawn, 104.0) is False


def test_answered_requests_are_pruned_after_a_day(store: StateStore) -> None:
    old = store.hand_off(approval(rollback_id=1), 100.0)
    store.take_handoffs("daemon-b", ["checkout"], 100.0)
    store.answer_handoff(old, {"ok": True}, 100.0)
    new = store.hand_off(approval(rollback_id=2), 100.0 + 90_000)
    store.take_handoffs("daemon-b", ["checkout"], 100.0 + 90_000)
    store.answer_handoff(new, {"ok": True}, 100.0 + 90_000)
    assert store.handoff(old) is None
    assert store.handoff(new) is not None


def test_unhandled_alerts_are_the_matched_firing_ones_not_yet_handed_over(
    store: StateStore,
) -> None:
    drafts = [
        contract.alert_draft("aa"),
        contract.alert_draft("bb", matched_service="cart"),
        contract.alert_draft("cc", status="resolved"),
        contract.alert_draft("dd", matched_service=None, needs_handling=False),
        contract.alert_draft("ee"),
    ]
    stored = {a.fingerprint: a for a, _ in store.record_alerts(drafts, 100.0)}
    assert [a.fingerprint for a in store.unhandled_alerts(["checkout"])] == ["aa", "ee"]
    assert [a.fingerprint for a in store.unhandled_alerts(["checkout", "cart"], limit=2)] == [
        "aa",
        "bb",
    ]
    store.set_alert_handled(stored["aa"].id, 101.0, "executing: ...", None)
    assert [a.fingerprint for a in store.unhandled_alerts(["checkout"])] == ["ee"]
    assert store.unhandled_alerts([]) == []


# PostgreSQL: several daemons on one database


def test_racing_takers_take_each_request_once(postgres_database: Database) -> None:
    stores = [
        PostgresStore(postgres_database.url, password=postgres_database.password) for _ in range(3)
    ]
    try:
        ids = {stores[0].hand_off(approval(rollback_id=n), 100.0) for n in range(60)}
        barrier = threading.Barrier(len(stores))

        def take(index: int) -> list[int]:
            barrier.wait()
            got: list[int] = []
            while batch := stores[index].take_handoffs(f"d{index}", ["checkout"], 101.0, 5):
                got.extend(h.id for h in batch)
            return got

        with ThreadPoolExecutor(len(stores)) as pool:
            taken = [i for got in pool.map(take, range(len(stores))) for i in got]
        assert sorted(taken) == sorted(ids)  # every one taken, none twice
    finally:
        for one in stores:
            one.close()


@pytest.mark.parametrize("what", ["hand_off", "answer", "unhandled alert"])
def test_another_daemon_is_woken_by_a_committed_write(
    postgres_database: Database, what: str
) -> None:
    asker = PostgresStore(postgres_database.url, password=postgres_database.password)
    holder = PostgresStore(postgres_database.url, password=postgres_database.password)
    woken = threading.Event()
    listening = holder.listen(woken.set)
    try:
        # The listener wakes once when it connects: wait for that, then expect the write's.
        assert woken.wait(30), "the listener never connected"
        woken.clear()
        if what == "hand_off":
            asker.hand_off(approval(), 100.0)
        elif what == "answer":
            asker.answer_handoff(12345, {"ok": True}, 100.0)
        else:
            asker.record_alerts([contract.alert_draft("aa")], 100.0)
        assert woken.wait(30), f"no wake-up after {what}"
    finally:
        listening.close()
        asker.close()
        holder.close()
