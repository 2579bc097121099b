"""Whether a version has earned its bake: the evidence of its bake period, counted.

A version becomes the last known good (the next rollback's target) only after a bake period
(``bake_time``) in which every rollback check was actually judged OK -- verdict OK, so with
traffic at or above ``min_rate`` -- in more than half of its evaluations, and at least once.
NO_DATA, ERROR and BREACH are not health: a version whose checks never had traffic, or could
not reach Prometheus, has shown nothing, and an absence of evidence must not make it the
version rolled back to.

Mapped Alertmanager alerts are evidence the same way when Alertmanager's API is read
(``[alertmanager] url``): a poll counts OK when Alertmanager answered and no mapped alert of
the service was active, not OK when one was (which also restarts the bake clock), and as a
gap when Alertmanager could not be read. A service with only ``[[alert]]`` mappings and no
Alertmanager to read has no evidence at all and never bakes by itself.

Evidence belongs to one version and one bake period: recording for another version starts
afresh, and evidence that began before the period asked about is dropped (``within``). A
bake period that ends with every source evaluated but one of them short of the majority ends
there: the next period starts (the engine restarts the clock). So a version that had no
traffic all night bakes on the morning's traffic a bake_time later, instead of having to
outweigh the night; a source not evaluated at all yet (a check whose interval is longer than
the period) is waited for instead.

Pure: no I/O and no clock. Counts, not lists, so the evidence of a version stays a few
integers per check however long it runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from rollbackd.checks.base import Action
from rollbackd.checks.judge import Measurement
from rollbackd.core.durations import format_duration
from rollbackd.core.samples import Verdict

REASON_LIMIT = 160
"""Characters of a gap's reason kept to explain it: reasons quote Prometheus' errors."""

NO_ALERTMANAGER = (
    "alert-only service and no [alertmanager] url: nothing shows its versions healthy; "
    "record a good one with: rollbackd release SERVICE VERSION --meta known_good=true"
)


def _cut(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= REASON_LIMIT else flat[: REASON_LIMIT - 3] + "..."


@dataclass(frozen=True)
class Tally:
    """The verdicts of one source (a check, or the Alertmanager reads) in one bake period."""

    ok: int = 0
    no_data: int = 0
    error: int = 0
    breach: int = 0
    no_data_reason: str = ""
    """Why the latest NO_DATA evaluation had nothing to judge."""
    error_reason: str = ""
    """Why the latest ERROR evaluation failed."""

    @property
    def total(self) -> int:
        return self.ok + self.no_data + self.error + self.breach

    @property
    def enough(self) -> bool:
        """Judged OK at least once, and in more than half of the evaluations."""
        return self.ok >= 1 and 2 * self.ok > self.total

    def add(self, verdict: Verdict, reason: str = "") -> Tally:
        if verdict is Verdict.OK:
            return replace(self, ok=self.ok + 1)
        if verdict is Verdict.BREACH:
            return replace(self, breach=self.breach + 1)
        if verdict is Verdict.ERROR:
            return replace(self, error=self.error + 1, error_reason=_cut(reason))
        return replace(self, no_data=self.no_data + 1, no_data_reason=_cut(reason))


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def describe_check(name: str, tally: Tally) -> str:
    """``check error-rate judged OK in 2 of 40 evaluations (38 no data: traffic ...)``."""
    parts = []
    if tally.no_data:
        parts.append(f"{tally.no_data} no data: {tally.no_data_reason or 'no answer'}")
    if tally.error:
        parts.append(
            f"{_plural(tally.error, 'error', 'errors')}: {tally.error_reason or 'query failed'}"
        )
    if tally.breach:
        parts.append(_plural(tally.breach, "breach", "breaches"))
    why = f" ({'; '.join(parts)})" if parts else ""
    return (
        f"check {name} judged OK in {tally.ok} of "
        f"{_plural(tally.total, 'evaluation', 'evaluations')}{why}"
    )


def describe_alerts(tally: Tally) -> str:
    """``alerts clear in 2 of 40 Alertmanager reads (38 unreadable: connection refused)``."""
    parts = []
    if tally.error:
        parts.append(f"{tally.error} unreadable: {tally.error_reason or 'no answer'}")
    if tally.breach:
        parts.append(f"{tally.breach} with a mapped alert active")
    why = f" ({'; '.join(parts)})" if parts else ""
    reads = _plural(tally.total, "Alertmanager read", "Alertmanager reads")
    return f"alerts clear in {tally.ok} of {reads}{why}"


def evaluation_verdict(
    measurements: Sequence[Measurement], version_label: str | None, current: str | None
) -> tuple[Verdict, str]:
    """One evaluation of one check as evidence, with the reason of the measurement that
    decided it. ``version_label``: the label a version-scoped check's series are grouped by;
    then only the current version's own series count (and a failure of the whole query).
    Among the series counted: BREACH when any breaches, else OK when any is OK, else ERROR
    when the query failed, else NO_DATA. OK thus needs a judged series; other versions'
    series, or series without traffic beside a healthy one, neither help nor hurt."""
    counted = [
        m
        for m in measurements
        if version_label is None or not m.labels or dict(m.labels).get(version_label) == current
    ]
    for verdict in (Verdict.BREACH, Verdict.OK, Verdict.ERROR, Verdict.NO_DATA):
        decisive = next((m for m in counted if m.verdict is verdict), None)
        if decisive is not None:
            return verdict, decisive.reason
    return Verdict.NO_DATA, f"no series of {version_label}={current!r}"


@dataclass(frozen=True)
class Evidence:
    """What one version's current bake period has shown so far."""

    version: str | None = None
    first_at: float | None = None
    """When the earliest evaluation counted here was made: evidence that began before a
    bake period is not that period's."""
    checks: Mapping[str, Tally] = field(default_factory=dict)
    alerts: Tally = Tally()
    """The Alertmanager reads."""

    def _for(self, version: str | None, at: float) -> Evidence:
        if version != self.version:
            return Evidence(version=version, first_at=at)
        if self.first_at is not None and self.first_at <= at:
            return self
        return replace(self, first_at=at)


