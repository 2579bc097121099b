"""Between a backend's rows and the domain's dataclasses: column lists, row mappers, JSON.

Shared by every SQL backend: both select the same columns in the same order, so each
``*_COLUMNS`` list and its mapper read the same positions and live side by side. JSON is
written as text, the same text for the same data on every backend, and parsed here
(PostgreSQL's ``json`` columns are read as text: ``postgres/connections`` makes them so).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from rollbackd.core.model import (
    Event,
    Handoff,
    HandoffKind,
    JSONValue,
    Lease,
    Rollback,
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

Row = Sequence[Any]


def check_limit(limit: int) -> None:
    """Refuse a ``limit`` below 1, before touching the database."""
    if limit < 1:
        raise ValueError(f"limit must be positive, got: {limit}")


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float spelt as Prometheus spells it."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def dump_json(value: Mapping[str, JSONValue]) -> str:
    """A JSON object column. Keys sorted and no spaces: the same data is the same text."""
    return json.dumps(_finite(value), sort_keys=True, allow_nan=False, separators=(",", ":"))


def dump_json_list(value: Sequence[JSONValue]) -> str:
    """A JSON array column."""
    return json.dumps(_finite(list(value)), allow_nan=False)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


VERSION_COLUMNS = "service, version, first_seen, last_seen, source, baked_at, bad, bad_reason, meta"


def version_record(row: Row) -> VersionRecord:
    return VersionRecord(
        service=row[0],
        version=row[1],
        first_seen=float(row[2]),
        last_seen=float(row[3]),
        source=VersionSource(row[4]),
        baked_at=_optional_float(row[5]),
        bad=bool(row[6]),
        bad_reason=row[7],
        meta={str(key): str(value) for key, value in json.loads(row[8]).items()},
    )


VERSION_CHANGE_COLUMNS = "id, service, from_version, to_version, at, source"


def version_change(row: Row) -> VersionChange:
    return VersionChange(
        id=int(row[0]),
        service=row[1],
        from_version=row[2],
        to_version=row[3],
        at=float(row[4]),
        source=VersionSource(row[5]),
    )


SERVICE_STATE_COLUMNS = (
    "service, current_version, current_since, healthy_since, paused, frozen, frozen_reason"
)


def service_state(row: Row) -> ServiceState:
    return ServiceState(
        service=row[0],
        current_version=row[1],
        current_since=_optional_float(row[2]),
        healthy_since=_optional_float(row[3]),
        paused=bool(row[4]),
        frozen=bool(row[5]),
        frozen_reason=row[6],
    )


CHECK_STATE_COLUMNS = "service, check_name, state, updated_at"


def check_state(row: Row) -> StoredCheckState:
    return StoredCheckState(row[0], row[1], row[2], float(row[3]))


# "trigger" is quoted: a keyword of PostgreSQL's, if not a reserved one.
ROLLBACK_COLUMNS = """id, service, from_version, release_id, to_version, state, source,
       automatic, reason, mode, canary, "trigger", guards, created_at, updated_at, started_at,
       finished_at, expires_at, decided_by, outcome"""
ROLLBACK_SELECT = f"SELECT {ROLLBACK_COLUMNS} FROM rollbacks"  # noqa: S608


def rollback(row: Row) -> Rollback:
    return Rollback(
        id=int(row[0]),
        service=row[1],
        # '' in the table, so that the release key is never NULL; None to callers.
        from_version=row[2] or None,
        release_id=int(row[3]),
        to_version=row[4],
        state=RollbackState(row[5]),
        source=row[6],
        automatic=bool(row[7]),
        reason=row[8],
        mode=row[9],
        canary=bool(row[10]),
        trigger=json.loads(row[11]),
        guards=json.loads(row[12]),
        created_at=float(row[13]),
        updated_at=float(row[14]),
        started_at=_optional_float(row[15]),
        finished_at=_optional_float(row[16]),
        expires_at=_optional_float(row[17]),
        decided_by=row[18],
        outcome=row[19],
    )


STEP_COLUMNS = """id, rollback_id, kind, executor, started_at, finished_at, ok, summary,
       stdout_tail, stderr_tail, command"""


def step(row: Row) -> Step:
    return Step(
        id=int(row[0]),
        rollback_id=int(row[1]),
        kind=row[2],
        executor=row[3],
        started_at=float(row[4]),
        finished_at=_optional_float(row[5]),
        ok=None if row[6] is None else bool(row[6]),
        summary=row[7],
        stdout_tail=row[8],
        stderr_tail=row[9],
        command=json.loads(row[10]),
    )


TRIGGER_COLUMNS = "id, rollback_id, at, source, detail"


def trigger(row: Row) -> Trigger:
    return Trigger(int(row[0]), int(row[1]), float(row[2]), row[3], json.loads(row[4]))


ALERT_COLUMNS = """id, fingerprint, status, starts_at, ends_at, alertname, labels,
       annotations, generator_url, receiver, group_key, received_at, last_received_at,
       deliveries, matched_service, handled_at, outcome, rollback_id"""
ALERT_SELECT = f"SELECT {ALERT_COLUMNS} FROM alerts"  # noqa: S608


def alert(row: Row) -> StoredAlert:
    return StoredAlert(
        id=int(row[0]),
        fingerprint=row[1],
        status=row[2],
        starts_at=float(row[3]),
        ends_at=_optional_float(row[4]),
        alertname=row[5],
        labels=json.loads(row[6]),
        annotations=json.loads(row[7]),
        generator_url=row[8],
        receiver=row[9],
        group_key=row[10],
        received_at=float(row[11]),
        last_received_at=float(row[12]),
        deliveries=int(row[13]),
        matched_service=row[14],
        handled_at=_optional_float(row[15]),
        outcome=row[16],
        rollback_id=None if row[17] is None else int(row[17]),
    )


HANDOFF_COLUMNS = """id, service, kind, body, asked_by, asked_at, taken_by, taken_at,
       answered_at, answer"""


def handoff(row: Row) -> Handoff:
    return Handoff(
        id=int(row[0]),
        service=row[1],
        kind=HandoffKind(row[2]),
        body=json.loads(row[3]),
        asked_by=row[4],
        asked_at=float(row[5]),
        taken_by=row[6],
        taken_at=_optional_float(row[7]),
        answered_at=_optional_float(row[8]),
        answer=None if row[9] is None else json.loads(row[9]),
    )


EVENT_COLUMNS = "id, at, type, service, rollback_id, data"


def event(row: Row) -> Event:
    return Event(
        id=int(row[0]),
        at=float(row[1]),
        type=row[2],
        service=row[3],
        rollback_id=None if row[4] is None else int(row[4]),
        data=json.loads(row[5]),
    )


def lease(row: Sequence[Any]) -> Lease:
    return Lease(
        service=row[0],
        holder=row[1],
        epoch=int(row[2]),
        acquired_at=float(row[3]),
        expires_at=float(row[4]),
    )


def check_ttl(ttl: float) -> None:
    """Refuse a ttl that is negative or not finite, before touching the database."""
    if not math.isfinite(ttl) or ttl < 0:
        raise ValueError(f"ttl must be finite and 0 or more, got: {ttl}")


def check_name(what: str, name: str) -> None:
    if not name:
        raise ValueError(f"{what} must not be empty")
