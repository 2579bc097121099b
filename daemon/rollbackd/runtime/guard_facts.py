"""What a decision reads before it writes: the release a trigger is about (or, without
versions, its firing episode), whether the trigger joins that release's rollback, whether a
pending approval is over, and the ``GuardFacts`` the guards judge.

Reads only, and synchronous: a decision gathers every fact here in one go, without an
await in between, under its service's lock, and only then writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from rollbackd.config.loader import Service
from rollbackd.core.guards import GuardFacts
from rollbackd.core.model import Mode, Rollback, RollbackState
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.triggers import Trigger
from rollbackd.store.interfaces import StateStore

JOINABLE = (
    RollbackState.PENDING,
    RollbackState.RUNNING,
    RollbackState.VERIFYING,
    RollbackState.SUCCEEDED,
    RollbackState.FAILED,
    RollbackState.INTERRUPTED,
    RollbackState.DRY_RUN,
    RollbackState.REJECTED,
)
"""An automatic trigger for a release with a rollback in one of these states joins it: it
never executes a second time, and a rejected release is not asked about again. A person may
start a new one after failed, interrupted, rejected or expired; an expired approval is asked
again on the next automatic trigger."""


def joins(existing: Rollback, trigger: Trigger, mode: Mode) -> bool:
    """Whether a trigger joins the release's latest rollback instead of a new decision.

    An automatic trigger joins whatever the release's rollback became — it never runs a
    second time, and a rejection is not asked about again — except a dry run once the
    mode is no longer dry-run (it ran nothing, so the release is decided for real), and an
    expired approval (asked again). A person starts a new one unless it is live or
    succeeded."""
    if existing.state not in JOINABLE:
        return False
    if existing.state is RollbackState.DRY_RUN:
        return mode is Mode.DRY_RUN and trigger.automatic
    return trigger.automatic or existing.state.live or existing.state is RollbackState.SUCCEEDED


def release_id(store: StateStore, service: str, current: str | None) -> int:
    """The version change that made ``current`` live: the release a rollback undoes.
    The same version deployed again later is another release."""
    changes = store.version_changes(service, 1)
    if changes and current is not None and changes[0].to_version == current:
        return changes[0].id
    return 0


def release_of_version(store: StateStore, service: str, version: str | None) -> int:
    """The latest release of ``version`` (the change that last made it current), current
    or not: what a firing judged for a version since replaced is about. 0 when no change
    to it is recorded, as ``release_id`` answers for a version without one."""
    changes = store.version_changes(service, 50)
    return next((c.id for c in changes if version is not None and c.to_version == version), 0)


def release_of(store: StateStore, service: str, current: str | None, trigger: Trigger) -> int:
    """What a rollback undoes. With a known version, its release. Without one (no
    version_query, no release recorded), the firing episode: a trigger whose breach
    began before the service's latest rollback ended belongs to that rollback's
    episode; a later breach (or a person) opens a new one, keyed by a negative number
    so it never collides with a release."""
    if current is not None:
        return release_id(store, service, current)
    latest = next(
        (r for r in store.rollbacks(service=service, limit=50) if r.from_version is None),
        None,
    )
    if latest is None:
        return 0
    if latest.state.live:
        return latest.release_id
    ended = latest.finished_at if latest.finished_at is not None else latest.updated_at
    if trigger.automatic and trigger.breach_started is not None and trigger.breach_started < ended:
        return latest.release_id
    return -latest.id


@dataclass(frozen=True)
class Overdue:
    """Why a pending approval must not run any more."""

    superseded: str | None
    """Its release is no longer live, and why; None when its deadline passed."""


def overdue(engine: Engine, rollback: Rollback, now: float) -> Overdue | None:
    """A pending approval past its deadline, or whose release was replaced since it was
    decided (superseded); None while it may still be approved. The deadline comes first."""
    if rollback.expires_at is not None and rollback.expires_at <= now:
        return Overdue(superseded=None)
    why = _replaced(engine, rollback)
    return None if why is None else Overdue(superseded=why)


def _replaced(engine: Engine, rollback: Rollback) -> str | None:
    """Why a pending rollback's release is no longer live, or None while it is."""
    service = rollback.service
    current = engine.versions.current(service)
    if rollback.from_version is None and current is None:
        return None  # an unversioned service: nothing can replace its episode
    if current != rollback.from_version:
        return f"{current} replaced {rollback.from_version} since it was decided"
    if rollback.release_id and release_id(engine.store, service, current) != rollback.release_id:
        return f"{current} was deployed again since it was decided (another release)"
    return None


@dataclass(frozen=True)
class _History:
    """The service's rollbacks the guards count."""

    in_window: int
    """Executed automatic rollbacks within the guards' window."""
    last_automatic_at: float | None
    """When the latest executed automatic rollback started."""
    in_flight: int | None
    """Another live rollback (not the one being decided)."""


def _history(store: StateStore, name: str, since: float, deciding: int | None) -> _History:
    executed = [
        r
        for r in store.rollbacks(service=name, since=since, limit=1000)
        if r.state.executed and r.automatic
    ]
    live = [
        r
        for r in store.rollbacks(
            service=name,
            states=[RollbackState.PENDING, RollbackState.RUNNING, RollbackState.VERIFYING],
            limit=2,
        )
        if r.id != deciding
    ]
    latest_auto = next(
        (r for r in store.rollbacks(service=name, limit=50) if r.automatic and r.state.executed),
        None,
    )
    return _History(
        in_window=len(executed),
        last_automatic_at=(latest_auto.started_at or latest_auto.created_at)
        if latest_auto
        else None,
        in_flight=live[0].id if live else None,
    )


def _target(engine: Engine, name: str, trigger: Trigger) -> tuple[str | None, str]:
    """The version to roll back to, and where it comes from (or why there is none)."""
    if trigger.to_version:
        return trigger.to_version, "--to"
    target = engine.versions.last_known_good(name)
    return target, (
        "last known good" if target else "no version has baked into a last known good yet"
    )


def guard_facts(
    engine: Engine,
    service: Service,
    trigger: Trigger,
    current: str | None,
    *,
    deciding: int | None = None,
) -> GuardFacts:
    """``deciding``: the rollback being decided (an approval), not counted in flight."""
    name = service.name
    store = engine.store
    guards = engine.loaded.config.guards
    state = store.service_state(name)
    paused = store.paused()
    history = _history(store, name, trigger.at - guards.window.total_seconds(), deciding)
    target, target_source = _target(engine, name, trigger)
    return GuardFacts(
        now=trigger.at,
        automatic=trigger.automatic,
        mode=engine.loaded.config.daemon.mode,
        paused=name in paused or "*" in paused,
        frozen=bool(state and state.frozen),
        frozen_reason=state.frozen_reason if state else None,
        current_version=current,
        current_since=engine.versions.current_since(name),
        breach_started=trigger.breach_started,
        version_lag=min((c.interval for c in service.rules.check), default=timedelta(seconds=15)),
        rollback_window=service.rules.service.rollback_window,
        cooldown=guards.cooldown,
        last_rollback_at=history.last_automatic_at,
        rollbacks_in_window=history.in_window,
        max_rollbacks=guards.max_rollbacks,
        window=guards.window,
        target=target,
        target_source=target_source,
        chain_needs_target=any(spec.needs_target() for spec in service.rules.rollback),
        canary_abort=service.rules.canary is not None and engine.canary_active(name),
        in_flight=history.in_flight,
    )
