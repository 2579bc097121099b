"""``rollbackd replay``: the same judging and state machine over past Prometheus data.

It shows when each check would have fired and which rollbacks would have run, so rules can
be tuned before they are trusted. It runs the same code as the daemon — ``judge`` and
``step_check`` — over ``query_range`` answers, one step per check interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from rollbackd.checks.base import Action, CheckSpec, Span
from rollbackd.checks.judge import Scope, judge
from rollbackd.config.loader import LoadedConfig, Service
from rollbackd.core.check_state import CheckState, Judged, Transition, step_check
from rollbackd.core.samples import QueryResult, RangeResult, ResultType, Sample
from rollbackd.prometheus import PrometheusClient


@dataclass(frozen=True)
class ReplayEvent:
    at: float
    service: str
    check: str | None
    kind: str
    """``version``, ``canary``, ``pending``, ``fired``, ``cleared``, ``recovered``,
    ``would_roll_back``, ``would_notify``."""
    text: str


@dataclass(frozen=True)
class VersionTimeline:
    """The running version at each moment, as the daemon would have seen it."""

    points: tuple[tuple[float, str | None], ...]

    def at(self, moment: float) -> tuple[str | None, float | None, str | None]:
        """(current version, when it went live, the version before it) at ``moment``."""
        current: str | None = None
        since: float | None = None
        previous: str | None = None
        for at, version in self.points:
            if at > moment:
                break
            if version != current:
                previous, current, since = current, version, at
        return current, since, previous


def _grid(start: float, end: float, step: float) -> list[float]:
    count = math.floor((end - start) / step) + 1
    return [start + i * step for i in range(max(count, 0))]


def _instant(result: RangeResult, at: float, step: float) -> QueryResult:
    samples = []
    for series in result.series:
        for ts, value in series.samples:
            if abs(ts - at) < step / 2:
                samples.append(Sample(series.labels, value, ts))
                break
    return QueryResult(result.expr, ResultType.VECTOR, tuple(samples))


def _answers(
    client: PrometheusClient, check: CheckSpec, by: str | None, start: float, end: float
) -> Callable[[float, Scope], dict[str, QueryResult]]:
    """The check's answers at each step. A check counting since the release queries each
    step afresh (its ranges end at the release); the others read every step out of one
    range query per query."""
    step = check.interval.total_seconds()
    if check.counts_since_release:

        def since_release(at: float, scope: Scope) -> dict[str, QueryResult]:
            if scope.span is None:
                return {}
            queries = check.queries_since(scope.span, by)
            return {q.role: client.query(q.expr, at=at) for q in queries}

        return since_release
    ranges = {q.role: client.query_range(q.expr, start, end, step) for q in check.queries(by)}
    return lambda at, _: {role: _instant(r, at, step) for role, r in ranges.items()}


def version_timeline(
    client: PrometheusClient, service: Service, start: float, end: float, step: float
) -> VersionTimeline:
    query = service.rules.service.version_query
    if not query:
        return VersionTimeline(())
    label = service.rules.service.version_query_label
    answer = client.query_range(query, start, end, step)
    first_seen: dict[str, float] = {}
    points: list[tuple[float, str | None]] = []
    for at in _grid(start, end, step):
        present = [s.label(label) for s in _instant(answer, at, step).samples if s.label(label)]
        for version in present:
            if version is not None:
                first_seen.setdefault(version, at)
        # The version that appeared most recently is the current one, as in the daemon.
        current = max(present, key=lambda v: (first_seen[v or ""], v or ""), default=None)
        points.append((at, current))
    return VersionTimeline(tuple(points))


def replay_check(
    client: PrometheusClient,
    service: Service,
    check: CheckSpec,
    versions: VersionTimeline,
    start: float,
    end: float,
) -> list[ReplayEvent]:
    step = check.interval.total_seconds()
    scope_label = service.rules.version_scope
    answers = _answers(client, check, scope_label, start, end)
    policy = check.policy()
    state = CheckState(series={})
    events: list[ReplayEvent] = []
    rolled_back: set[str | None] = set()
    window = service.rules.service.rollback_window.total_seconds()
    for at in _grid(start, end, step):
        current, since, previous = versions.at(at)
        scope = Scope(version_label=scope_label, current_version=current)
        if check.counts_since_release:
            scope = replace(scope, span=None if since is None else Span.since_release(since, at))
        measurements = judge(check, answers(at, scope), scope)
        by_labels = {m.labels: m for m in measurements}
        state, changes = step_check(
            state,
            Judged({m.labels: m.verdict for m in measurements}),
            datetime.fromtimestamp(at, tz=UTC),
            policy,
        )
        for change in changes:
            if change.labels is None:
                continue
            m = by_labels.get(change.labels)
            series = m.series if m else ""
            reason = m.reason if m else "series vanished"
            events.append(
                ReplayEvent(
                    at,
                    service.name,
                    check.name,
                    change.transition.value,
                    f"{series} {reason}".strip(),
                )
            )
            if change.transition is not Transition.FIRED:
                continue
            if check.action is Action.NOTIFY:
                events.append(ReplayEvent(at, service.name, check.name, "would_notify", reason))
                continue
            pending = (
                change.state.pending_since.timestamp()
                if (change.state and change.state.pending_since)
                else at
            )
            if current in rolled_back:
                continue
            if since is not None and pending < since:
                why = "breach started before the current version went live: no rollback"
            elif since is not None and at - since > window:
                why = "outside rollback_window: no rollback"
            else:
                rolled_back.add(current)
                target = previous or "the last known good version"
                events.append(
                    ReplayEvent(
                        at,
                        service.name,
                        check.name,
                        "would_roll_back",
                        f"would roll back {service.name} {current or '?'} -> {target}: {reason}",
                    )
                )
                continue
            events.append(ReplayEvent(at, service.name, check.name, "would_hold", why))
    return events


def replay(
    client: PrometheusClient,
    loaded: LoadedConfig,
    start: float,
    end: float,
    services: Sequence[str] = (),
) -> list[ReplayEvent]:
    events: list[ReplayEvent] = []
    for service in loaded.services.values():
        if services and service.name not in services:
            continue
        checks = service.rules.check
        step = min((c.interval.total_seconds() for c in checks), default=15.0)
        versions = version_timeline(client, service, start, end, step)
        last: str | None = None
        for at, version in versions.points:
            if version != last and version is not None:
                text = f"{last} -> {version}" if last else version
                events.append(ReplayEvent(at, service.name, None, "version", text))
                last = version
        mine: list[ReplayEvent] = []
        for check in checks:
            mine.extend(replay_check(client, service, check, versions, start, end))
        events.extend(_one_rollback_per_release(mine))
    return sorted(events, key=lambda e: (e.at, e.service, e.check or ""))


def _one_rollback_per_release(events: list[ReplayEvent]) -> list[ReplayEvent]:
    """Several checks firing on one bad release make one rollback, as in the daemon, where
    a rollback is keyed by (service, from_version): keep the earliest."""
    kept: list[ReplayEvent] = []
    releases: set[str] = set()
    for event in sorted(events, key=lambda e: (e.at, e.check or "")):
        if event.kind == "would_roll_back":
            release = event.text.split(" -> ")[0]
            if release in releases:
                continue
            releases.add(release)
        kept.append(event)
    return kept
