"""Every daemon takes every request: what one that does not hold a service hands to the
daemon that does, through the shared store.

Two kinds of work reach a daemon that does not hold the service (Alertmanager pointed at
every daemon, or at a load balancer; a person's API call to any of them):

- **An alert.** Stored once in the database by whichever daemon receives it, and left
  unhandled there (``alert_intake``); the holder's ``Relay`` finds it and hands it to its
  own pipeline.
- **A request only the holder may carry out** (approve, reject, a manual rollback, a
  release). The daemon that took it stores it as a handoff and waits (``Asker``); the
  holder's ``Relay`` takes it, carries it out (``handoff_desk``) and writes the answer,
  which the asker returns to its caller as if it had done the work itself.

The holder looks when the store wakes it (PostgreSQL's ``NOTIFY``, sent at the commit of
the alert or the request, arrives within milliseconds) and, because a wake-up can be lost
while the database is unreachable, every ``POLL`` seconds anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Protocol

from rollbackd.core.model import HandoffDraft, JSONValue, Lease
from rollbackd.logs import get_logger
from rollbackd.runtime.handoff_desk import Answer, HandoffDesk
from rollbackd.store.errors import StoreError
from rollbackd.store.interfaces import StateStore
from rollbackd.store.writer import writer_for

log = get_logger("rollbackd.relay")

POLL = 1.0
"""Seconds between looks for work when nothing woke the relay: the bound on how late the
holder acts on an alert or a request whose wake-up was lost."""

TAKE_WAIT = 10.0
"""Seconds an asker waits for a holder to take its request; then it withdraws it (nothing
was done) and says so."""

ANSWER_WAIT = 30.0
"""Seconds an asker waits for the answer of a request a holder has taken (an approval
answers at once; the rollback it starts runs on without it)."""

ASKER_POLL = 0.25
"""Seconds between an asker's reads of its request when no wake-up came."""


class NotAnswered(StoreError):
    """No holder answered a handed-off request in time (the API's 503, with why)."""


class Holder(Protocol):
    """Who this daemon is among those sharing the store, and what it holds now."""

    @property
    def member(self) -> str: ...

    def held(self) -> Mapping[str, Lease]: ...


class Wakeups:
    """The store's wake-ups (from its listener's thread) turned into asyncio events."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: set[asyncio.Event] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def wake(self) -> None:
        """Thread-safe: called by the store's listener."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._set_all)

    def _set_all(self) -> None:
        for event in self._events:
            event.set()

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._events.add(event)
        try:
            yield event
        finally:
            self._events.discard(event)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` passes; the event is cleared for the next."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=timeout)
    event.clear()


class Asker:
    """Hands a request to the service's holder and waits for its answer."""

    def __init__(
        self,
        store: StateStore,
        member: str,
        wakeups: Wakeups,
        clock: Callable[[], float] = time.time,
        *,
        take_wait: float = TAKE_WAIT,
        answer_wait: float = ANSWER_WAIT,
    ) -> None:
        self._store = store
        self.member = member
        self._wakeups = wakeups
        self._clock = clock
        self._take_wait = take_wait
        self._answer_wait = answer_wait

    async def ask(self, draft: HandoffDraft) -> Answer:
        """The holder's answer. Raises NotAnswered when no holder took it in time (then
        nothing was done) or took it and did not answer in time (then what it did is in
        the store: the rollback's history says)."""
        writer = writer_for(self._store)
        with self._wakeups.subscribe() as woken:
            handoff_id = await writer.hand_off(draft, self._clock())
            log.info(
                "request handed to the holder",
                service=draft.service,
                kind=draft.kind.value,
                handoff_id=handoff_id,
            )
            loop = asyncio.get_running_loop()
            take_by = loop.time() + self._take_wait
            answer_by = take_by + self._answer_wait
            while True:
                found = await asyncio.to_thread(self._store.handoff, handoff_id)
                if found is not None and found.answer is not None:
                    return found.answer
                now = loop.time()
                if found is not None and found.taken_by is None and now >= take_by:
                    if await writer.withdraw_handoff(handoff_id, self._clock()):
                        raise NotAnswered(
                            f"no daemon holding service {draft.service!r} took the request "
                            f"within {self._take_wait:g}s: nothing was done"
                        )
                    continue  # taken just now: wait for its answer
                if now >= answer_by:
                    taker = found.taken_by if found is not None else None
                    raise NotAnswered(
                        f"the holder of service {draft.service!r} ({taker}) took the request "
                        f"but did not answer within {self._answer_wait:g}s: see the service's "
                        "rollbacks for what it did"
                    )
                await _wait(woken, ASKER_POLL)


class Relay:
    """The holder's side: alerts left unhandled and requests handed off, for the services
    this daemon holds, carried out as they come."""

    def __init__(
        self,
        store: StateStore,
        holder: Holder,
        desk: HandoffDesk,
        hand_over_alerts: Callable[[Sequence[str]], Awaitable[int]],
        wakeups: Wakeups,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._holder = holder
        self._desk = desk
        self._hand_over_alerts = hand_over_alerts
        self._wakeups = wakeups
        self._clock = clock
        self._failing = False

    async def run(self, stop: asyncio.Event) -> None:
        """Look for work at every wake-up and every ``POLL`` seconds, until ``stop``."""
        with self._wakeups.subscribe() as woken:
            while not stop.is_set():
                await self.look()
                await _wait(woken, POLL)

    async def look(self) -> None:
        """One round: the held services' waiting alerts, then their handed-off requests.
        A store failure is logged once; the next round tries again."""
        services = sorted(self._holder.held())
        if not services:
            return
        try:
            await self._hand_over_alerts(services)
            await self._answer_requests(services)
        except StoreError as exc:
            if not self._failing:
                log.error("cannot look for handed-off work", error=str(exc))
            self._failing = True
        except Exception as exc:  # a bug must not end the relay: log, go on
            log.error("relay round crashed", error=repr(exc))
        else:
            self._failing = False

    async def _answer_requests(self, services: list[str]) -> None:
        writer = writer_for(self._store)
        member = self._holder.member
        taken = await writer.take_handoffs(member, services, self._clock())
        for handoff in taken:
            answer: Mapping[str, JSONValue] = await self._desk.answer(handoff)
            await writer.answer_handoff(handoff.id, answer, self._clock())
            log.info(
                "handed-off request answered",
                service=handoff.service,
                kind=handoff.kind.value,
                handoff_id=handoff.id,
                asked_by=handoff.asked_by,
                ok=answer.get("ok") is True,
            )
