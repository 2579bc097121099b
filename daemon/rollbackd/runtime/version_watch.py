"""What runs, per service: its version (from ``version_query`` or a release recorded through
the API) and whether a canary is in progress.

Every version change, however it was learnt, is announced the same way: the version
metrics, a ``version.changed`` event and, for a version marked bad before,
``release.bad_version_deployed``. The version itself is kept by the ``VersionTracker``
(``versions.py``); this module queries Prometheus for it and says what it found.

``read_running`` is the read-only twin of ``observe``: the version Prometheus answers now,
written nowhere, for verification, which must not move the version the daemon tracks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from rollbackd.config.loader import Service
from rollbackd.core.model import JSONValue
from rollbackd.core.samples import QueryResult
from rollbackd.core.version_names import is_valid_version
from rollbackd.logs import get_logger
from rollbackd.prometheus import PrometheusClient, PrometheusError, QueryError
from rollbackd.runtime.bus import EventBus
from rollbackd.runtime.metrics import Metrics
from rollbackd.runtime.versions import (
    VersionObservation,
    VersionTracker,
    pick_current,
)
from rollbackd.store.interfaces import StateStore
from rollbackd.store.writer import writer_for

log = get_logger("rollbackd.engine")

REJECTED_LOGGED_LIMIT = 64
"""Rejected version labels remembered per service as already logged."""


def query_outcome(exc: PrometheusError) -> str:
    """The ``outcome`` label of ``rollbackd_prometheus_queries_total`` for a failed query."""
    if isinstance(exc, QueryError):
        return "bad_query"
    reason = getattr(exc, "reason", "unavailable")
    return str(reason)


@dataclass
class _Watched:
    """What the last readings of one service showed."""

    canary: bool = False
    running: tuple[str, ...] = ()
    """Every valid version version_query answered last time (a canary runs two)."""
    rejected_logged: set[str] = field(default_factory=set)
    """Rejected version labels already logged: a broken exporter is reported once per
    value, not once per poll."""
    version_read: bool = True
    """Whether the last version_query answered: a version never bakes at a poll that could
    not tell which version runs (it may have just been replaced)."""


class VersionWatch:
    def __init__(
        self,
        client: PrometheusClient,
        store: StateStore,
        versions: VersionTracker,
        metrics: Metrics,
        bus: EventBus,
    ) -> None:
        self.client = client
        self.store = store
        self.versions = versions
        self.metrics = metrics
        self.bus = bus
        self._watched: dict[str, _Watched] = {}

    def canary_active(self, service: str) -> bool:
        watched = self._watched.get(service)
        return watched.canary if watched else False

    def running(self, service: str) -> tuple[str, ...]:
        """The valid versions the last answer of version_query named."""
        watched = self._watched.get(service)
        return watched.running if watched else ()

    def version_read(self, service: str) -> bool:
        """Whether the last version_query answered (True without one)."""
        watched = self._watched.get(service)
        return watched.version_read if watched else True

    async def observe_version(self, service: Service, now: float) -> VersionObservation | None:
        """Read the running version from version_query and record it; the reading (None
        without version_query, or when it failed). A change is not announced here: the
        engine first forgets what belonged to the version replaced, then calls
        ``announce_discovered``."""
        query = service.rules.service.version_query
        if not query:
            return None
        watched = self._watched.setdefault(service.name, _Watched())
        try:
            result = await self.client.aquery(query, at=now)
        except PrometheusError as exc:
            watched.version_read = False
            self.metrics.queries.labels(query_outcome(exc)).inc()
            log.warning("version query failed", service=service.name, error=str(exc))
            return None
        watched.version_read = True
        self.metrics.queries.labels("ok").inc()
        return await self._observe_version(service, result, now)

    async def observe_canary(self, service: Service, now: float) -> None:
        """Read whether a canary is in progress (services with ``[canary]``)."""
        canary = service.rules.canary
        if canary is None:
            return
        watched = self._watched.setdefault(service.name, _Watched())
        try:
            result = await self.client.aquery(canary.active_query, at=now)
        except PrometheusError as exc:
            self.metrics.queries.labels(query_outcome(exc)).inc()
            log.warning("canary query failed", service=service.name, error=str(exc))
            return
        self.metrics.queries.labels("ok").inc()
        active = any(not math.isnan(s.value) and s.value != 0 for s in result.samples)
        if active != watched.canary:
            log.info("canary", service=service.name, active=active)
        watched.canary = active

    async def read_running(self, service: Service, now: float) -> str | None:
        """The version version_query answers at ``now``, picked as ``observe`` would pick a
        new one, without writing it or announcing anything; None without version_query,
        when the query failed, or when it named no valid version."""
        rules = service.rules
        if not rules.service.version_query:
            return None
        try:
            result = await self.client.aquery(rules.service.version_query, at=now)
        except PrometheusError as exc:
            self.metrics.queries.labels(query_outcome(exc)).inc()
            log.warning("version query failed", service=service.name, error=str(exc))
            return None
        self.metrics.queries.labels("ok").inc()
        label = rules.service.version_query_label
        return pick_current(list(result.samples), label, self.store.went_live_at(service.name))

    async def _observe_version(
        self, service: Service, result: QueryResult, now: float
    ) -> VersionObservation:
        label = service.rules.service.version_query_label
        # One poll of the service job: a version missing from a single answer stays current.
        poll = min((c.interval.total_seconds() for c in service.rules.check), default=15.0)
        seen = await self.versions.observe(
            service.name, list(result.samples), label, now, absence_grace=poll
        )
        watched = self._watched.setdefault(service.name, _Watched())
        # Only valid versions: the stable track named from here reaches check reasons,
        # and through them {reason}.
        watched.running = tuple(
            sorted({v for s in result.samples if (v := s.label(label)) and is_valid_version(v)})
        )
        for reason in seen.rejected:
            if reason in watched.rejected_logged:
                continue
            if len(watched.rejected_logged) >= REJECTED_LOGGED_LIMIT:
                watched.rejected_logged.clear()  # bounded: a churning exporter logs again
            watched.rejected_logged.add(reason)
            log.warning("version label rejected", service=service.name, reason=reason)
        return seen

    async def announce_discovered(self, service: str, seen: VersionObservation, now: float) -> None:
        """Announce a change ``observe_version`` found."""
        if not seen.changed or seen.current is None:
            return
        log.info(
            "version changed",
            service=service,
            from_version=seen.previous,
            to_version=seen.current,
            detected_at_start=seen.detected_at_start,
        )
        record = self.store.version(service, seen.current)
        await self._announce(
            service,
            seen.previous,
            seen.current,
            now,
            {"detected_at_start": seen.detected_at_start},
            bad={"bad_reason": record.bad_reason} if record is not None and record.bad else None,
        )

    async def record_release(
        self, service: str, version: str, now: float, meta: Mapping[str, str], *, known_good: bool
    ) -> VersionObservation:
        """A release recorded through the API (by CI); ValueError for an invalid version.
        ``known_good``: CI vouches for it, so it bakes at once if it is the current version
        and was never marked bad (an alert-only service without Alertmanager to read has no
        other way to a last known good)."""
        seen = await self.versions.record_release(service, version, now, meta)
        if seen.changed:
            await self._announce(
                service,
                seen.previous,
                version,
                now,
                {"source": "api", "meta": dict(meta)},
                bad={"source": "api"} if seen.bad else None,
            )
        if (
            known_good
            and seen.current == version
            and await writer_for(self.store).mark_baked(service, version, now)
        ):
            await self.bus.publish(
                "version.baked",
                now,
                service,
                data={"version": version, "source": "api", "known_good": True},
            )
        return seen

    async def _announce(
        self,
        service: str,
        previous: str | None,
        current: str,
        now: float,
        extra: Mapping[str, JSONValue],
        *,
        bad: Mapping[str, JSONValue] | None,
    ) -> None:
        """A version change, however learnt: the version metrics, ``version.changed`` with
        the path's own ``extra`` fields, and, with ``bad`` (that event's own fields), the
        bad version deployed again."""
        self.metrics.version_changes.labels(service).inc()
        if previous is not None:
            with contextlib.suppress(KeyError):  # never set: the daemon started on it
                self.metrics.version_info.remove(service, previous)
        self.metrics.version_info.labels(service, current).set(1)
        await self.bus.publish(
            "version.changed",
            now,
            service,
            data={"from_version": previous, "to_version": current, **extra},
        )
        if bad is not None:
            await self.bus.publish(
                "release.bad_version_deployed", now, service, data={"version": current, **bad}
            )


__all__ = ["REJECTED_LOGGED_LIMIT", "VersionWatch", "query_outcome"]
