"""What a store raises, whatever its backend."""

from __future__ import annotations


class StoreError(Exception):
    """The state store cannot do what was asked."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer rollbackd, whose schema this one does not know."""


class ConflictError(StoreError):
    """A write was based on a state that another writer changed meanwhile."""


class FencedError(StoreError):
    """A fenced write was refused: the writer does not hold the service's lease with the
    fence's epoch now (it expired, or another daemon took it over). Nothing was written."""


class MemberTakenError(StoreError):
    """A heartbeat found its member name live for another process (``instance``): two
    daemons were given the same ``[store] member``. Nothing was written. ``expires_at``
    and ``now`` (the store's clock) say how long the other's heartbeat has still to run."""

    def __init__(self, member: str, location: str, *, expires_at: float, now: float) -> None:
        super().__init__(
            f"another daemon is running as member {member!r} on {location}: "
            "give each daemon its own [store] member"
        )
        self.member = member
        self.location = location
        self.expires_at = expires_at
        self.now = now
