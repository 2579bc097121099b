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
