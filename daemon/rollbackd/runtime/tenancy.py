"""Which services this daemon may act on, and the fence its writes about them carry.

One daemon alone (the SQLite store) holds every service, unfenced: ``SoloTenancy``. Several
daemons sharing PostgreSQL each hold some services through leases (``runtime/leases.py``):
a daemon evaluates, bakes and rolls back only what it holds, and every rollback state change
it writes carries its lease's epoch, so that one that lost its lease cannot act on stale
belief.
"""

from __future__ import annotations

from typing import Protocol

from rollbackd.core.model import Fence


class NotHolder(Exception):
    """This daemon does not hold the service's lease now: another daemon acts on it."""

    def __init__(self, service: str) -> None:
        super().__init__(f"this daemon does not hold service {service!r} now")
        self.service = service


class Tenancy(Protocol):
    def may_act(self, service: str) -> bool:
        """Whether this daemon holds ``service`` now and is sure to hold it a while yet
        (its lease renewed recently enough that it cannot have expired)."""
        ...

    def fence(self, service: str) -> Fence | None:
        """The fence for a write about ``service``: None when writes need none (one daemon
        alone). Raises ``NotHolder`` when this daemon may not act on it."""
        ...

    def evaluates(self, service: str) -> bool:
        """Whether this daemon evaluates ``service``'s checks: while it may act on it, and
        also while it cannot reach the store to renew a lease it held (it acts on nothing
        then, but its check states stay current for when the store is back)."""
        ...


class SoloTenancy:
    """One daemon alone: it holds every service, and its writes need no fence."""

    def may_act(self, service: str) -> bool:
        return True

    def fence(self, service: str) -> Fence | None:
        return None

    def evaluates(self, service: str) -> bool:
        return True
