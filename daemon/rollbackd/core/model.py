"""The domain model: what rollbackd knows and remembers, as frozen values.

Every layer speaks in these types; the store only persists them. Times are UTC unix
seconds (floats).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeAlias

JSONValue: TypeAlias = (
    "Mapping[str, JSONValue] | Sequence[JSONValue] | str | int | float | bool | None"
)
"""What event data and release metadata may hold. Non-finite floats are stored as the
strings ``"NaN"``, ``"+Inf"`` and ``"-Inf"``, as Prometheus writes them, because JSON
has no such numbers (and SQLite's ``json_valid`` rejects them)."""


class Mode(StrEnum):
    """How a service's rollbacks are decided: by rollbackd, by a person, or only announced."""

    AUTO = "auto"
    APPROVE = "approve"
    DRY_RUN = "dry-run"


class RollbackState(StrEnum):
    PENDING = "pending"
    """Waiting for a person to approve or reject it."""
    RUNNING = "running"
    VERIFYING = "verifying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    INTERRUPTED = "interrupted"
    """The daemon stopped or died while it ran; it is never re-run blindly."""
    DRY_RUN = "dry_run"
    """Recorded and announced, never executed."""

    @property
    def live(self) -> bool:
        return self in (RollbackState.PENDING, RollbackState.RUNNING, RollbackState.VERIFYING)

    @property
    def executed(self) -> bool:
        """Whether an executor ran (or may have run) for it."""
        return self in (
            RollbackState.RUNNING,
            RollbackState.VERIFYING,
            RollbackState.SUCCEEDED,
            RollbackState.FAILED,
            RollbackState.INTERRUPTED,
        )


@dataclass(frozen=True)
class Rollback:
    id: int
    service: str
    from_version: str | None
    release_id: int
    """The version change that made ``from_version`` current; 0 when unknown."""
    to_version: str | None
    state: RollbackState
    source: str
    """``check``, ``alert`` or ``manual``."""
    automatic: bool
    reason: str
    mode: str
    canary: bool
    trigger: Mapping[str, JSONValue]
    guards: Sequence[Mapping[str, JSONValue]]
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    decided_by: str | None
    outcome: str


@dataclass(frozen=True)
class RollbackDraft:
    """A rollback about to be recorded."""

    service: str
    from_version: str | None
    release_id: int
    to_version: str | None
    state: RollbackState
    source: str
    automatic: bool
    reason: str
    mode: str
    trigger: Mapping[str, JSONValue]
    guards: Sequence[Mapping[str, JSONValue]]
    at: float
    expires_at: float | None = None
    outcome: str = ""


@dataclass(frozen=True)
class Step:
    """One executor run of a rollback; ``finished_at`` None means it never finished."""

    id: int
    rollback_id: int
    kind: str
    """``canary_abort``, ``rollback`` or ``verify``."""
    executor: str
    started_at: float
    finished_at: float | None
    ok: bool | None
    summary: str
    stdout_tail: str
    stderr_tail: str
    command: Sequence[str]


@dataclass(frozen=True)
class Trigger:
    id: int
    rollback_id: int
    at: float
    source: str
    detail: Mapping[str, JSONValue]


class VersionSource(StrEnum):
    """How rollbackd learned that a version went live."""

    DISCOVERED = "discovered"
    """Read from the service's version_query while the daemon watched."""
    API = "api"
    """Recorded through the API (a release from CI)."""
    START = "start"
    """First noticed at daemon start-up: it went live while the daemon was down, or
    before the service was ever watched, so its real start time is unknown."""


@dataclass(frozen=True)
class VersionRecord:
    """One version of one service; a version deployed several times keeps one record."""

    service: str
    version: str
    first_seen: float
    last_seen: float
    source: VersionSource
    """How the version was first learned of; each later change has its own source."""
    baked_at: float | None
    bad: bool
    bad_reason: str | None
    meta: Mapping[str, str]


@dataclass(frozen=True)
class VersionChange:
    """One entry of a service's release history."""

    id: int
    service: str
    from_version: str | None
    to_version: str
    at: float
    source: VersionSource


@dataclass(frozen=True)
class ServiceState:
    service: str
    current_version: str | None
    current_since: float | None
    """When the current version went live (or was first noticed, for source "start")."""
    healthy_since: float | None
    """The bake clock: since when the current version has been healthy; None while not."""
    paused: bool
    frozen: bool
    frozen_reason: str | None


@dataclass(frozen=True)
class StoredCheckState:
    service: str
    check: str
    state: str
    """The check state's JSON (``store/check_state_codec.py``), as it was saved."""
    updated_at: float


@dataclass(frozen=True)
class Event:
    """One audit record. ``id`` is None until the store has assigned one."""

    type: str
    at: float
    service: str | None = None
    rollback_id: int | None = None
    data: Mapping[str, JSONValue] = field(default_factory=dict)
    id: int | None = None


@dataclass(frozen=True)
class AlertDraft:
    """One alert of one Alertmanager delivery, about to be recorded."""

    fingerprint: str
    status: str
    """``firing`` or ``resolved``."""
    starts_at: float
    ends_at: float | None
    """None for a firing alert (Alertmanager sends the zero time)."""
    alertname: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    generator_url: str
    receiver: str
    group_key: str
    matched_service: str | None
    """The service whose [[alert]] it matched, from the config; never from its labels."""
    outcome: str = ""
    """Set for an alert that needs no further handling (resolved, unmatched): why."""
    needs_handling: bool = False
    """A matched firing alert: it is to be handed to the pipeline."""


@dataclass(frozen=True)
class StoredAlert:
    id: int
    fingerprint: str
    status: str
    starts_at: float
    ends_at: float | None
    alertname: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    generator_url: str
    receiver: str
    group_key: str
    received_at: float
    last_received_at: float
    deliveries: int
    matched_service: str | None
    handled_at: float | None
    """None while a matched firing alert has not been handed to the pipeline yet."""
    outcome: str
    rollback_id: int | None


@dataclass(frozen=True)
class Lease:
    """One daemon's hold on one service: only the holder acts on the service, and every
    act it records carries ``epoch``, so that a holder that lost the lease is fenced off.
    Both times are by the store's clock (the database's), never a daemon's."""

    service: str
    holder: str
    """The holding daemon's member id."""
    epoch: int
    """The fencing token: one more at every new tenure of the lease, never reused."""
    acquired_at: float
    """When this tenure began (a renewal keeps it)."""
    expires_at: float
    """Live while the store's clock is before this; released leases expire at release."""


@dataclass(frozen=True)
class Fence:
    """The lease a write is made under: the store makes the write only while ``holder``
    holds the service's lease with ``epoch`` (checked in the write's own transaction)."""

    holder: str
    epoch: int


class HandoffKind(StrEnum):
    """A request only a service's holder may carry out, taken by another daemon."""

    APPROVE = "approve"
    REJECT = "reject"
    ROLLBACK = "rollback"
    """A manual rollback request."""
    RELEASE = "release"
    """A release recorded by CI."""


@dataclass(frozen=True)
class HandoffDraft:
    """A request to hand to the holder of ``service``: ``body`` is its arguments as data
    (runtime/handoff_desk.py gives each kind's shape)."""

    service: str
    kind: HandoffKind
    body: Mapping[str, JSONValue]
    asked_by: str
    """The member id of the daemon that took the request and waits for the answer."""


@dataclass(frozen=True)
class Handoff:
    """A request handed to a service's holder, as stored: taken by at most one daemon
    (``taken_by``), answered once (``answer``)."""

    id: int
    service: str
    kind: HandoffKind
    body: Mapping[str, JSONValue]
    asked_by: str
    asked_at: float
    taken_by: str | None
    taken_at: float | None
    answered_at: float | None
    answer: Mapping[str, JSONValue] | None
