"""The running version of each service, its release history, bake time and last known good.

Versions come from metric labels (a service's ``version_query``) or from the API (a
release recorded by CI). Either way they are outside input that later lands in executor
arguments, so only plain version strings are accepted.

Every method takes the time as ``now``; nothing here reads a clock, so tests never wait.

Readings apply in time order, and a version missing from an answer for less than a grace
is still current: a rolling deploy's new series missing from one scrape, or a slow query
answering after a newer one, would otherwise be a release of the old version and then
another of the new one, and each release can be rolled back once.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from rollbackd.core.model import ServiceState, VersionSource
from rollbackd.core.samples import Sample
from rollbackd.core.version_names import is_valid_version
from rollbackd.runtime.bake_evidence import Judgement
from rollbackd.store.errors import StoreError
from rollbackd.store.interfaces import StateStore
from rollbackd.store.writer import writer_for

TOUCH_FLUSH_EVERY = 5.0
"""Seconds between writes of ``last_seen``: the sightings of every service in between go in
one transaction. Written per sighting, it was one fsync per service per interval
(``synchronous=FULL``): at 2,000 services a third of the event loop's time, when the store
was written from the loop."""


ABSENCE_GRACE = 15.0
"""Seconds the current version may be missing from answers that name other versions before
one of those (already known) takes over: one default poll of version_query. The engine
passes the service's own poll interval."""


def _shown(text: str) -> str:
    """Outside input made safe for one log line: quoted, escaped, and cut short."""
    return repr(text if len(text) <= 64 else text[:64] + "...")


@dataclass(frozen=True)
class Candidates:
    """The versions an answer of version_query names."""

    values: Mapping[str, float]
    """Each valid version, with the highest value of its samples."""
    rejected: tuple[str, ...]
    """Why each invalid label value was ignored, once per value, for the logs."""


def candidates(samples: Sequence[Sample], label: str) -> Candidates:
    """The valid versions in ``samples``' ``label``. Samples without the label, or with
    it empty, name no version and are skipped silently; invalid values are reported."""
    values: dict[str, float] = {}
    rejected: dict[str, None] = {}
    for sample in samples:
        version = sample.label(label)
        if not version:
            continue
        if not is_valid_version(version):
            rejected[
                f"ignored {label}={_shown(version)}: not a valid version (letters, digits "
                "and . _ + -, starting with a letter or digit, at most 128 characters)"
            ] = None
            continue
        # NaN would make every comparison false and the choice depend on input order.
        value = -math.inf if math.isnan(sample.value) else sample.value
        values[version] = max(value, values.get(version, -math.inf))
    return Candidates(values=values, rejected=tuple(rejected))


def choose_current(values: Mapping[str, float], went_live: Mapping[str, float]) -> str | None:
    """The version among ``values`` that appeared most recently: one not in ``went_live``
    (never seen before) wins over known ones; among known ones the one that went live
    last. Ties go to the highest sample value, then the greatest version string, so the
    answer never depends on the order Prometheus sent the series in."""
    if not values:
        return None

    def rank(version: str) -> tuple[bool, float, float, str]:
        known_at = went_live.get(version)
        return (
            known_at is None,
            -math.inf if known_at is None else known_at,
            values[version],
            version,
        )

    return max(values, key=rank)


def pick_current(
    samples: Sequence[Sample], label: str, known_first_seen: Mapping[str, float]
) -> str | None:
    """The current version in an answer of version_query that may name several (a
    rolling deploy, or series not stale yet): see ``choose_current``. Invalid labels are
    ignored; ``candidates`` tells why."""
    return choose_current(candidates(samples, label).values, known_first_seen)


@dataclass(frozen=True)
class Decision:
    """What one answer naming at least one valid version does to the current version."""

    current: str
    """The current version after the answer."""
    since: float | None
    """When ``current`` went live, for a change; None when the current version stays."""
    missing_since: float | None
    """While the current version is held though missing: since when it has been missing."""


