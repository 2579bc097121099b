"""The guards every rollback passes, whatever its source: a pure function of the facts.

Each guard gives a verdict and a reason in words; all are evaluated and recorded, and the
first that refuses decides. The pipeline gathers the facts (``GuardFacts``) from the store
and the engine; nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from rollbackd.core.durations import format_duration
from rollbackd.core.model import Mode


class Outcome(StrEnum):
    EXECUTE = "execute"
    AWAIT_APPROVAL = "await_approval"
    DRY_RUN = "dry_run"
    REFUSE = "refuse"


@dataclass(frozen=True)
class GuardResult:
    guard: str
    passed: bool
    reason: str

    def as_json(self) -> dict[str, str | bool]:
        return {"guard": self.guard, "passed": self.passed, "reason": self.reason}


@dataclass(frozen=True)
class GuardFacts:
    """Everything the guards look at, gathered at decision time."""

    now: float
    automatic: bool
    """A check or an alert; False for a person's request, which pause, freeze, window and
    cooldown do not stop (a person decided)."""
    mode: Mode
    paused: bool
    frozen: bool
    frozen_reason: str | None
    current_version: str | None
    current_since: float | None
    breach_started: float | None
    version_lag: timedelta
    """How late a version change can be seen: one poll of version_query. A breach seen
    up to this long before the change was recorded may still be the release's doing."""
    rollback_window: timedelta
    cooldown: timedelta
    last_rollback_at: float | None
    """When the service's latest executed automatic rollback started."""
    rollbacks_in_window: int
    max_rollbacks: int
    window: timedelta
    target: str | None
    target_source: str
    """``--to``, ``last known good``, or why there is none."""
    chain_needs_target: bool
    canary_abort: bool = False
    """A canary is in progress and the service has ``[canary] abort`` executors: aborting
    it needs no target version (the stable track is still serving)."""
    in_flight: int | None = None
    """The id of another live rollback of this service, if any."""


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    guards: tuple[GuardResult, ...]
    freeze: bool = False
    """Refused by max_rollbacks: the service is to be frozen and people paged."""

    @property
    def refusal(self) -> GuardResult | None:
        return next((g for g in self.guards if not g.passed), None)

    @property
    def reason(self) -> str:
        refusal = self.refusal
        return refusal.reason if refusal else self.guards[-1].reason


def _ago(now: float, then: float) -> str:
    return format_duration(timedelta(seconds=max(now - then, 0.001)))


LAPSING_GUARDS = frozenset({"one_in_flight", "paused", "frozen", "cooldown", "max_rollbacks"})
"""Guards whose refusal means "not now": the rollback in flight ends, a person resumes or
thaws, the cooldown and the max_rollbacks window pass. While the trigger still fires, a
release refused only by these is decided again (``Pipeline.reconsider``). The others —
``rollback_window``, ``breach_after_release``, ``target`` — judge the trigger against its
release, and time does not change their answer."""


def lapses(decision: Decision) -> bool:
    """Whether every guard that refused this decision may lapse."""
    return all(g.passed or g.guard in LAPSING_GUARDS for g in decision.guards)


def _one_in_flight(f: GuardFacts) -> GuardResult:
    if f.in_flight is not None:
        return GuardResult(
            "one_in_flight", False, f"rollback {f.in_flight} of this service is in flight"
        )
    return GuardResult("one_in_flight", True, "no other rollback of this service in flight")


def _paused(f: GuardFacts) -> GuardResult:
    if not f.automatic:
        return GuardResult("paused", True, "requested by a person")
    if f.paused:
        return GuardResult("paused", False, "automatic rollbacks are paused for this service")
    return GuardResult("paused", True, "not paused")


def _frozen(f: GuardFacts) -> GuardResult:
    if f.frozen and f.automatic:
        reason = f"the service is frozen: {f.frozen_reason or 'no reason given'}"
        return GuardResult("frozen", False, reason)
    return GuardResult(
        "frozen", True, "not frozen" if not f.frozen else "frozen, but a person asked"
    )


