"""The state store on PostgreSQL: what rollbackd must remember, shared by several daemons.

The same Protocols (:mod:`rollbackd.store.interfaces`) and behaviour as the SQLite store
(``store/sqlite/``), module for module:

* ``connections``: the URL without its password, the write and read sessions;
* ``database``: one write connection under a lock, a pool of read-only ones,
  transactions, errors;
* ``migrations``: the schema, numbered as SQLite's, applied under an advisory lock;
* ``versions``, ``services``, ``check_states``, ``rollbacks``, ``alerts``, ``events``,
  ``leases``: one aggregate's tables each, as a mixin of :class:`PostgresStore`;
* ``rows`` (``store/rows.py``, shared by both backends): rows to dataclasses and back;
* ``store``: :class:`PostgresStore`, all of them together.

Errors (:mod:`rollbackd.store.errors`)::

    StoreError              the store cannot do what was asked; wraps psycopg.Error
    ├── SchemaTooNewError   the database was written by a newer rollbackd
    └── ConflictError       a write was based on a state that changed meanwhile
"""

from __future__ import annotations

from rollbackd.store.postgres.migrations import MIGRATIONS, SCHEMA_VERSION
from rollbackd.store.postgres.store import PostgresStore

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresStore"]
