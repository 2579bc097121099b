"""The asker's side of a handed-off request (``runtime/relay.py`` ``Asker``), against a real
PostgreSQL: the answer comes back when the holder writes it (woken by ``NOTIFY``), and a
request no holder takes in time is withdrawn — nothing is done — and said so.

The "holder" here is a second store on the same database, driven by the test, so that
each step (taken, answered, never taken) happens exactly when the test says.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from rollbackd.core.model import Handoff, HandoffDraft, HandoffKind
from rollbackd.runtime.relay import Asker, NotAnswered, Wakeups
from rollbackd.store.postgres import PostgresStore
from rollbackd.store.writer import writer_for
from support.postgres import Database
from support.prometheus import poll


@pytest.fixture
def stores(postgres_database: Database) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    asker = PostgresStore(postgres_database.url, password=postgres_database.password)
    holder = PostgresStore(postgres_database.url, password=postgres_database.password)
    yield asker, holder
    writer_for(asker).close()
    asker.close()
    holder.close()


def approval() -> HandoffDraft:
    return HandoffDraft(
        "checkout", HandoffKind.APPROVE, {"rollback_id": 3, "who": "alice"}, "daemon-a"
    )


def answer_when_asked(holder: PostgresStore) -> threading.Thread:
    """The holder: takes the request once it is there and answers it."""

    def serve() -> None:
        taken: list[Handoff] = []

        def take() -> bool:
            taken.extend(holder.take_handoffs("daemon-b", ["checkout"], 100.0))
            return bool(taken)

        poll(take, timeout=30, interval=0.05, what="the request to be handed off")
        for handoff in taken:
            holder.answer_handoff(handoff.id, {"ok": True, "rollback_id": 3}, 101.0)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def test_the_holders_answer_is_returned(stores: tuple[PostgresStore, PostgresStore]) -> None:
    asker_store, holder = stores

    async def ask() -> object:
        wakeups = Wakeups()
        wakeups.bind(asyncio.get_running_loop())
        listening = asker_store.listen(wakeups.wake)
        try:
            return await Asker(asker_store, "daemon-a", wakeups).ask(approval())
        finally:
            await asyncio.to_thread(listening.close)

    holder_thread = answer_when_asked(holder)
    answer = asyncio.run(ask())
    holder_thread.join()
    assert answer == {"ok": True, "rollback_id": 3}


def test_a_request_no_holder_takes_is_withdrawn_and_never_taken_later(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    asker_store, holder = stores

    async def ask() -> None:
        asker = Asker(asker_store, "daemon-a", Wakeups(), take_wait=0.5)
        await asker.ask(approval())

    with pytest.raises(NotAnswered, match=r"took the request within 0\.5s: nothing was done"):
        asyncio.run(ask())
    assert holder.take_handoffs("daemon-b", ["checkout"], 200.0) == []


def test_a_request_taken_but_not_answered_says_where_to_look(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    asker_store, holder = stores

    def take_only() -> None:
        poll(
            lambda: bool(holder.take_handoffs("daemon-b", ["checkout"], 100.0)),
            timeout=30,
            interval=0.05,
            what="the request to be handed off",
        )

    async def ask() -> None:
        asker = Asker(asker_store, "daemon-a", Wakeups(), take_wait=30, answer_wait=0.5)
        await asker.ask(approval())

    thread = threading.Thread(target=take_only)
    thread.start()
    with pytest.raises(NotAnswered, match=r"\(daemon-b\) took the request but did not answer"):
        asyncio.run(ask())
    thread.join()