def _rollback_window(f: GuardFacts) -> GuardResult:
    window = format_duration(f.rollback_window)
    if not f.automatic:
        return GuardResult("rollback_window", True, "requested by a person")
    if f.current_since is None:
        return GuardResult("rollback_window", True, "when the current version went live is unknown")
    ago = _ago(f.now, f.current_since)
    if f.now - f.current_since > f.rollback_window.total_seconds():
        return GuardResult(
            "rollback_window",
            False,
            f"{f.current_version} went live {ago} ago, outside rollback_window {window}",
        )
    return GuardResult(
        "rollback_window", True, f"{f.current_version} went live {ago} ago, within {window}"
    )


def _breach_after_release(f: GuardFacts) -> GuardResult:
    if not f.automatic or f.breach_started is None or f.current_since is None:
        return GuardResult("breach_after_release", True, "no breach start to compare")
    if f.breach_started < f.current_since - f.version_lag.total_seconds():
        return GuardResult(
            "breach_after_release",
            False,
            f"the breach started {_ago(f.current_since, f.breach_started)} before "
            f"{f.current_version} went live: this release did not cause it",
        )
    return GuardResult(
        "breach_after_release", True, f"the breach started after {f.current_version} went live"
    )


def _cooldown(f: GuardFacts) -> GuardResult:
    cooldown = format_duration(f.cooldown)
    if not f.automatic or f.last_rollback_at is None:
        return GuardResult(
            "cooldown",
            True,
            "no recent automatic rollback" if f.automatic else "requested by a person",
        )
    if f.now - f.last_rollback_at < f.cooldown.total_seconds():
        return GuardResult(
            "cooldown",
            False,
            f"the last automatic rollback started {_ago(f.now, f.last_rollback_at)} ago, "
            f"within cooldown {cooldown}",
        )
    return GuardResult("cooldown", True, f"the last automatic rollback was over {cooldown} ago")


def _max_rollbacks(f: GuardFacts) -> GuardResult:
    window = format_duration(f.window)
    if f.automatic and f.rollbacks_in_window >= f.max_rollbacks:
        return GuardResult(
            "max_rollbacks",
            False,
            f"{f.rollbacks_in_window} rollbacks in the last {window} "
            f"(max_rollbacks {f.max_rollbacks}): freezing the service",
        )
    return GuardResult(
        "max_rollbacks",
        True,
        f"{f.rollbacks_in_window} of {f.max_rollbacks} rollbacks in the last {window}",
    )


def _target(f: GuardFacts) -> GuardResult:
    if f.target is not None:
        return GuardResult("target", True, f"target {f.target} ({f.target_source})")
    if f.canary_abort:
        return GuardResult(
            "target",
            True,
            f"no target version ({f.target_source}); aborting the canary in progress needs none",
        )
    if not f.chain_needs_target:
        return GuardResult(
            "target", True, f"no target version ({f.target_source}); the executors need none"
        )
    return GuardResult("target", False, f"no version to roll back to: {f.target_source}")


_GUARDS: tuple[Callable[[GuardFacts], GuardResult], ...] = (
    _one_in_flight,
    _paused,
    _frozen,
    _rollback_window,
    _breach_after_release,
    _cooldown,
    _max_rollbacks,
    _target,
)
"""In the order they are recorded; the first that refuses gives the decision's reason."""


def _mode(f: GuardFacts, refused: bool) -> tuple[Outcome, GuardResult]:
    """What the mode makes of the guards' verdict; recorded last, and always passing."""
    if refused:
        return Outcome.REFUSE, GuardResult("mode", True, f"mode {f.mode.value}")
    if f.mode is Mode.DRY_RUN:
        return Outcome.DRY_RUN, GuardResult(
            "mode", True, "dry-run: recorded and announced, not executed"
        )
    if f.mode is Mode.APPROVE and f.automatic:
        return Outcome.AWAIT_APPROVAL, GuardResult("mode", True, "approve: waiting for a person")
    return Outcome.EXECUTE, GuardResult(
        "mode", True, "auto" if f.automatic else f"{f.mode.value}: requested by a person"
    )


def decide(f: GuardFacts) -> Decision:
    results = [guard(f) for guard in _GUARDS]
    refused = any(not r.passed for r in results)
    outcome, mode = _mode(f, refused)
    # Refused by max_rollbacks: the service is to be frozen and people paged.
    freeze = any(r.guard == "max_rollbacks" and not r.passed for r in results)
    return Decision(outcome, (*results, mode), freeze=freeze)
