"""What every notifier says about an event, built once per event and shared by all of them.

A :class:`Message` holds the event and what a person needs to act on it: a title ("checkout
rolled back 2.0.0 → 1.0.0"), a severity, the versions, the rollback id, the checks and
values that caused it (each with a link to the Prometheus graph of its query), the guards
that decided it, and a link to the daemon. Each notifier renders it in its own format from
these fields; :meth:`Message.text` is the plain-text rendering email, Grafana and PagerDuty
use.

Events come from several producers (engine, pipeline, daemon) whose data shapes differ a
little and will grow, so everything here reads ``event.data`` defensively: a missing or
oddly typed key leaves a field empty, never raises.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from rollbackd.core.model import Event, JSONValue

Severity = Literal["critical", "error", "warning", "info"]

SEVERITY: Mapping[str, Severity] = {
    "rollback.failed": "critical",
    "verify.failed": "critical",
    "service.frozen": "critical",
    "prometheus.unreachable": "critical",
    "config.reload_failed": "error",
    "release.bad_version_deployed": "error",
    "check.breach": "warning",
    "rollback.pending": "warning",
    "rollback.started": "warning",
    "rollback.succeeded": "warning",
    "canary.aborted": "warning",
    "rollback.refused": "warning",
    "rollback.triggered": "warning",
    "rollback.expired": "warning",
}
"""Anything not listed is ``info``. A successful rollback is still a warning: a bad release
reached production."""

GRAPH_RANGE = "1h"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class Cause:
    """What caused the event: a check's measurement, or an alert's or a person's reason."""

    source: str
    """``check``, ``alert``, ``manual``, or empty when unknown."""
    reason: str
    check: str | None = None
    series: Mapping[str, str] = field(default_factory=dict)
    value: float | str | None = None
    threshold: str | None = None
    baseline: float | str | None = None
    baseline_source: str | None = None
    query: str | None = None
    graph_url: str | None = None

    def line(self) -> str:
        """One line: which check on which series, why, and the numbers behind it."""
        head = self.check or self.source or "cause"
        if self.series:
            head += "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(self.series.items())) + "}"
        numbers = []
        if self.value is not None:
            numbers.append(f"value {format_number(self.value)}")
        if self.threshold:
            numbers.append(f"threshold {self.threshold}")
        if self.baseline is not None:
            baseline = f"baseline {format_number(self.baseline)}"
            if self.baseline_source:
                baseline += f" ({self.baseline_source})"
            numbers.append(baseline)
        text = f"{head}: {self.reason}" if self.reason else head
        return f"{text} [{'; '.join(numbers)}]" if numbers else text

    def as_json(self) -> dict[str, JSONValue]:
        return {
            "source": self.source,
            "check": self.check,
            "series": dict(self.series),
            "reason": self.reason,
            "value": jsonable(self.value),
            "threshold": self.threshold,
            "baseline": jsonable(self.baseline),
            "baseline_source": self.baseline_source,
            "query": self.query,
            "graph_url": self.graph_url,
        }


@dataclass(frozen=True)
class Guard:
    """One guard's verdict on the rollback, as the pipeline recorded it."""

    name: str
    passed: bool
    reason: str

    def line(self) -> str:
        return f"{'passed' if self.passed else 'STOPPED'} {self.name}: {self.reason}"

    def as_json(self) -> dict[str, JSONValue]:
        return {"guard": self.name, "passed": self.passed, "reason": self.reason}


