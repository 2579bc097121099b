"""The state store on SQLite: what rollbackd must remember across restarts, in one file.

All SQL of the project lives in this package, behind the Protocols of
:mod:`rollbackd.store.interfaces`. Its modules:

* ``database``: the file's connections (one writer, pooled readers), pragmas, transactions;
* ``migrations``: the schema, as numbered migrations;
* ``versions``, ``services``, ``check_states``, ``rollbacks``, ``alerts``, ``events``,
  ``leases``: one aggregate's tables each, as a mixin of :class:`Store`;
* ``rows`` (``store/rows.py``, shared by both backends): rows to dataclasses and back;
* ``store``: :class:`Store`, all of them together.

Errors (:mod:`rollbackd.store.errors`)::

    StoreError              the store cannot do what was asked; wraps sqlite3.Error
    ├── SchemaTooNewError   the database was written by a newer rollbackd
    └── ConflictError       a write was based on a state that changed meanwhile
"""

from __future__ import annotations

from rollbackd.store.sqlite.database import BUSY_TIMEOUT
from rollbackd.store.sqlite.migrations import MIGRATIONS, SCHEMA_VERSION
from rollbackd.store.sqlite.store import Store

__all__ = ["BUSY_TIMEOUT", "MIGRATIONS", "SCHEMA_VERSION", "Store"]
