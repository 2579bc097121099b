"""Who holds each service, for ``status``: the live leases, this daemon's member name, and
the check states the holders saved of the services this daemon does not hold.

A daemon evaluates only what it holds, so what it has in memory about another daemon's
service is stale (what it knew when it last held it, or nothing). Status shows that
service's checks as its holder saved them (``check_states``, written by
``check_state_keeper.py``) instead. Alone (SQLite, ``SoloTenancy``) a daemon holds every
service: nothing is read here, and status shows exactly what it showed before leases.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rollbackd.core.check_state import CheckState
from rollbackd.core.model import Lease
from rollbackd.runtime.check_state_keeper import Key, stored_states
from rollbackd.runtime.leases import LeaseKeeper
from rollbackd.runtime.tenancy import Tenancy
from rollbackd.store.interfaces import StateStore


@dataclass(frozen=True)
class Holdings:
    """Who holds what now (a read for status; empty alone)."""

    member: str | None = None
    """This daemon's member name; None when it is alone (SQLite)."""
    leases: Mapping[str, Lease] = field(default_factory=dict)
    """The live lease of each service that has one, by the store's clock."""
    elsewhere: frozenset[str] = frozenset()
    """The services this daemon does not hold now: their checks are shown as stored."""
    stored_checks: Mapping[Key, CheckState] = field(default_factory=dict)
    """The saved check states of the services ``elsewhere``; a check without a row has a
    blank state (the keeper deletes a row that would be blank)."""

    def check_state(self, service: str, check: str) -> CheckState | None:
        """The stored state to show for a check of a service held elsewhere; None for one
        this daemon holds (its own state in memory is the one to show)."""
        if service not in self.elsewhere:
            return None
        return self.stored_checks.get((service, check)) or CheckState(series={})


async def read_holdings(store: StateStore, tenancy: Tenancy, names: Sequence[str]) -> Holdings:
    """What status shows of the leases of ``names``. Which services this daemon holds is
    asked on the loop (the keeper's state lives there); the store is read in a thread."""
    if not isinstance(tenancy, LeaseKeeper):
        return Holdings()
    elsewhere = frozenset(n for n in names if not tenancy.may_act(n))
    return await asyncio.to_thread(_read, store, tenancy.member, elsewhere)


def _read(store: StateStore, member: str, elsewhere: frozenset[str]) -> Holdings:
    leases = {lease.service: lease for lease in store.live_leases()}
    checks = stored_states(store, elsewhere) if elsewhere else {}
    return Holdings(member, leases, elsewhere, checks)


__all__ = ["Holdings", "read_holdings"]