def record_check(
    evidence: Evidence, version: str | None, check: str, verdict: Verdict, reason: str, at: float
) -> Evidence:
    """Count one evaluation of ``check`` made at ``at`` for ``version``."""
    base = evidence._for(version, at)
    tallies = dict(base.checks)
    tallies[check] = tallies.get(check, Tally()).add(verdict, reason)
    return replace(base, checks=tallies)


def record_alerts(
    evidence: Evidence, version: str | None, verdict: Verdict, reason: str, at: float
) -> Evidence:
    """Count one read of Alertmanager made at ``at`` for ``version``: OK (none of the
    service's mapped alerts active), BREACH (one was), ERROR (not read)."""
    base = evidence._for(version, at)
    return replace(base, alerts=base.alerts.add(verdict, reason))


def within(evidence: Evidence, version: str | None, since: float | None) -> Evidence:
    """The evidence of ``version``'s bake period that started at ``since`` (None: no
    period runs): all of it when every evaluation counted was made in that period, else
    none -- counts cannot be split by time, and a restarted period starts from nothing."""
    if (
        since is None
        or evidence.version != version
        or evidence.first_at is None
        or evidence.first_at < since
    ):
        return Evidence(version=version)
    return evidence


@dataclass(frozen=True)
class Requirement:
    """Which evidence a service's versions need to bake."""

    checks: tuple[str, ...] = ()
    """The checks whose evaluations must show health."""
    alerts: bool = False
    """Alertmanager must have been read with none of the mapped alerts active."""
    unobservable: bool = False
    """Nothing can show the service healthy: it has only alerts, and Alertmanager is not
    read. Its versions never bake by themselves."""


def requirement(
    checks: Iterable[tuple[str, Action]], *, has_alerts: bool, alertmanager: bool
) -> Requirement:
    """``checks``: (name, action) of each check of the service; ``has_alerts``: it has
    ``[[alert]]`` mappings; ``alertmanager``: Alertmanager's API is read."""
    every = list(checks)
    needed = tuple(name for name, action in every if action is Action.ROLLBACK)
    if not needed and not has_alerts:
        # Never rolled back automatically, but its last known good is still the target of
        # a manual rollback and a baseline: judged by the checks it has.
        needed = tuple(name for name, _ in every)
    reads = has_alerts and alertmanager
    return Requirement(
        checks=needed, alerts=reads, unobservable=not needed and has_alerts and not reads
    )


class Judgement(StrEnum):
    """What the evidence of a bake period that has lasted bake_time says."""

    ENOUGH = "enough"
    """Every source judged OK in most of its evaluations: the version bakes."""
    NOT_YET = "not_yet"
    """A source has not been evaluated at all (or can never be): wait for it."""
    NOT_ENOUGH = "not_enough"
    """A source was evaluated but not judged OK in most evaluations: the period ends
    without a bake, and the next one starts."""


