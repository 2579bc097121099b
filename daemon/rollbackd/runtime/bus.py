"""The event bus: the audit log, the log, then the notifiers, in that order."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from rollbackd.core.model import Event, JSONValue
from rollbackd.logs import get_logger
from rollbackd.store.interfaces import StateStore
from rollbackd.store.writer import writer_for

log = get_logger("rollbackd.events")


class EventBus:
    """Every event goes through here: into the audit log first (the record comes before
    anything else), then to the log, then to the subscribers (notifiers), which must not
    block — they queue."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._subscribers: list[Callable[[Event], None]] = []

    def subscribe(self, subscriber: Callable[[Event], None]) -> None:
        self._subscribers.append(subscriber)

    async def publish(
        self,
        kind: str,
        at: float,
        service: str | None = None,
        *,
        rollback_id: int | None = None,
        data: Mapping[str, JSONValue] | None = None,
    ) -> Event:
        """Record the event (on the store's writer thread, so a slow disk never stalls the
        loop), log it, then hand it to the subscribers."""
        event = Event(type=kind, at=at, service=service, rollback_id=rollback_id, data=data or {})
        event_id = await writer_for(self.store).add_event(event)
        stored = replace(event, id=event_id)
        log.info(kind, service=service, rollback_id=rollback_id)
        for subscriber in self._subscribers:
            try:
                subscriber(stored)
            except Exception:  # a broken notifier must never stop the pipeline
                log.exception("event subscriber failed", event=kind)
        return stored
