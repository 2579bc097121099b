"""What the HTTP API accepts and answers (SPEC §5), as pydantic models: the OpenAPI document
is generated from these, so the constraints written here are the ones clients see.

Requests to our own routes are strict (an unknown key is a 422 naming it); the Alertmanager
payload ignores unknown keys, since newer Alertmanagers add fields. Every string is checked
to be valid Unicode text (JSON may carry lone surrogates, which SQLite cannot store), and
text that may reach an executor (reasons, names) is one line without control characters.
Times in answers are UTC unix seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
"""A service name, as rule files allow it."""
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
"""As ``versions.VERSION_PATTERN``: it becomes part of argv, URLs and paths."""
_ONE_LINE = r"^[^\x00-\x1f\x7f]*$"
_ONE_LINE_NOT_BLANK = r"^[^\x00-\x1f\x7f]*[^\x00-\x20\x7f][^\x00-\x1f\x7f]*$"


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


def _rfc3339_text(value: object) -> object:
    # Pydantic would also take a number as seconds since the epoch; Alertmanager sends text.
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 timestamp string")
    return value


def _json_integer(value: object) -> object:
    # As JSON Schema counts: 3 and 3.0 are integers; true and "3" are not (pydantic's lax
    # mode would take both, its strict mode would refuse 3.0).
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("must be an integer")
    return int(value)


def _utc_representable(value: datetime) -> datetime:
    # "9999-12-31T23:59:59-23:00" parses, but is past year 9999 in UTC: the receiver's
    # conversion to unix seconds would raise OverflowError, a 500.
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("must be a time between the years 1 and 9999 in UTC") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
Timestamp = Annotated[
    AwareDatetime, BeforeValidator(_rfc3339_text), AfterValidator(_utc_representable)
]
"""RFC 3339 with a zone; 9 fractional digits are read (to the microsecond)."""
"""Any text (alert labels and annotations): stored as data, never used as a name."""
ServiceName = Annotated[str, Field(pattern=NAME_PATTERN, examples=["checkout"])]
Version = Annotated[str, Field(pattern=VERSION_PATTERN, examples=["1.4.2"])]
Reason = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1000,
        pattern=_ONE_LINE_NOT_BLANK,
        description="one line of text, not blank",
        examples=["p99 doubled after 2.0.0"],
    ),
]
OptionalReason = Annotated[str, Field(max_length=1000, pattern=_ONE_LINE)]
Person = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=_ONE_LINE_NOT_BLANK,
        description="who asks; recorded in the audit log (the token is shared, so this is "
        "what the client says)",
        examples=["alice"],
    ),
]
MetaKey = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")]
MetaValue = Annotated[str, Field(max_length=1024, pattern=_ONE_LINE)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Answer(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- requests -----------------------------------------------------------------------------


class RollbackRequest(Request):
    service: ServiceName
    to_version: Version | None = Field(
        default=None, description="the version to put back; default: the last known good"
    )
    reason: Reason
    requested_by: Person | None = None


class DecisionRequest(Request):
    by: Person | None = None
    reason: OptionalReason = ""


class AutomationRequest(Request):
    by: Person | None = None


class ReleaseRequest(Request):
    service: ServiceName
    version: Version
    meta: dict[MetaKey, MetaValue] = Field(
        default_factory=dict,
        max_length=32,
        description="e.g. commit, pipeline URL",
        # Pydantic describes the key pattern as patternProperties only, which would let any
        # other key through; the model refuses them, and the document must say so.
        json_schema_extra={"additionalProperties": False},
    )


class HistoryQuery(Request):
    """Unknown query parameters are refused too: a misspelt filter must not silently
    return everything."""

    service: str | None = Field(default=None, max_length=63)
    state: (
        Literal[
            "pending",
            "running",
            "verifying",
            "succeeded",
            "failed",
            "rejected",
            "expired",
            "interrupted",
            "dry_run",
        ]
        | None
    ) = None
    limit: int = Field(default=50, ge=1, le=1000)


class AlertsQuery(Request):
    service: str | None = Field(default=None, max_length=63)
    limit: int = Field(default=50, ge=1, le=1000)


class AlertmanagerAlert(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    status: Literal["firing", "resolved"]
    labels: dict[Text, Text]
    annotations: dict[Text, Text] = Field(default_factory=dict)
    startsAt: Timestamp
    endsAt: Timestamp | None = None
    generatorURL: Text = ""
    fingerprint: str = Field(pattern=r"^[0-9a-fA-F]{1,64}$")


class AlertmanagerWebhook(BaseModel):
    """Alertmanager's webhook payload, version 4. Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: Literal["4"]
    receiver: Text
    status: Literal["firing", "resolved"]
    alerts: list[AlertmanagerAlert]  # bounded by [server].max_body
    groupKey: Text
    groupLabels: dict[Text, Text] = Field(default_factory=dict)
    commonLabels: dict[Text, Text] = Field(default_factory=dict)
    commonAnnotations: dict[Text, Text] = Field(default_factory=dict)
    externalURL: Text = ""
    truncatedAlerts: Annotated[int, BeforeValidator(_json_integer)] = Field(
        default=0, ge=0, le=2**31
    )