@dataclass(frozen=True)
class Assessment:
    judgement: Judgement
    shortfalls: tuple[str, ...] = ()
    """In words, each source that is not enough yet."""


def assess(evidence: Evidence, need: Requirement) -> Assessment:
    if need.unobservable:
        return Assessment(Judgement.NOT_YET, (NO_ALERTMANAGER,))
    lacking: list[str] = []
    unseen: list[str] = []
    for name in need.checks:
        tally = evidence.checks.get(name, Tally())
        if tally.total == 0:
            unseen.append(f"check {name} not evaluated yet")
        elif not tally.enough:
            lacking.append(describe_check(name, tally))
    if need.alerts:
        if evidence.alerts.total == 0:
            unseen.append("Alertmanager not read yet")
        elif not evidence.alerts.enough:
            lacking.append(describe_alerts(evidence.alerts))
    if lacking:
        return Assessment(Judgement.NOT_ENOUGH, (*lacking, *unseen))
    if unseen:
        return Assessment(Judgement.NOT_YET, tuple(unseen))
    return Assessment(Judgement.ENOUGH)


@dataclass(frozen=True)
class Shortfall:
    """A bake period of ``version`` that ended at ``ended_at`` without enough evidence."""

    version: str
    ended_at: float
    shortfalls: tuple[str, ...]


class BakeState(StrEnum):
    NO_VERSION = "no_version"
    BAKED = "baked"
    BAKING = "baking"
    NOT_BAKING = "not_baking"
    NO_EVIDENCE = "no_evidence"


@dataclass(frozen=True)
class BakeStatus:
    """Where the current version stands on its way to the last known good, in words."""

    state: BakeState
    summary: str


def _time(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(seconds: float) -> str:
    return format_duration(timedelta(seconds=max(0, int(seconds))))


def bake_status(
    *,
    version: str | None,
    baked_at: float | None,
    bad_reason: str | None,
    healthy_since: float | None,
    now: float,
    bake_time: timedelta,
    blockers: Sequence[str],
    assessment: Assessment,
    shortfall: Shortfall | None,
) -> BakeStatus:
    """Why the current version has (not) baked. ``bad_reason``: set when the version was
    marked bad; ``blockers``: what was unhealthy at the last poll (a check or an alert
    firing); ``shortfall``: the last bake period that ended without enough evidence."""
    if version is None:
        return BakeStatus(BakeState.NO_VERSION, "no version known yet")
    if baked_at is not None:
        return BakeStatus(BakeState.BAKED, f"baked at {_time(baked_at)}")
    if bad_reason is not None:
        return BakeStatus(BakeState.NOT_BAKING, f"never bakes: marked bad ({bad_reason})")
    if assessment.judgement is Judgement.NOT_YET and NO_ALERTMANAGER in assessment.shortfalls:
        return BakeStatus(BakeState.NO_EVIDENCE, f"no evidence: {NO_ALERTMANAGER}")
    if blockers:
        return BakeStatus(BakeState.NOT_BAKING, f"not baking: {', '.join(blockers)}")
    if healthy_since is None:
        return BakeStatus(
            BakeState.NOT_BAKING, "not baking: the bake clock starts at the next poll"
        )
    period = f"{_span(now - healthy_since)} of {format_duration(bake_time)}"
    enough = assessment.judgement is Judgement.ENOUGH
    so_far = "evidence ok" if enough else f"so far: {'; '.join(assessment.shortfalls)}"
    if shortfall is not None and shortfall.version == version and not enough:
        return BakeStatus(
            BakeState.NOT_BAKING,
            f"not baking: {'; '.join(shortfall.shortfalls)} in the bake period that ended at "
            f"{_time(shortfall.ended_at)}; the next period: {period}, {so_far}",
        )
    if now - healthy_since < bake_time.total_seconds():
        return BakeStatus(BakeState.BAKING, f"baking: {period}, {so_far}")
    if enough:
        return BakeStatus(
            BakeState.BAKING, f"baking: {period}, evidence ok; bakes at the next poll"
        )
    return BakeStatus(BakeState.NOT_BAKING, f"not baking: {'; '.join(assessment.shortfalls)}")


__all__ = [
    "NO_ALERTMANAGER",
    "Assessment",
    "BakeState",
    "BakeStatus",
    "Evidence",
    "Judgement",
    "Requirement",
    "Shortfall",
    "Tally",
    "assess",
    "bake_status",
    "describe_alerts",
    "describe_check",
    "evaluation_verdict",
    "record_alerts",
    "record_check",
    "requirement",
    "within",
]