def decide(
    stored: str | None,
    values: Mapping[str, float],
    went_live: Mapping[str, float],
    missing_since: float | None,
    now: float,
    grace: float,
) -> Decision:
    """The current version after an answer naming ``values`` (not empty) at ``now``.

    A version never seen before takes over at once: that is a release. While the current
    version answers, it stays (unless a never-seen one appears), and its absence is over.
    When it is missing and another known version answers, the current one is held until
    it has been missing for ``grace`` since ``missing_since`` (the first such answer);
    then the other takes over, dated when it was first seen in its place, so that the
    grace does not make a release look later than it was."""
    picked = choose_current(values, went_live)
    if picked is None:
        raise ValueError("an answer that names no version decides nothing")
    if stored is None or picked == stored or stored in values or picked not in went_live:
        return Decision(picked, None if picked == stored else now, None)
    since = now if missing_since is None else missing_since
    if now - since >= grace:
        return Decision(picked, since, None)
    return Decision(stored, None, since)


@dataclass(frozen=True)
class _Missing:
    """The current version has been missing from answers naming others since ``since``."""

    version: str
    since: float


@dataclass(frozen=True)
class VersionObservation:
    """What one reading of a service's version found."""

    current: str | None
    """The current version after this reading. When the answer named no valid version,
    the version already known (or None), unchanged."""
    changed: bool
    previous: str | None
    """The version that was replaced; None when nothing changed, or for the first version
    ever seen."""
    first_seen: float | None
    """When the current version was first seen, ever (a redeployed version keeps its
    first sighting); None without a current version."""
    detected_at_start: bool
    """The change happened while the daemon was down (or before the service was ever
    watched): its real time is unknown, and it was recorded when first noticed."""
    rejected: tuple[str, ...]
    """Why label values were ignored, for the logs."""
    bad: bool = False
    """The current version was marked bad before (by an earlier rollback): a bad version
    deployed again."""
    missing_since: float | None = None
    """The current version is held though this answer did not name it: missing since then.
    Another known version takes over once it has been missing for the grace."""


