"""The lease keeper: which services this daemon holds when several share one PostgreSQL.

Every tick the keeper says it is alive (a member heartbeat), works out from the live members
which services it should hold, takes the free or expired ones among them, renews the ones it
holds and gives back the ones another member should now hold (a member that joined takes
them at its next tick). Every member computes the same split from the same live members:
rendezvous (highest-random-weight) hashing, with each member's load bounded to its fair
share, so the split is deterministic, fair, and moves few services when a member joins or
leaves.

Acting is judged by this daemon's monotonic clock, never the database's: a lease counts as
held only until (the moment just before its renewal or acquisition was sent) + lease_time *
SAFETY. The database can only have started the lease's time later than that, so a daemon
that cannot renew (the database unreachable, the process paused) stops acting before the
database lets another daemon take the lease over.

Leases are held by member name, so two daemons given one ``[store] member`` would share
them, epochs and all. Each keeper heartbeats with a random id of its own process
(``instance``), and the store refuses a heartbeat while the name is live for another
(``MemberTakenError``): at start the daemon refuses to run; later (the other started while
this one was cut off) this one stops acting on everything and gives nothing back, since
what it would give back is the other's now.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from rollbackd.core.model import Fence, Lease
from rollbackd.logs import get_logger
from rollbackd.runtime.metrics import Metrics
from rollbackd.runtime.tenancy import NotHolder
from rollbackd.store.errors import MemberTakenError, StoreError
from rollbackd.store.interfaces import LeaseStore

log = get_logger("rollbackd.leases")

SAFETY = 0.8
"""The share of the lease time this daemon acts on a lease after sending its renewal: the
rest is the margin for clock drift between this host and the database, and for a renewal
that is slow to arrive."""

START_MARGIN = 0.2
"""Seconds past a predecessor's heartbeat expiry that a starting keeper waits before its
last try (the database's clock and this host's run at slightly different rates)."""

ACQUIRE_BATCH = 500
"""Services asked for in one acquire: one round trip each, so that taking a share of
thousands fits well within a lease time."""

T = TypeVar("T")


def default_member() -> str:
    """``<hostname>-<pid>-<4 random hex>``: unique per process, even for a restart that
    reuses a pid, and readable in ``rollbackd status``."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def _weight(service: str, member: str) -> int:
    digest = hashlib.sha256(f"{service}\0{member}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def assign(services: Sequence[str], members: Sequence[str]) -> dict[str, list[str]]:
    """Each live member's services: every service goes to the member of the highest weight
    for it (rendezvous hashing) that still has room below ceil(services / members).

    Plain rendezvous hashing is fair only on average (12 services over 2 members is 9:3
    one time in seven); the bound makes it fair always, and moves only the services that
    overflow a member. Services are placed in sorted order, so that every member computes
    the same split."""
    split: dict[str, list[str]] = {member: [] for member in sorted(set(members))}
    if not split:
        return split
    unique = sorted(set(services))
    room = math.ceil(len(unique) / len(split))
    for service in unique:
        ranked = sorted(split, key=lambda member: _weight(service, member), reverse=True)
        owner = next(member for member in ranked if len(split[member]) < room)
        split[owner].append(service)
    return split


def _inherited(lease: Lease, ttl: float) -> bool:
    """Whether ``acquire`` renewed a tenure begun before it (the store's renewal of the same
    holder's live lease) rather than beginning one: a new tenure starts at the acquisition,
    so it expires exactly ttl after it began."""
    return lease.expires_at - lease.acquired_at > ttl + 1e-3


@dataclass(frozen=True)
class _Held:
    lease: Lease
    deadline: float
    """This daemon's monotonic clock: acting on the lease stops here."""


class LeaseKeeper:
    """The ``Tenancy`` of a daemon sharing PostgreSQL with others: holds some services
    through leases (``LeaseStore``), and may act only on those while sure to hold them."""

    def __init__(
        self,
        store: LeaseStore,
        member: str,
        lease_time: float,
        services: Callable[[], Sequence[str]],
        clock: Callable[[], float] = time.monotonic,
        *,
        metrics: Metrics | None = None,
        instance: str | None = None,
    ) -> None:
        if not member:
            raise ValueError("a member id may not be empty")
        if not (math.isfinite(lease_time) and lease_time > 0):
            raise ValueError(f"lease_time must be a positive number of seconds: {lease_time}")
        self.store = store
        self.member = member
        self.instance = instance or secrets.token_hex(8)
        """This process among any that were given the same member name."""
        self.lease_time = lease_time
        self._services = services
        self._clock = clock
        self._metrics = metrics
        self._held: dict[str, _Held] = {}
        self.on_acquired: Callable[[list[str]], None] | None = None
        """Called with the services whose leases this daemon just took (not renewed),
        before it acts on them: what it kept in memory about them may be stale, as another
        daemon held them."""
        self._failing = False
        self._taken = False
        """Another process runs as this member: nothing is held until it is gone."""
        # Its own thread, not the store writer's: a renewal must never queue behind a slow
        # rollback's writes there, or the daemon would lose its leases while busy. (Inside
        # the store it still takes the store's write lock, for one short statement.)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollbackd-leases")

    # --- Tenancy -------------------------------------------------------------------------

    def may_act(self, service: str) -> bool:
        held = self._held.get(service)
        return held is not None and self._clock() < held.deadline

    def fence(self, service: str) -> Fence | None:
        held = self._held.get(service)
        if held is None or self._clock() >= held.deadline:
            raise NotHolder(service)
        return Fence(holder=self.member, epoch=held.lease.epoch)

    def evaluates(self, service: str) -> bool:
        # A lease leaves _held when it is given back or a renewal finds it lost, never
        # merely by lapsing: one that lapsed while the store was unreachable stays here.
        return service in self._held

    def held(self) -> dict[str, Lease]:
        """The leases this daemon holds and may act on now, by service (for status)."""
        now = self._clock()
        return {s: h.lease for s, h in sorted(self._held.items()) if now < h.deadline}

    # --- the work ------------------------------------------------------------------------

    async def start(self) -> None:
        """The first tick, before the daemon acts on anything. Raises MemberTakenError when
        another live daemon runs as this member. A member row still live for another
        process may be this daemon's previous run, killed: it is waited out (up to the
        lease time) once, and only a row renewed meanwhile refuses the start."""
        try:
            await self._tick_logged(refuse=True)
        except MemberTakenError as exc:
            wait = min(max(exc.expires_at - exc.now, 0.0), self.lease_time) + START_MARGIN
            log.warning(
                "member name live for another process: waiting for it to lapse",
                member=self.member,
                seconds=round(wait, 1),
            )
            await asyncio.sleep(wait)
            await self._tick_logged(refuse=True)

    async def tick(self) -> None:
        """One round: heartbeat, then acquire, renew and release toward this member's
        share. A store failure is logged once; the deadlines kept lapse by themselves."""
        await self._tick_logged(refuse=False)

    async def _tick_logged(self, *, refuse: bool) -> None:
        try:
            await self._tick()
        except MemberTakenError as exc:
            self._drop_all_for_taken(exc, refuse=refuse)
            if refuse:
                raise
        except StoreError as exc:
            if not self._failing:
                log.error(
                    "cannot renew leases: acting only until they lapse",
                    member=self.member,
                    error=str(exc),
                )
            self._failing = True
        else:
            if self._failing:
                log.info("leases renewed again", member=self.member, held=len(self._held))
            if self._taken:
                log.info("member name free again: holding leases", member=self.member)
            self._failing = self._taken = False
        finally:
            self._count()

    def _drop_all_for_taken(self, exc: MemberTakenError, *, refuse: bool) -> None:
        """Stop acting on everything, releasing nothing: the leases under this member
        name are the other process's now (a release would end its tenure)."""
        if not self._taken and not refuse:
            log.critical(
                "another daemon runs as this member: acting on nothing",
                member=self.member,
                dropped=len(self._held),
                error=str(exc),
            )
        self._held.clear()
        self._taken = True

    async def _tick(self) -> None:
        ttl = self.lease_time
        members = await self._call(self.store.heartbeat, self.member, ttl, self.instance)
        if self.member not in members:  # our own heartbeat is live: a store in doubt
            members = sorted([*members, self.member])
        wanted = set(assign(self._services(), members)[self.member])
        await self._renew(sorted(s for s in self._held if s in wanted))
        for service in sorted(s for s in self._held if s not in wanted):
            # Stop acting first, then hand it over: never both daemons at once.
            del self._held[service]
            self._count()  # the gauge says so at once, not at the end of the tick
            await self._call(self.store.release, service, self.member)
            log.info("lease handed back", service=service, member=self.member)
        missing = sorted(wanted - self._held.keys())
        for start in range(0, len(missing), ACQUIRE_BATCH):
            await self._acquire(missing[start : start + ACQUIRE_BATCH])

    async def _acquire(self, services: list[str]) -> None:
        """Take what is free or expired among ``services``, in one round trip; those still
        live for their old holders are taken when they lapse or are given back."""
        ttl = self.lease_time
        sent = self._clock()
        won = await self._call(self.store.acquire_many, services, self.member, ttl)
        taken: list[tuple[Lease, float]] = []
        for lease in won:
            taken_at = sent
            if _inherited(lease, ttl):
                # Live under this member name, but begun by another process (this daemon's
                # previous run, killed; or the one that had the name meanwhile): a tenure of
                # its own, so that whatever that process began stays fenced off.
                await self._call(self.store.release, lease.service, self.member)
                taken_at = self._clock()
                again = await self._call(self.store.acquire, lease.service, self.member, ttl)
                if again is None:
                    continue
                lease = again
            taken.append((lease, taken_at))
        if taken and self.on_acquired is not None:
            # Before acting on any of them: nothing awaits between this and _keep.
            self.on_acquired([lease.service for lease, _ in taken])
        for lease, taken_at in taken:
            self._keep(lease, taken_at)
            log.info("lease acquired", service=lease.service, epoch=lease.epoch, member=self.member)
            if lease.epoch > 1 and self._metrics is not None:
                self._metrics.lease_takeovers.inc()

    async def _renew(self, services: list[str]) -> None:
        if not services:
            return
        sent = self._clock()
        renewed = await self._call(self.store.renew, self.member, services, self.lease_time)
        for lease in renewed:
            self._keep(lease, sent)
        lost = set(services) - {lease.service for lease in renewed}
        for service in sorted(lost):
            # Expired by the database's clock before the renewal came: maybe taken over.
            del self._held[service]
            log.warning("lease lost: not renewed in time", service=service, member=self.member)

    def _keep(self, lease: Lease, sent: float) -> None:
        self._held[lease.service] = _Held(lease, sent + self.lease_time * SAFETY)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every lease_time / 3 until ``stop``; then give every lease back, so that a
        clean restart (or stop) hands the services over at once."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception as exc:  # a bug must not end the renewals: log, go on
                log.error("lease tick crashed", member=self.member, error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.lease_time / 3)
        await self.release_all()

    async def release_all(self) -> None:
        """Give every held lease back (stop acting on each first)."""
        services = sorted(self._held)
        self._held.clear()
        self._count()
        if self._taken:
            return  # the member name is another process's: nothing here to give back
        try:
            for service in services:
                await self._call(self.store.release, service, self.member)
            # Gone from the live members too (ttl 0: dead at once), so that the others
            # count without it at their next tick and take its share, not only its leases.
            await self._call(self.store.heartbeat, self.member, 0.0, self.instance)
        except StoreError as exc:
            log.warning("leases not released: they expire by themselves", error=str(exc))

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    async def _call(self, func: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func, *args)

    def _count(self) -> None:
        if self._metrics is not None:
            self._metrics.leases_held.set(len(self.held()))


__all__ = ["SAFETY", "START_MARGIN", "LeaseKeeper", "assign", "default_member"]
