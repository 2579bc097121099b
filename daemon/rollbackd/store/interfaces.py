"""What the daemon needs from a state store, whatever its backend: one Protocol per aggregate.

The runtime depends on :class:`StateStore`, never on a backend's class, so a PostgreSQL
store (several daemons sharing one state) can stand beside the SQLite one by
implementing these Protocols; ``tests/test_store_contract.py`` holds the behaviour every
implementation must show.

Contracts shared by every method:

* Callers get frozen dataclasses of :mod:`rollbackd.core.model`, never rows or dicts.
* Times are UTC unix seconds (floats) passed in by the caller; a store reads no clock,
  except :class:`LeaseStore`, which judges expiry by the database's own clock only.
* Every method raises :class:`~rollbackd.store.errors.StoreError` when the store cannot do
  what was asked (closed, I/O error, disk full, a constraint refused the write). A write is
  one transaction: when it raises, nothing of it was stored.
* Methods taking ``limit`` raise ValueError when it is below 1, before touching storage.
* JSON data (event data, triggers, guards, details) is stored with every non-finite float
  spelt as Prometheus spells it: ``"NaN"``, ``"+Inf"``, ``"-Inf"``.
* Every method may be called from any thread. Writes block until durable, so async code
  calls them through :class:`~rollbackd.store.writer.StoreWriter`; reads are short and
  must not wait for a write in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from rollbackd.core.model import (
    AlertDraft,
    Event,
    Fence,
    Handoff,
    HandoffDraft,
    JSONValue,
    Lease,
    Rollback,
    RollbackDraft,
    RollbackState,
    ServiceState,
    Step,
    StoredAlert,
    StoredCheckState,
    Trigger,
    VersionChange,
    VersionRecord,
    VersionSource,
)


class VersionStore(Protocol):
    """Each service's versions (one record per version) and its release history."""

    def record_version_change(
        self,
        service: str,
        from_version: str | None,
        to_version: str,
        at: float,
        source: VersionSource,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """Make ``to_version`` the service's current version since ``at``: upsert its
        record (``meta`` replaces the stored one when given; first_seen and source stay
        those of the first sighting, last_seen only moves forward), append to the release
        history, and move the service state (creating it if needed). The bake clock, if
        running, restarts at ``at``, since the new version has not been healthy any longer
        than that; a stopped bake clock stays stopped.

        Raises ValueError when ``to_version`` is empty, ConflictError (and changes nothing)
        when ``from_version`` is no longer the current version (None: no version yet)."""
        ...

    def touch_version(self, service: str, version: str, at: float) -> None:
        """The version was seen running at ``at``: last_seen moves forward to it, never
        back. No-op for an unknown version."""
        ...

    def touch_versions(self, seen: Sequence[tuple[str, str, float]]) -> None:
        """``touch_version`` for many (service, version, at) at once, in one transaction
        however many services. No-op when ``seen`` is empty."""
        ...

    def version(self, service: str, version: str) -> VersionRecord | None:
        """The version's record, or None when the service never ran it."""
        ...

    def versions(self, service: str) -> list[VersionRecord]:
        """Every version the service ever ran, the first seen first (ties by version)."""
        ...

    def went_live_at(self, service: str) -> dict[str, float]:
        """Each known version of the service, with when it last went live: its latest
        change to it, else its first sighting. A redeployed version goes live several
        times, and "appeared most recently" must mean the latest of those."""
        ...

    def mark_baked(self, service: str, version: str, at: float) -> bool:
        """Record that the version baked at ``at``. Only the first call counts, and a
        version marked bad never bakes: True only when this call marked it."""
        ...

    def mark_bad(self, service: str, version: str, reason: str) -> bool:
        """Mark the version bad (with why), so it never bakes nor serves as last known
        good. False when the version is unknown."""
        ...

    def last_known_good(self, service: str, exclude: str | None = None) -> VersionRecord | None:
        """The baked, not-bad version, other than ``exclude``, that went live most recently
        (ties: the latest baked, then the greatest version); None when there is none.

        Ordered by going live rather than by baking, so that a baked version deployed
        again (a rollback to it, a manual downgrade) counts as the most recent good one."""
        ...

    def version_changes(self, service: str, limit: int = 100) -> list[VersionChange]:
        """The service's release history, the latest change first (by the order they were
        recorded, not by ``at``), at most ``limit``. A change's ``id`` is the release id
        that rollbacks of the version it made current are keyed by."""
        ...


class ServiceStateStore(Protocol):
    """Per-service state (current version, bake clock, paused, frozen) and pause scopes."""

    def service_state(self, service: str) -> ServiceState | None:
        """The service's state, or None when nothing was ever recorded for it."""
        ...

    def service_states(self) -> list[ServiceState]:
        """Every service's state, by service name."""
        ...

    def set_healthy_since(self, service: str, at: float | None) -> None:
        """Start (``at``) or stop (None) the bake clock; no-op for an unknown service."""
        ...

    def set_paused(self, service: str, paused: bool) -> None:
        """Set the service's paused flag; works before any version is known (the state
        is created, with no current version)."""
        ...

    def set_frozen(self, service: str, frozen: bool, reason: str | None = None) -> None:
        """Freeze (with why) or thaw; thawing forgets the reason. Works before any version
        is known, as ``set_paused``."""
        ...

    def set_pause(self, scope: str, paused: bool, at: float, who: str = "") -> None:
        """Pause a scope (a service name, or ``*`` for all) since ``at`` by ``who``, which
        replaces an earlier pause of it; or lift it (no-op when not paused)."""
        ...

    def paused(self) -> set[str]:
        """The paused scopes: service names, and ``*`` when everything is paused."""
        ...


class CheckStateStore(Protocol):
    """Each check's saved state machine (``store/check_state_codec.py``'s JSON), so a
    restart neither forgets a breach nor dates it after a release it predates."""

    def check_states(self) -> dict[tuple[str, str], StoredCheckState]:
        """Every saved check state, keyed by (service, check)."""
        ...

    def save_check_state(self, service: str, check: str, state: str, at: float) -> None:
        """Insert or replace the check's state. ``state`` must be JSON text, else
        StoreError (a refused write: ``write_failure`` stays unset)."""
        ...

    def delete_check_state(self, service: str, check: str) -> None:
        """Forget the check's state; no-op when none is saved."""
        ...


class RollbackStore(Protocol):
    """Rollbacks, the executor steps each ran, and the triggers recorded against them."""

    def create_rollback(self, draft: RollbackDraft, *, fence: Fence | None = None) -> Rollback:
        """Record a new rollback and return it as stored (``finished_at`` is ``at`` when
        the draft's state is not live). Raises ConflictError when the release already has
        a pending, running, verifying or succeeded one: the unique key is (service,
        from_version, release_id), an unknown from_version counting as one value.

        With a ``fence``: only while, in the write's own transaction, the service's lease
        has the fence's holder and epoch and is live by the store's clock (as ``holds``);
        else FencedError and nothing is written."""
        ...

    def rollback(self, rollback_id: int) -> Rollback | None:
        """The rollback, or None when there is no such id."""
        ...

    def rollbacks(
        self,
        service: str | None = None,
        states: Sequence[RollbackState] | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Rollback]:
        """The latest created first, at most ``limit``; filters combine. ``since`` is
        inclusive on created_at; an empty ``states`` matches nothing."""
        ...

    def latest_rollback(
        self, service: str, from_version: str | None, release_id: int = 0
    ) -> Rollback | None:
        """The latest rollback of this release, whatever its state; None when none."""
        ...

    def set_rollback_state(
        self,
        rollback_id: int,
        state: RollbackState,
        at: float,
        *,
        expected: Sequence[RollbackState] | None = None,
        outcome: str | None = None,
        decided_by: str | None = None,
        to_version: str | None = None,
        canary: bool | None = None,
        fence: Fence | None = None,
    ) -> Rollback:
        """Move a rollback to ``state`` at ``at`` and return it as stored. The first move
        to running sets started_at; a move to a state that is not live sets finished_at.
        ``outcome``, ``decided_by``, ``to_version`` and ``canary`` replace the stored
        values when given.

        With ``expected``, only from one of those states, else ConflictError and nothing
        changes: approve and reject (or expiry) racing each other, say. StoreError when
        there is no such rollback.

        With a ``fence``: only while the rollback's service's lease has the fence's holder
        and epoch and is live, judged in the same transaction as the move (as
        ``create_rollback``); else FencedError and nothing changes."""
        ...

    def add_trigger(
        self, rollback_id: int, at: float, source: str, detail: Mapping[str, JSONValue]
    ) -> int:
        """Record a trigger that joined the rollback; returns its id. StoreError when
        there is no such rollback."""
        ...

    def triggers(self, rollback_id: int, limit: int = -1) -> list[Trigger]:
        """The triggers that joined a rollback, oldest first; at most ``limit`` (-1: all)."""
        ...

    def count_triggers(self, rollback_id: int) -> int:
        """How many triggers joined the rollback (0 for an unknown one)."""
        ...

    def start_step(self, rollback_id: int, kind: str, executor: str, at: float) -> int:
        """Record that a step starts, before it runs, and return its id: after a crash the
        record shows what was running. StoreError when there is no such rollback."""
        ...

    def finish_step(
        self,
        step_id: int,
        at: float,
        ok: bool,
        summary: str,
        stdout_tail: str = "",
        stderr_tail: str = "",
        command: Sequence[str] = (),
    ) -> None:
        """Record how the step ended; no-op for an unknown step."""
        ...

    def steps(self, rollback_id: int) -> list[Step]:
        """The rollback's steps, in the order they started."""
        ...


class AlertStore(Protocol):
    """Every alert Alertmanager delivered, matched to a service or not."""

    def record_alerts(
        self, drafts: Sequence[AlertDraft], received_at: float
    ) -> list[tuple[StoredAlert, bool]]:
        """Record one delivery's alerts in one transaction, all or none: each as stored,
        with whether it is new, in the drafts' order. An alert already recorded under the
        same (fingerprint, starts_at, status) is a re-send: only its delivery count and
        last delivery time (forward only) change. A new alert that ``needs_handling`` is
        stored unhandled (``handled_at`` None); any other is handled at ``received_at``."""
        ...

    def set_alert_handled(
        self, alert_id: int, at: float, outcome: str, rollback_id: int | None = None
    ) -> None:
        """Record what the pipeline did with a matched firing alert; no-op for an
        unknown id."""
        ...

    def alerts(
        self,
        service: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[StoredAlert]:
        """The latest received first, at most ``limit``; ``service`` filters on the
        matched service, ``since`` (inclusive) on the first delivery time."""
        ...

    def firing_alerts(self, service: str, limit: int = 1000) -> list[StoredAlert]:
        """The service's matched alerts still firing: a firing record with no resolved
        record of the same alert (fingerprint and startsAt), the latest first."""
        ...

    def unhandled_alerts(self, services: Sequence[str], limit: int = 100) -> list[StoredAlert]:
        """Alerts of these services stored unhandled (firing and matched, not yet handed to
        the pipeline: the daemon that received them does not hold the service, or stopped
        before it could), the oldest first."""
        ...


class EventStore(Protocol):
    """The audit log: append-only, kept whatever happens to what it refers to."""

    def add_event(self, event: Event) -> int:
        """Append the event (its ``id`` is ignored) and return the id it was given; ids
        grow with every event. ValueError when the event has no type."""
        ...

    def events(
        self,
        service: str | None = None,
        since: float | None = None,
        types: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """The latest events first, at most ``limit``; filters combine. ``since`` is
        inclusive; ``types`` are exact names (a bare string is one name; an empty
        sequence matches nothing)."""
        ...


class HandoffStore(Protocol):
    """Requests handed to a service's holder by the daemon that took them (an approval, a
    manual rollback, a release through the API of a daemon that does not hold the
    service). Each is taken by one daemon at most and answered once; the asker reads the
    answer back."""

    def hand_off(self, draft: HandoffDraft, at: float) -> int:
        """Store a request for the holder of ``draft.service``; its id. Wakes listeners
        (``StateStore.listen``) once committed."""
        ...

    def take_handoffs(
        self, taker: str, services: Sequence[str], at: float, limit: int = 100
    ) -> list[Handoff]:
        """Take the open requests of these services (not taken, not withdrawn), the
        oldest first, marking them taken by ``taker``: a request is taken by one caller
        only, however many race for it."""
        ...

    def answer_handoff(self, handoff_id: int, answer: Mapping[str, JSONValue], at: float) -> None:
        """Record the answer of a taken request (wakes listeners once committed); a
        request answered already keeps its first answer."""
        ...

    def withdraw_handoff(self, handoff_id: int, at: float) -> bool:
        """The asker gives up on a request nobody took: True when it was still open (it is
        now never taken), False when a taker has it already."""
        ...

    def handoff(self, handoff_id: int) -> Handoff | None: ...


class Listening(Protocol):
    """A subscription to the store's wake-ups (``StateStore.listen``)."""

    def close(self) -> None: ...


class LeaseStore(Protocol):
    """Per-service leases with fencing, and the live daemons: each service is held by one
    daemon (member) at a time, and each new tenure of a lease gets a higher epoch.

    Every time here is the store's clock (the database server's), never the daemon's,
    which may be wrong or paused: expiry is judged where the lease lives. A lease or a
    member is live while that clock is before its ``expires_at``. ``ttl`` is in seconds,
    0 or more and finite (0: expired at once), else ValueError; an empty ``member`` or
    ``holder`` (or ``service``) is a ValueError too, before touching storage."""

    def heartbeat(self, member: str, ttl: float, instance: str) -> list[str]:
        """Record ``member`` as alive until now + ttl (the store's clock), run by the
        process ``instance``; return every live member, sorted. A member not heard of
        within its ttl is dead. While ``member`` is live for another ``instance`` (two
        daemons given one member name) nothing is written and ``MemberTakenError`` is
        raised, for ttl 0 too; once it is dead, any instance may take the name. An empty
        ``instance`` is a ValueError."""
        ...

    def acquire(self, service: str, holder: str, ttl: float) -> Lease | None:
        """Take ``service``'s lease when it is free or expired (the store's clock), or
        renew it when ``holder`` already has it, live (same epoch and acquired_at). Any
        new tenure (another holder, or the same one after its lease expired or was
        released) makes the epoch one more than any epoch ever given for that service,
        so work begun under the old tenure is fenced off. None when another holder's
        lease is live. Atomic: two racing acquirers never both win."""
        ...

    def acquire_many(self, services: Sequence[str], holder: str, ttl: float) -> list[Lease]:
        """``acquire`` for each of ``services`` (no duplicates), in one round trip: the
        leases won, sorted by service; the others are live for another holder. As atomic
        per service as ``acquire``; a daemon taking its share of thousands of services
        must not need one transaction each (a lease time would pass meanwhile)."""
        ...

    def renew(self, holder: str, services: Sequence[str], ttl: float) -> list[Lease]:
        """Extend ``holder``'s live leases among ``services`` to now + ttl; return the ones
        renewed, sorted by service. A lease that had expired is not renewed (it may have
        been taken over): the holder has lost it."""
        ...

    def release(self, service: str, holder: str) -> bool:
        """Give the lease up (another daemon may take it at once): it expires now, and
        keeps its epoch for the next tenure to pass. False if ``holder`` does not hold
        it live."""
        ...

    def leases(self) -> list[Lease]:
        """Every lease, live or expired, sorted by service."""
        ...

    def live_leases(self) -> list[Lease]:
        """The leases live now by the store's clock (held by someone), sorted by
        service: who holds what, for status."""
        ...

    def holds(self, service: str, holder: str, epoch: int) -> bool:
        """The fencing check: ``holder`` holds ``service`` with ``epoch`` and the lease is
        live now, by the store's clock."""
        ...


class StateStore(
    VersionStore,
    ServiceStateStore,
    CheckStateStore,
    RollbackStore,
    AlertStore,
    EventStore,
    LeaseStore,
    HandoffStore,
    Protocol,
):
    """The whole state store, with its lifecycle: the type the runtime depends on."""

    def listen(self, wake: Callable[[], None]) -> Listening:
        """Call ``wake`` (from another thread) soon after another daemon stored an alert to
        handle or a request to hand off, or answered one: a hint to look now rather than
        at the next poll, never the only way work is found (a wake-up may be lost while
        the database is unreachable). One daemon alone (SQLite) is never woken."""
        ...

    @property
    def location(self) -> str:
        """Where the state lives, for messages (a file, a server); never a secret."""
        ...

    def close(self) -> None:
        """Release the store's connections; later calls raise StoreError (``writable``
        answers False). Safe to call twice."""
        ...

    def schema_version(self) -> int:
        """The version of the schema the stored data is in."""
        ...

    def writable(self, timeout: float = 1.0) -> bool:
        """A cheap readiness probe: can a write transaction start now, and, if the last
        write failed, does a real write succeed again? False when the store is closed,
        read-only, full or failing, or busy past ``timeout`` (or past the backend's own
        wait for another writer). Never raises."""
        ...

    @property
    def write_failure(self) -> str | None:
        """Why the last write failed (disk full, I/O error), or None once a write (or
        ``writable``) succeeds. A write refused by a constraint or a conflict is not a
        failure of the store and leaves this unchanged."""
        ...