# -- answers ------------------------------------------------------------------------------


class ErrorOut(Answer):
    detail: str


class HealthOut(Answer):
    status: Literal["ok"] = "ok"


class ReadyCheckOut(Answer):
    ok: bool
    detail: str


class ReadyOut(Answer):
    ready: bool
    checks: dict[str, ReadyCheckOut]


class GuardOut(Answer):
    guard: str
    passed: bool
    reason: str


class StepOut(Answer):
    id: int
    kind: str
    executor: str
    started_at: float
    finished_at: float | None
    ok: bool | None
    summary: str
    stdout_tail: str
    stderr_tail: str
    command: list[str]


class TriggerOut(Answer):
    id: int
    at: float
    source: str
    detail: dict[str, Any]


class RollbackOut(Answer):
    id: int
    service: str
    from_version: str | None
    to_version: str | None
    state: str
    source: str
    automatic: bool
    reason: str
    mode: str
    canary: bool
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    decided_by: str | None
    outcome: str
    trigger: dict[str, Any]
    guards: list[dict[str, Any]]
    steps: list[StepOut]
    triggers: list[TriggerOut] = Field(
        description="later triggers that joined this rollback: the first 100 (an alert "
        "storm joins thousands)"
    )
    triggers_total: int = Field(description="how many triggers joined, all told")


class SubmissionOut(Answer):
    outcome: str = Field(
        description="executing, pending_approval, dry_run, refused, joined or ignored"
    )
    reason: str
    rollback_id: int | None
    rollback: RollbackOut | None
    guards: list[GuardOut]


class HistoryOut(Answer):
    rollbacks: list[RollbackOut]


class CheckOut(Answer):
    name: str
    type: str
    action: str
    phase: str = Field(description="ok, pending or firing")
    blind: bool
    firing_series: list[dict[str, str]]
    evidence: str | None = Field(
        default=None,
        description="a compare check's sequential test at its last evaluation here, in words",
    )


class BakeOut(Answer):
    state: Literal["no_version", "baked", "baking", "not_baking", "no_evidence"]
    summary: str = Field(
        description="why the current version has (not) baked: its bake clock, the evidence "
        "of its checks and alerts, or what fires"
    )


class ServiceOut(Answer):
    name: str
    current_version: str | None
    current_since: float | None
    healthy_since: float | None
    last_known_good: str | None
    paused: bool
    frozen: bool
    frozen_reason: str | None
    canary_active: bool
    checks: list[CheckOut]
    alerts: list[str] = Field(description="the Alertmanager alerts mapped to this service")
    bake: BakeOut
    # Only when daemons share PostgreSQL (absent alone, on SQLite):
    holder: str | None = Field(
        default=None,
        description="PostgreSQL only: the member name of the daemon that holds the service's "
        "lease now; null while no daemon holds it",
    )
    held_since: float | None = Field(
        default=None, description="PostgreSQL only: when the holder's lease tenure began"
    )
    epoch: int | None = Field(
        default=None, description="PostgreSQL only: the fencing epoch of the holder's lease"
    )


class StatusOut(Answer):
    version: str
    mode: str
    paused_all: bool
    services: list[ServiceOut]
    in_flight: list[RollbackOut]
    member: str | None = Field(
        default=None,
        description="PostgreSQL only (absent on SQLite): the member name of the daemon that "
        "answered",
    )


class AutomationOut(Answer):
    scope: str
    paused: bool
    thawed: bool = Field(description="resume also thawed a frozen service")
    paused_scopes: list[str]


class ReleaseOut(Answer):
    service: str
    version: str
    changed: bool
    previous: str | None
    bad: bool = Field(description="this version was rolled back before")


class AlertOut(Answer):
    id: int
    fingerprint: str
    status: str
    alertname: str
    starts_at: float
    ends_at: float | None
    labels: dict[str, str]
    annotations: dict[str, str]
    receiver: str
    group_key: str
    received_at: float
    last_received_at: float
    deliveries: int
    matched_service: str | None
    handled_at: float | None
    outcome: str
    rollback_id: int | None


class AlertsOut(Answer):
    alerts: list[AlertOut]


class WebhookAlertOut(Answer):
    id: int
    fingerprint: str
    status: str
    alertname: str
    service: str | None
    new: bool
    deliveries: int
    outcome: str
    rollback_id: int | None


class WebhookOut(Answer):
    received: int
    new: int
    alerts: list[WebhookAlertOut]