class VersionTracker:
    """Keeps each service's current version in the store. Create one per daemon process
    and keep it for the process's life: it remembers which services it has read since
    start, which is how a change made while the daemon was down is told apart from a
    release it saw happen.

    Runs on the event loop: reads are direct store calls, writes go through the store's
    writer thread (``store/writer.py``) and are awaited."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._writer = writer_for(store)
        self._locks: dict[str, asyncio.Lock] = {}
        """Per service: one tracker call is a read, a decision and an awaited write; the
        lock makes them one step, so two calls for a service (the scheduler's reading
        and an API release) cannot interleave a change."""
        self._seen_since_start: set[str] = set()
        """Services whose current version this process has seen answer, or set itself."""
        self._bake_watched_since_start: set[str] = set()
        self._applied_at: dict[str, float] = {}
        """The time of each service's latest applied reading: older ones come too late."""
        self._missing: dict[str, _Missing] = {}
        self._touches: dict[tuple[str, str], float] = {}
        self._touched_at = -math.inf
        self._last_read: dict[str, ServiceState | None] = {}
        """Each service's state as ``current`` read it last (``_last_read_state``)."""
        self._in_memory = False
        """``keep_current_in_memory``: judging reads ``_last_read`` instead of the store."""

    async def observe(
        self,
        service: str,
        samples: Sequence[Sample],
        label: str,
        now: float,
        absence_grace: float = ABSENCE_GRACE,
    ) -> VersionObservation:
        """Read the service's version from an answer of its version_query, queried at
        ``now``. An answer older than the latest one applied changes nothing, nor does one
        naming no valid version. The current version stays while it has been missing for
        less than ``absence_grace`` seconds (see ``decide``)."""
        found = candidates(samples, label)
        async with self._lock(service):
            state = self._read_state(service)
            stored = None if state is None else state.current_version
            if not found.values or now < self._applied_at.get(service, -math.inf):
                return self._unchanged(service, stored, found.rejected)
            self._applied_at[service] = now
            missing = self._missing.get(service)
            decision = decide(
                stored,
                found.values,
                self._store.went_live_at(service),
                missing.since if missing is not None and missing.version == stored else None,
                now,
                absence_grace,
            )
            if decision.missing_since is not None and stored is not None:
                self._missing[service] = _Missing(stored, decision.missing_since)
                return self._unchanged(
                    service, stored, found.rejected, missing_since=decision.missing_since
                )
            self._missing.pop(service, None)
            # Not seen since start until its current version answers: a change found then
            # may have happened while the daemon was down.
            at_start = service not in self._seen_since_start
            self._seen_since_start.add(service)
            source = VersionSource.START if at_start else VersionSource.DISCOVERED
            since = now if decision.since is None else decision.since
            seen = await self._apply(
                service, stored, decision.current, since, source, found.rejected, None
            )
            if since < now:
                await self._touch(service, decision.current, now)
            return seen

    async def record_release(
        self,
        service: str,
        version: str,
        now: float,
        meta: Mapping[str, str] | None = None,
    ) -> VersionObservation:
        """A release recorded through the API (by CI). Raises ValueError for a version
        that is not a plain version string. Meant for services without version_query:
        with both, a release recorded before its pods report it would flap back.

        Never dated before the service's latest reading or release: the request is the
        release, so one whose clock reads earlier (the wall clock stepped back, or two
        requests raced to the lock) is recorded, at that latest time, not dropped."""
        if not is_valid_version(version):
            raise ValueError(
                f"invalid version {_shown(version)}: use letters, digits and . _ + -, "
                "starting with a letter or digit, at most 128 characters"
            )
        async with self._lock(service):
            state = self._read_state(service)
            stored = None if state is None else state.current_version
            at = max(now, self._applied_at.get(service, -math.inf))
            self._applied_at[service] = at
            self._missing.pop(service, None)
            # A release reported live is not a change that happened while we were down.
            self._seen_since_start.add(service)
            return await self._apply(service, stored, version, at, VersionSource.API, (), meta)

    async def update_bake(
        self,
        service: str,
        now: float,
        healthy: bool,
        bake_time: timedelta,
        *,
        evidence: Callable[[str, float], Judgement] | None = None,
        early: bool = False,
    ) -> str | None:
        """Advance the bake clock of the service's current version; return the version
        when it has just baked (once), else None.

        ``evidence(version, period_start)`` judges, once the clock has run ``bake_time``,
        what the period showed (``bake_evidence.py``): ENOUGH bakes, NOT_YET waits, and
        NOT_ENOUGH ends the period there: the clock restarts at ``now``. None: the clock
        alone decides. ``early``: the evidence is judged now, without waiting out
        ``bake_time`` (every check's sequential test concluded "not worse").

        The clock runs while the service is healthy (no check firing), from the later of
        when the version went live and when the service became healthy; an unhealthy
        reading stops it. The first reading after a daemon start restarts the clock,
        because nobody watched the service's health while the daemon was down. A
        version marked bad never bakes, nor does one missing from the latest answer: it
        may have been rolled back, and bakes when it answers again."""
        async with self._lock(service):
            state = self._read_state(service)
            if state is None or state.current_version is None or state.current_since is None:
                return None
            first_since_start = service not in self._bake_watched_since_start
            self._bake_watched_since_start.add(service)
            if not healthy:
                if state.healthy_since is not None:
                    await self._writer.set_healthy_since(service, None)
                return None
            healthy_since = None if first_since_start else state.healthy_since
            start = max(state.current_since, now if healthy_since is None else healthy_since)
            if start != state.healthy_since:
                await self._writer.set_healthy_since(service, start)
            if not early and now - start < bake_time.total_seconds():
                return None
            version = state.current_version
            missing = self._missing.get(service)
            if missing is not None and missing.version == version:
                return None
            record = self._store.version(service, version)
            if record is None or record.bad or record.baked_at is not None:
                return None
            judged = Judgement.ENOUGH if evidence is None else evidence(version, start)
            if judged is Judgement.NOT_ENOUGH:
                await self._writer.set_healthy_since(service, now)
            if judged is not Judgement.ENOUGH:
                return None
            return version if await self._writer.mark_baked(service, version, now) else None

    async def flush(self) -> None:
        """Write the sightings (``last_seen``) not written yet."""
        await self._flush_touches()

    async def _touch(self, service: str, version: str, now: float) -> None:
        """Record a sighting; write the pending ones when the last write is
        ``TOUCH_FLUSH_EVERY`` old (or the clock went back). A crash loses at most that much
        of ``last_seen``, which nothing decides on."""
        key = (service, version)
        self._touches[key] = max(now, self._touches.get(key, -math.inf))
        if not 0 <= now - self._touched_at < TOUCH_FLUSH_EVERY:
            self._touched_at = now
            await self._flush_touches()

    async def _flush_touches(self) -> None:
        touches, self._touches = self._touches, {}
        if not touches:
            return
        try:
            await self._writer.touch_versions([(s, v, at) for (s, v), at in touches.items()])
        except BaseException:
            for key, at in touches.items():  # not lost: tried again at the next flush
                self._touches[key] = max(at, self._touches.get(key, -math.inf))
            raise

    async def mark_bad(self, service: str, version: str, reason: str) -> bool:
        """Mark a version bad (it never bakes, nor is it the last known good again).
        False when the version is unknown."""
        async with self._lock(service):
            return await self._writer.mark_bad(service, version, reason)

    def last_known_good(self, service: str) -> str | None:
        """The version to roll back to: baked, not bad, and not the current one."""
        record = self._store.last_known_good(service, exclude=self.current(service))
        return None if record is None else record.version

    def current(self, service: str) -> str | None:
        state = self._last_read_state(service)
        return None if state is None else state.current_version

    def current_since(self, service: str) -> float | None:
        state = self._last_read_state(service)
        return None if state is None else state.current_since

    def _read_state(self, service: str) -> ServiceState | None:
        """The service's stored state, remembered for ``_last_read_state``."""
        state = self._store.service_state(service)
        self._last_read[service] = state
        return state

    def keep_current_in_memory(self) -> None:
        """Answer ``current``/``current_since`` from the state read last, not the store:
        for a daemon that shares PostgreSQL, where each of thousands of evaluations would
        otherwise wait on the event loop for a round trip to the database. Right while
        this daemon alone changes the versions of the services it judges: it re-reads a
        service after its own version writes and whenever it takes a lease (``forget``)."""
        self._in_memory = True

    def forget(self, service: str) -> None:
        """Read the service's state from the store again at the next ``current``."""
        self._last_read.pop(service, None)

    def _last_read_state(self, service: str) -> ServiceState | None:
        """The service's stored state; while the store cannot be read, the state read
        last. Only for judging: checks go on being evaluated through an outage of the
        store (nothing is decided meanwhile, as no decision could be recorded), and each
        evaluation asks which version is current."""
        if self._in_memory and service in self._last_read:
            return self._last_read[service]
        try:
            state = self._read_state(service)
        except StoreError:
            if service not in self._last_read:
                raise
            return self._last_read[service]
        return state

    def _lock(self, service: str) -> asyncio.Lock:
        lock = self._locks.get(service)
        if lock is None:
            lock = self._locks[service] = asyncio.Lock()
        return lock

    def _unchanged(
        self,
        service: str,
        stored: str | None,
        rejected: tuple[str, ...],
        missing_since: float | None = None,
    ) -> VersionObservation:
        record = None if stored is None else self._store.version(service, stored)
        return VersionObservation(
            current=stored,
            changed=False,
            previous=None,
            first_seen=None if record is None else record.first_seen,
            detected_at_start=False,
            rejected=rejected,
            bad=record is not None and record.bad,
            missing_since=missing_since,
        )

    async def _apply(
        self,
        service: str,
        stored: str | None,
        version: str,
        now: float,
        source: VersionSource,
        rejected: tuple[str, ...],
        meta: Mapping[str, str] | None,
    ) -> VersionObservation:
        changed = version != stored
        if changed:
            try:
                await self._writer.record_version_change(
                    service, stored, version, now, source, meta
                )
            finally:
                self.forget(service)
        else:
            await self._touch(service, version, now)
        record = self._store.version(service, version)
        return VersionObservation(
            current=version,
            changed=changed,
            previous=stored if changed else None,
            first_seen=None if record is None else record.first_seen,
            detected_at_start=changed and source is VersionSource.START,
            rejected=rejected,
            bad=record is not None and record.bad,
        )
