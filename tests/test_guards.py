"""The guards, table-tested: each one refuses when it should, says why, and all are recorded."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from rollbackd.core.guards import GuardFacts, Outcome, decide
from rollbackd.core.model import Mode

NOW = 100_000.0

BASE = GuardFacts(
    now=NOW,
    automatic=True,
    mode=Mode.AUTO,
    paused=False,
    frozen=False,
    frozen_reason=None,
    current_version="2.0.0",
    current_since=NOW - 300,
    breach_started=NOW - 60,
    version_lag=timedelta(seconds=15),
    rollback_window=timedelta(hours=1),
    cooldown=timedelta(minutes=15),
    last_rollback_at=None,
    rollbacks_in_window=0,
    max_rollbacks=3,
    window=timedelta(hours=1),
    target="1.0.0",
    target_source="last known good",
    chain_needs_target=True,
    in_flight=None,
)

GUARDS = [
    "one_in_flight",
    "paused",
    "frozen",
    "rollback_window",
    "breach_after_release",
    "cooldown",
    "max_rollbacks",
    "target",
    "mode",
]


def test_all_pass_and_every_guard_is_recorded() -> None:
    decision = decide(BASE)
    assert decision.outcome is Outcome.EXECUTE
    assert [g.guard for g in decision.guards] == GUARDS
    assert all(g.passed for g in decision.guards)
    assert decision.guards[3].reason == "2.0.0 went live 5m ago, within 1h"


@pytest.mark.parametrize(
    ("changes", "guard", "reason"),
    [
        ({"in_flight": 7}, "one_in_flight", "rollback 7 of this service is in flight"),
        ({"paused": True}, "paused", "automatic rollbacks are paused for this service"),
        (
            {"frozen": True, "frozen_reason": "verify failed"},
            "frozen",
            "the service is frozen: verify failed",
        ),
        (
            {"current_since": NOW - 7200, "breach_started": NOW - 60},
            "rollback_window",
            "2.0.0 went live 2h ago, outside rollback_window 1h",
        ),
        (
            {"breach_started": NOW - 600},
            "breach_after_release",
            "the breach started 5m before 2.0.0 went live: this release did not cause it",
        ),
        (
            {"last_rollback_at": NOW - 120},
            "cooldown",
            "the last automatic rollback started 2m ago, within cooldown 15m",
        ),
        (
            {"rollbacks_in_window": 3},
            "max_rollbacks",
            "3 rollbacks in the last 1h (max_rollbacks 3): freezing the service",
        ),
        (
            {"target": None, "target_source": "no version has baked"},
            "target",
            "no version to roll back to: no version has baked",
        ),
    ],
)
def test_each_guard_refuses(changes: dict[str, object], guard: str, reason: str) -> None:
    decision = decide(replace(BASE, **changes))  # type: ignore[arg-type]
    assert decision.outcome is Outcome.REFUSE
    refusal = decision.refusal
    assert refusal is not None
    assert (refusal.guard, refusal.reason) == (guard, reason)
    assert [g.guard for g in decision.guards] == GUARDS
    assert decision.freeze is (guard == "max_rollbacks")


def test_a_breach_seen_just_before_the_version_poll_noticed_the_release() -> None:
    # The check job may see the new version's errors before the version job sees it.
    assert decide(replace(BASE, breach_started=NOW - 310)).outcome is Outcome.EXECUTE


def test_executors_that_need_no_target() -> None:
    decision = decide(
        replace(BASE, target=None, target_source="none baked", chain_needs_target=False)
    )
    assert decision.outcome is Outcome.EXECUTE


@pytest.mark.parametrize(
    ("mode", "automatic", "outcome"),
    [
        (Mode.AUTO, True, Outcome.EXECUTE),
        (Mode.APPROVE, True, Outcome.AWAIT_APPROVAL),
        (Mode.DRY_RUN, True, Outcome.DRY_RUN),
        (Mode.APPROVE, False, Outcome.EXECUTE),  # a person asking is the approval
        (Mode.DRY_RUN, False, Outcome.DRY_RUN),
    ],
)
def test_modes(mode: Mode, automatic: bool, outcome: Outcome) -> None:
    assert decide(replace(BASE, mode=mode, automatic=automatic)).outcome is outcome


def test_a_person_is_not_stopped_by_pause_freeze_window_or_cooldown() -> None:
    decision = decide(
        replace(
            BASE,
            automatic=False,
            paused=True,
            frozen=True,
            frozen_reason="x",
            current_since=NOW - 86400,
            breach_started=None,
            last_rollback_at=NOW - 1,
            rollbacks_in_window=10,
        )
    )
    assert decision.outcome is Outcome.EXECUTE


def test_a_person_is_still_stopped_by_a_rollback_in_flight() -> None:
    assert decide(replace(BASE, automatic=False, in_flight=3)).outcome is Outcome.REFUSE
