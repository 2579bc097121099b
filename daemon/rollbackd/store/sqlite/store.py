"""The SQLite :class:`Store`: every aggregate's tables over one :class:`Database` file."""

from __future__ import annotations

from rollbackd.store.interfaces import StateStore
from rollbackd.store.sqlite.alerts import SQLiteAlerts
from rollbackd.store.sqlite.check_states import SQLiteCheckStates
from rollbackd.store.sqlite.events import SQLiteEvents
from rollbackd.store.sqlite.handoffs import SQLiteHandoffs
from rollbackd.store.sqlite.leases import SQLiteLeases
from rollbackd.store.sqlite.rollbacks import SQLiteRollbacks
from rollbackd.store.sqlite.services import SQLiteServices
from rollbackd.store.sqlite.versions import SQLiteVersions


class Store(
    SQLiteVersions,
    SQLiteServices,
    SQLiteCheckStates,
    SQLiteRollbacks,
    SQLiteAlerts,
    SQLiteEvents,
    SQLiteLeases,
    SQLiteHandoffs,
    StateStore,
):
    """The SQLite state store. ``path`` is the database file itself; its directory must
    exist (it is the daemon's state_dir, whose ownership is not ours to decide). Each
    aggregate is a mixin of its own module, all sharing the connections of
    :class:`~rollbackd.store.sqlite.database.Database`; ``StateStore`` last, so that mypy
    checks the whole contract is implemented and every method inherits its docstring."""