@dataclass(frozen=True)
class Message:
    event: Event
    title: str
    severity: Severity
    facts: tuple[tuple[str, str], ...]
    """Ordered (label, value) pairs worth a line each: why, outcome, who, how to approve."""
    causes: tuple[Cause, ...] = ()
    guards: tuple[Guard, ...] = ()
    from_version: str | None = None
    to_version: str | None = None
    link: str | None = None
    """Where the daemon shows this (``[server].public_url``), when it is known."""

    @property
    def type(self) -> str:
        return self.event.type

    @property
    def service(self) -> str | None:
        return self.event.service

    @property
    def rollback_id(self) -> int | None:
        return self.event.rollback_id

    @property
    def time(self) -> str:
        return iso_time(self.event.at)

    @property
    def graph_url(self) -> str | None:
        """The graph of the first cause that has one: the breach that started it all."""
        return next((c.graph_url for c in self.causes if c.graph_url), None)

    def text(self) -> str:
        lines = [self.title, ""]
        lines += [f"{label}: {value}" for label, value in self.facts]
        if self.causes:
            lines += ["", "Caused by:"]
            for cause in self.causes:
                lines.append(f"  - {cause.line()}")
                if cause.graph_url:
                    lines.append(f"    graph: {cause.graph_url}")
        if self.guards:
            lines += ["", "Guards:"]
            lines += [f"  - {guard.line()}" for guard in self.guards]
        lines += ["", f"Event: {self.type} at {self.time}"]
        if self.link:
            lines.append(f"More: {self.link}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, JSONValue]:
        """The event and the message fields, fit for ``json.dumps(allow_nan=False)``."""
        return {
            "id": self.event.id,
            "type": self.type,
            "at": self.event.at,
            "time": self.time,
            "service": self.service,
            "rollback_id": self.rollback_id,
            "data": jsonable(self.event.data),
            "title": self.title,
            "severity": self.severity,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "facts": {label: value for label, value in self.facts},
            "causes": [c.as_json() for c in self.causes],
            "guards": [g.as_json() for g in self.guards],
            "graph_url": self.graph_url,
            "link": self.link,
            "text": self.text(),
        }


def build_message(
    event: Event, *, prometheus_url: str | None = None, public_url: str | None = None
) -> Message:
    # A snapshot: the message is rendered later, in another task, and the publisher's
    # mapping is not ours to keep.
    snapshot = jsonable(event.data)
    data: Mapping[str, JSONValue] = snapshot if isinstance(snapshot, Mapping) else {}
    event = replace(event, data=data)
    trigger = _mapping(data.get("trigger"))
    causes: list[Cause] = []
    if event.type in ("check.breach", "check.recovered"):
        causes.append(_cause(data, "check", prometheus_url))
    elif trigger:
        causes.append(_cause(trigger, _str(trigger.get("source")) or "", prometheus_url))
    guards = tuple(
        Guard(_str(g.get("guard")) or "?", g.get("passed") is True, _str(g.get("reason")) or "")
        for g in map(_mapping, _sequence(data.get("guards")))
        if g
    )
    from_version = _str(data.get("from_version"))
    to_version = _str(data.get("to_version"))
    title, facts = _describe(event, from_version, to_version)
    return Message(
        event=event,
        title=one_line(title),
        severity=SEVERITY.get(event.type, "info"),
        facts=tuple((label, one_line(value)) for label, value in facts if value),
        causes=tuple(causes),
        guards=guards,
        from_version=from_version,
        to_version=to_version,
        link=daemon_link(public_url, event),
    )


def fallback_message(event: Event) -> Message:
    """A message that cannot fail to build, for when :func:`build_message` meets data it
    does not understand: a notification that says little beats one that never leaves."""
    service = event.service or "rollbackd"
    return Message(
        event=event, title=one_line(f"{service}: {event.type}"), severity="info", facts=()
    )


def _describe(
    event: Event, from_version: str | None, to_version: str | None
) -> tuple[str, list[tuple[str, str]]]:
    """The title and the facts, worded for each event type."""
    data = event.data
    service = event.service or "rollbackd"
    versions = f"{from_version or '?'} → {to_version or '?'}"
    reason = _str(data.get("reason"))
    outcome = _str(data.get("outcome"))
    rollback = f"#{event.rollback_id}" if event.rollback_id is not None else None
    source = _str(data.get("source"))
    facts: list[tuple[str, str]] = []
    kind = event.type
    check = _str(data.get("check")) or "?"
    if kind == "check.breach":
        title = f"{service}: check {check} breached"
        if data.get("action") == "notify":
            facts.append(("Action", "notify only: this check never rolls back"))
        facts.append(("Version", _str(data.get("version")) or ""))
    elif kind == "check.recovered":
        title = f"{service}: check {check} recovered"
    elif kind == "rollback.pending" and data.get("dry_run") is True:
        title = f"{service}: dry-run, would roll back {versions}"
    elif kind == "rollback.pending":
        title = f"{service}: rollback {versions} waits for approval"
        if event.rollback_id is not None:
            facts.append(("Approve", f"rollbackd approve {event.rollback_id}"))
            facts.append(("Reject", f"rollbackd reject {event.rollback_id}"))
        expires = data.get("expires_at")
        if isinstance(expires, int | float) and math.isfinite(expires):
            facts.append(("Expires", iso_time(expires)))
    elif kind == "rollback.started":
        canary = " (canary abort first)" if data.get("canary") is True else ""
        title = f"{service} rolling back {versions}{canary}"
    elif kind == "rollback.succeeded":
        title = f"{service} rolled back {versions}"
    elif kind == "rollback.failed":
        failed = "interrupted" if data.get("interrupted") is True else "FAILED"
        title = f"{service} rollback {versions} {failed}"
    elif kind == "canary.aborted":
        title = f"{service} canary {from_version or '?'} aborted, back on {to_version or '?'}"
        facts.append(("Step", _str(data.get("step")) or ""))
    elif kind == "verify.failed":
        title = f"{service} rollback to {to_version or '?'} did not verify"
    elif kind == "service.frozen":
        title = f"{service} frozen: no more automatic rollbacks until a person acts"
    elif kind == "prometheus.unreachable":
        title = "Prometheus unreachable: rollbackd's checks are blind"
        facts.append(("First blind check", f"{service}/{check}"))
    elif kind == "prometheus.recovered":
        title = "Prometheus reachable again: rollbackd's checks see"
    elif kind == "config.reload_failed":
        title = "rollbackd config reload failed: the previous config stays"
        problems = [p for p in (_str(x) for x in _sequence(data.get("problems"))) if p]
        facts.append(("Problems", "; ".join(problems)))
    elif kind == "release.bad_version_deployed":
        version = _str(data.get("version")) or "?"
        title = f"{service}: {version} deployed again, though it was rolled back"
        facts.append(("Rolled back because", _str(data.get("bad_reason")) or ""))
    elif kind == "version.changed":
        title = f"{service} now runs {to_version or '?'} (was {from_version or 'unknown'})"
    elif kind == "version.baked":
        title = f"{service} {_str(data.get('version')) or '?'} baked: the new last known good"
    elif kind == "rollback.refused":
        title = f"{service}: rollback refused"
    elif kind == "rollback.rejected":
        title = f"{service}: rollback {versions} rejected"
        facts.append(("Rejected by", _str(data.get("by")) or ""))
    elif kind == "rollback.expired":
        title = f"{service}: rollback {versions} expired without a decision"
    else:
        title = f"{service}: {kind}"
    if kind == "rollback.pending" and data.get("would"):
        facts.append(("Would", _str(data.get("would")) or ""))
    if kind.startswith("check."):
        reason = None  # the cause line below says it, with the numbers
    facts[:0] = [
        ("Outcome", outcome or ""),
        ("Reason", reason or ""),
        ("Rollback", f"{rollback} (source: {source})" if rollback and source else rollback or ""),
    ]
    return title, facts


def _cause(data: Mapping[str, JSONValue], source: str, prometheus_url: str | None) -> Cause:
    query = _str(data.get("query"))
    baseline = _mapping(data.get("baseline"))
    series = {str(k): str(v) for k, v in _mapping(data.get("series")).items()}
    return Cause(
        source=source,
        reason=one_line(_str(data.get("reason")) or ""),
        check=_str(data.get("check")),
        series=series,
        value=_number(data.get("value")),
        threshold=_str(data.get("threshold")),
        baseline=_number(baseline.get("value")) if baseline else None,
        baseline_source=_str(baseline.get("source")) if baseline else None,
        query=query,
        graph_url=graph_link(prometheus_url, query) if query else None,
    )


def graph_link(prometheus_url: str | None, query: str) -> str | None:
    """The Prometheus expression browser graphing ``query`` over the last hour."""
    if not prometheus_url:
        return None
    return (
        f"{_without_credentials(prometheus_url).rstrip('/')}/graph?g0.expr={quote(query, safe='')}"
        f"&g0.tab=0&g0.range_input={GRAPH_RANGE}"
    )


def daemon_link(public_url: str | None, event: Event) -> str | None:
    """The daemon's history of the service (SPEC §5 ``GET /api/v1/rollbacks``), or its
    status for events about no service."""
    if not public_url:
        return None
    base = _without_credentials(public_url).rstrip("/")
    if event.service:
        return f"{base}/api/v1/rollbacks?service={quote(event.service, safe='')}"
    return f"{base}/api/v1/status"


def _without_credentials(url: str) -> str:
    # The Prometheus URL may carry basic-auth credentials; a link shown to people must not.
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def jsonable(value: object) -> JSONValue:
    """``value`` as plain JSON: non-finite floats become ``"NaN"``, ``"+Inf"``, ``"-Inf"``
    (as Prometheus and the store write them; JSON has no such numbers), mappings and
    sequences become dicts and lists, and anything else its ``str``."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [jsonable(v) for v in value]
    return str(value)


def format_number(value: float | str) -> str:
    shown = jsonable(value)
    return shown if isinstance(shown, str) else f"{value:.4g}"


def iso_time(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def one_line(text: str) -> str:
    """Control characters (line breaks included) as spaces: a reason is free text and ends
    up in mail headers and Slack headers, where a line break is an error or an injection."""
    return _CONTROL.sub(" ", text).strip()


def _str(value: object) -> str | None:
    if value is None or isinstance(value, Mapping | list | tuple):
        return None
    return str(value)


def _number(value: object) -> float | str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return value  # "NaN", "+Inf" as the store writes them
    return None


def _mapping(value: object) -> Mapping[str, JSONValue]:
    return value if isinstance(value, Mapping) else {}


def _sequence(value: object) -> Sequence[JSONValue]:
    return value if isinstance(value, list | tuple) else ()
