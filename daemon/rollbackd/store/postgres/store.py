"""The PostgreSQL :class:`PostgresStore`: every aggregate's tables over one
:class:`Database`."""

from __future__ import annotations

from rollbackd.store.interfaces import StateStore
from rollbackd.store.postgres.alerts import PostgresAlerts
from rollbackd.store.postgres.check_states import PostgresCheckStates
from rollbackd.store.postgres.events import PostgresEvents
from rollbackd.store.postgres.handoffs import PostgresHandoffs
from rollbackd.store.postgres.leases import PostgresLeases
from rollbackd.store.postgres.rollbacks import PostgresRollbacks
from rollbackd.store.postgres.services import PostgresServices
from rollbackd.store.postgres.versions import PostgresVersions


class PostgresStore(
    PostgresVersions,
    PostgresServices,
    PostgresCheckStates,
    PostgresRollbacks,
    PostgresAlerts,
    PostgresEvents,
    PostgresLeases,
    PostgresHandoffs,
    StateStore,
):
    """The PostgreSQL state store, which several daemons may share. ``url`` is a libpq URI
    (``postgresql://user@host:port/dbname?sslmode=verify-full``, TLS and other options as
    libpq takes them); ``password``, when given, wins over one in the URL and is never
    shown (``location`` is the URL without it). Opening migrates the schema. Each
    aggregate is a mixin of its own module, all sharing the connections of
    :class:`~rollbackd.store.postgres.database.Database`; ``StateStore`` last, so that mypy
    checks the whole contract is implemented and every method inherits its docstring."""
