"""A release history written straight into a store, for store tests."""

from __future__ import annotations

from rollbackd.core.model import VersionSource
from rollbackd.store.interfaces import StateStore


def deploy(store: StateStore, service: str, *versions: str, start: float = 1000.0) -> None:
    """Deploy ``versions`` in order, 100 s apart."""
    current = store.service_state(service)
    previous = None if current is None else current.current_version
    for index, version in enumerate(versions):
        store.record_version_change(
            service, previous, version, start + 100 * index, VersionSource.DISCOVERED
        )
        previous = version
