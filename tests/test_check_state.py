"""The check state machine: when a check goes pending, fires, clears and recovers.

Table tests over the pure ``step``/``step_check`` functions: each row is a sequence of
evaluations ``(verdict, seconds after the start, expected phase, expected transitions)``.
Property tests then check, against a tiny reference model, that gaps (no data, errors,
vanished series) never fire a check and never claim a recovery, and that ``for`` and
``breaches`` count only a continuous run: since the last no data, through held errors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter

from rollbackd.checks import Check
from rollbackd.checks.base import DEFAULT_BREACHES
from rollbackd.core.check_state import (
    Change,
    CheckState,
    Errored,
    Judged,
    OnMissing,
    Phase,
    Policy,
    SeriesState,
    Transition,
    step,
    step_check,
)
from rollbackd.core.samples import Labels, Verdict

CHECK: TypeAdapter[Any] = TypeAdapter(Check)
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

# One letter each keeps the tables readable.
O, B, N, E = Verdict.OK, Verdict.BREACH, Verdict.NO_DATA, Verdict.ERROR  # noqa: E741
OK, PEND, FIRE = Phase.OK, Phase.PENDING, Phase.FIRING
IGNORE, BREACH = OnMissing.IGNORE, OnMissing.BREACH

FOR_60 = Policy(for_=timedelta(seconds=60), breaches=DEFAULT_BREACHES)
FOR_0 = Policy(for_=timedelta(0), breaches=DEFAULT_BREACHES)
N3 = Policy(for_=None, breaches=3)
N2 = Policy(for_=None, breaches=2)
N1 = Policy(for_=None, breaches=1)
N3_NO_HOLD = Policy(for_=None, breaches=3, error_hold=0)
N3_NO_DATA = Policy(for_=None, breaches=3, on_no_data=BREACH)
N3_ERROR = Policy(for_=None, breaches=3, on_error=BREACH)
FOR_60_NO_DATA = Policy(for_=timedelta(seconds=60), breaches=3, on_no_data=BREACH)

A: Labels = (("version", "a"),)
Z: Labels = (("version", "z"),)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def transitions(text: str) -> tuple[Transition, ...]:
    return tuple(Transition(word) for word in text.split())


Row = tuple[Verdict, float, Phase, str]

STEP_TABLE: list[tuple[str, Policy, list[Row]]] = [
    # --- for ---
    (
        "for: pending at the first breach, fires exactly when elapsed == for",
        FOR_60,
        [(B, 0, PEND, "pending"), (B, 30, PEND, ""), (B, 59.999, PEND, ""), (B, 60, FIRE, "fired")],
    ),
    (
        "for: fires at the first evaluation at or past for, not before",
        FOR_60,
        [(B, 0, PEND, "pending"), (B, 25, PEND, ""), (B, 50, PEND, ""), (B, 75, FIRE, "fired")],
    ),
    (
        "for: firing and breaching again is no transition",
        FOR_60,
        [(B, 0, PEND, "pending"), (B, 60, FIRE, "fired"), (B, 75, FIRE, ""), (B, 90, FIRE, "")],
    ),
    (
        "for: an OK restarts the clock",
        FOR_60,
        [
            (B, 0, PEND, "pending"),
            (O, 30, OK, "cleared"),
            (B, 45, PEND, "pending"),
            (B, 90, PEND, ""),
            (B, 105, FIRE, "fired"),
        ],
    ),
    (
        "for: held errors keep the run, elapsed still counts from pending_since",
        FOR_60,
        [(B, 0, PEND, "pending"), (E, 30, PEND, ""), (E, 45, PEND, ""), (B, 60, FIRE, "fired")],
    ),
    (
        "for: an error past for never fires by itself, the next breach does",
        FOR_60,
        [(B, 0, PEND, "pending"), (E, 60, PEND, ""), (E, 75, PEND, ""), (B, 90, FIRE, "fired")],
    ),
    (
        "for: no data ends the run, the next breach starts the clock again",
        FOR_60,
        [
            (B, 0, PEND, "pending"),
            (N, 30, OK, "cleared"),
            (B, 45, PEND, "pending"),
            (B, 90, PEND, ""),
            (B, 105, FIRE, "fired"),
        ],
    ),
    (
        "for: the (error_hold + 1)-th consecutive error ends the run",
        FOR_60,
        [
            (B, 0, PEND, "pending"),
            (E, 15, PEND, ""),
            (E, 30, PEND, ""),
            (E, 45, PEND, ""),
            (E, 60, OK, "cleared"),
            (B, 75, PEND, "pending"),
            (B, 120, PEND, ""),
            (B, 135, FIRE, "fired"),
        ],
    ),
    (
        "for = 0: one breach goes ok -> firing",
        FOR_0,
        [(B, 0, FIRE, "pending fired"), (O, 15, OK, "recovered")],
    ),
    # --- breaches ---
    (
        "breaches: fires on the Nth consecutive breach",
        N3,
        [(B, 0, PEND, "pending"), (B, 15, PEND, ""), (B, 30, FIRE, "fired"), (B, 45, FIRE, "")],
    ),
    (
        "breaches: elapsed time does not matter, only the count",
        N3,
        [(B, 0, PEND, "pending"), (B, 3600, PEND, ""), (B, 7200, FIRE, "fired")],
    ),
    (
        "breaches = 1: one breach reports pending then fired",
        N1,
        [(B, 0, FIRE, "pending fired"), (B, 15, FIRE, ""), (O, 30, OK, "recovered")],
    ),
    (
        "breaches = 1: gaps alone never fire",
        N1,
        [(N, 0, OK, ""), (E, 15, OK, ""), (N, 30, OK, "")],
    ),
    (
        "an OK in between resets the count",
        N3,
        [
            (B, 0, PEND, "pending"),
            (B, 15, PEND, ""),
            (O, 30, OK, "cleared"),
            (B, 45, PEND, "pending"),
            (B, 60, PEND, ""),
            (B, 75, FIRE, "fired"),
        ],
    ),
    (
        "alternating breach and OK never fires",
        N3,
        [
            (B, 0, PEND, "pending"),
            (O, 15, OK, "cleared"),
            (B, 30, PEND, "pending"),
            (O, 45, OK, "cleared"),
            (B, 60, PEND, "pending"),
            (O, 75, OK, "cleared"),
        ],
    ),
    # --- gaps: NO_DATA and ERROR with on_no_data / on_error = ignore ---
    (
        "held errors neither count nor break a run; breaches continue after them",
        N3,
        [
            (B, 0, PEND, "pending"),
            (E, 15, PEND, ""),
            (E, 30, PEND, ""),
            (E, 45, PEND, ""),
            (B, 60, PEND, ""),
            (E, 75, PEND, ""),
            (B, 90, FIRE, "fired"),
        ],
    ),
    (
        "a judged evaluation resets the consecutive errors: only a streak ends a run",
        N3,
        [
            (B, 0, PEND, "pending"),
            (E, 15, PEND, ""),
            (E, 30, PEND, ""),
            (E, 45, PEND, ""),
            (B, 60, PEND, ""),
            (E, 75, PEND, ""),
            (E, 90, PEND, ""),
            (E, 105, PEND, ""),
            (B, 120, FIRE, "fired"),
        ],
    ),
    (
        "no data breaks a run: breach, no data, breach never fires breaches = 2",
        N2,
        [
            (B, 0, PEND, "pending"),
            (N, 15, OK, "cleared"),
            (B, 3600, PEND, "pending"),
            (N, 3615, OK, "cleared"),
            (B, 7200, PEND, "pending"),
        ],
    ),
    (
        "breach, an outage longer than error_hold, breach never fires breaches = 2",
        N2,
        [
            (B, 0, PEND, "pending"),
            (E, 15, PEND, ""),
            (E, 30, PEND, ""),
            (E, 45, PEND, ""),
            (E, 60, OK, "cleared"),
            *[(E, 75 + 15 * i, OK, "") for i in range(5)],
            (B, 150, PEND, "pending"),
            (B, 165, FIRE, "fired"),
        ],
    ),
    (
        "error_hold = 0: the first error ends a pending run",
        N3_NO_HOLD,
        [(B, 0, PEND, "pending"), (E, 15, OK, "cleared"), (B, 30, PEND, "pending")],
    ),
    (
        "a held error then no data: the no data ends the run",
        N3,
        [(B, 0, PEND, "pending"), (E, 15, PEND, ""), (N, 30, OK, "cleared")],
    ),
    (
        "gaps hold firing: no recovery without an OK",
        N3,
        [
            (B, 0, PEND, "pending"),
            (B, 15, PEND, ""),
            (B, 30, FIRE, "fired"),
            (N, 45, FIRE, ""),
            (E, 60, FIRE, ""),
            (N, 75, FIRE, ""),
            (B, 90, FIRE, ""),
            (O, 105, OK, "recovered"),
        ],
    ),
    (
        "no data alone never fires",
        N3,
        [(N, 15 * i, OK, "") for i in range(10)],
    ),
    (
        "errors alone never fire",
        N3,
        [(E, 15 * i, OK, "") for i in range(10)],
    ),
    (
        "a NaN run (no traffic) ends a pending run at its first evaluation",
        N3,
        [
            (B, 0, PEND, "pending"),
            (B, 15, PEND, ""),
            (N, 30, OK, "cleared"),
            *[(N, 45 + 15 * i, OK, "") for i in range(7)],
            (O, 150, OK, ""),
        ],
    ),
    (
        "errors while firing, any number of them: still the same firing",
        N1,
        [
            (B, 0, FIRE, "pending fired"),
            *[(E, 15 + 15 * i, FIRE, "") for i in range(8)],
            (B, 135, FIRE, ""),
            (O, 150, OK, "recovered"),
        ],
    ),
    (
        "a NaN run while firing, then breaching again: still the same firing",
        N1,
        [
            (B, 0, FIRE, "pending fired"),
            *[(N, 15 + 15 * i, FIRE, "") for i in range(8)],
            (B, 135, FIRE, ""),
        ],
    ),
    # --- on_no_data / on_error = breach ---
    (
        "on_no_data = breach: no data counts toward firing",
        N3_NO_DATA,
        [
            (N, 0, PEND, "pending"),
            (N, 15, PEND, ""),
            (N, 30, FIRE, "fired"),
            (O, 45, OK, "recovered"),
        ],
    ),
    (
        "on_no_data = breach: no data and breaches count together",
        N3_NO_DATA,
        [(B, 0, PEND, "pending"), (N, 15, PEND, ""), (B, 30, FIRE, "fired")],
    ),
    (
        "on_no_data = breach: errors are still gaps, held",
        N3_NO_DATA,
        [(N, 0, PEND, "pending"), (E, 15, PEND, ""), (E, 30, PEND, ""), (N, 45, PEND, "")],
    ),
    (
        "on_no_data = breach: an error streak past error_hold still ends the run",
        N3_NO_DATA,
        [
            (N, 0, PEND, "pending"),
            (E, 15, PEND, ""),
            (E, 30, PEND, ""),
            (E, 45, PEND, ""),
            (E, 60, OK, "cleared"),
            (N, 75, PEND, "pending"),
        ],
    ),
    (
        "on_no_data = breach with for: a NaN run lasting for fires",
        FOR_60_NO_DATA,
        [(N, 0, PEND, "pending"), (N, 30, PEND, ""), (N, 60, FIRE, "fired")],
    ),
    (
        "on_error = breach: errors count toward firing",
        N3_ERROR,
        [(E, 0, PEND, "pending"), (E, 15, PEND, ""), (E, 30, FIRE, "fired")],
    ),
    (
        "on_error = breach: no data still ends a run",
        N3_ERROR,
        [
            (E, 0, PEND, "pending"),
            (N, 15, OK, "cleared"),
            (E, 30, PEND, "pending"),
            (E, 45, PEND, ""),
            (E, 60, FIRE, "fired"),
        ],
    ),
    (
        "on_error = breach: errors are breaches, never held, so any number of them count",
        N3_ERROR,
        [(B, 0, PEND, "pending"), (E, 15, PEND, ""), (E, 30, FIRE, "fired"), (E, 45, FIRE, "")],
    ),
    # --- clearing and recovering ---
    (
        "pending -> ok is cleared",
        N3,
        [(B, 0, PEND, "pending"), (O, 15, OK, "cleared"), (O, 30, OK, "")],
    ),
    (
        "firing -> ok is recovered, and a new run starts from scratch",
        N3,
        [
            (B, 0, PEND, "pending"),
            (B, 15, PEND, ""),
            (B, 30, FIRE, "fired"),
            (O, 45, OK, "recovered"),
            (B, 60, PEND, "pending"),
            (B, 75, PEND, ""),
            (B, 90, FIRE, "fired"),
        ],
    ),
    (
        "OK on an ok series is no transition",
        N3,
        [(O, 0, OK, ""), (O, 15, OK, "")],
    ),
]


@pytest.mark.parametrize(
    ("policy", "rows"),
    [pytest.param(policy, rows, id=name) for name, policy, rows in STEP_TABLE],
)
def test_step_table(policy: Policy, rows: list[Row]) -> None:
    state = SeriesState()
    for i, (verdict, seconds, phase, expected) in enumerate(rows):
        state, got = step(state, verdict, at(seconds), policy)
        assert (state.phase, got) == (phase, transitions(expected)), f"evaluation {i}"
        assert state.last_verdict is verdict
        assert state.last_evaluated == at(seconds)
        if state.phase is not PEND or verdict is not E:
            assert state.errors_held == 0, f"evaluation {i}"


def test_step_records_when_a_run_started_and_fired() -> None:
    state = SeriesState()
    state, _ = step(state, B, at(0), N3)
    assert (state.pending_since, state.firing_since, state.breach_count) == (at(0), None, 1)
    state, _ = step(state, E, at(15), N3)
    assert (state.pending_since, state.breach_count, state.errors_held) == (at(0), 1, 1)
    state, _ = step(state, B, at(30), N3)
    assert (state.pending_since, state.breach_count, state.errors_held) == (at(0), 2, 0)
    state, _ = step(state, B, at(45), N3)
    assert state == SeriesState(FIRE, at(0), at(45), 3, B, at(45))
    state, _ = step(state, B, at(60), N3)
    assert (state.firing_since, state.breach_count) == (at(45), 4)
    state, _ = step(state, O, at(75), N3)
    assert state == SeriesState(OK, None, None, 0, O, at(75))


def test_step_counts_held_errors_and_clears_past_the_hold() -> None:
    policy = Policy(for_=None, breaches=3, error_hold=2)
    state, _ = step(SeriesState(), B, at(0), policy)
    held = []
    for i in range(1, 4):
        state, got = step(state, E, at(15 * i), policy)
        held.append((state.phase, state.errors_held, got))
    assert held == [
        (PEND, 1, ()),
        (PEND, 2, ()),
        (OK, 0, (Transition.CLEARED,)),
    ]
    assert state == SeriesState(OK, None, None, 0, E, at(45))


def test_step_with_a_clock_stepping_back_never_fires_early() -> None:
    state, _ = step(SeriesState(), B, at(100), FOR_60)
    state, got = step(state, B, at(50), FOR_60)
    assert (state.phase, got) == (PEND, ())


# --- Policy ---------------------------------------------------------------------------------


def test_policy_from_a_check_with_defaults() -> None:
    check = CHECK.validate_python(
        {"name": "errors", "type": "error_rate", "errors": 'code=~"5.."', "above": 0.05}
    )
    assert check.policy() == Policy(
        for_=None, breaches=DEFAULT_BREACHES, on_no_data=IGNORE, on_error=IGNORE, blind_after=3
    )


def test_policy_from_a_check_with_for_and_missing_data_as_breach() -> None:
    check = CHECK.validate_python(
        {
            "name": "p99",
            "type": "latency",
            "metric": "rpc_seconds",
            "above": "250ms",
            "for": "2m",
            "on_no_data": "breach",
            "on_error": "breach",
        }
    )
    policy = check.policy(blind_after=5)
    assert policy.for_ == timedelta(minutes=2)
    assert (policy.on_no_data, policy.on_error, policy.blind_after) == (BREACH, BREACH, 5)


def test_policy_from_a_check_with_breaches() -> None:
    check = CHECK.validate_python(
        {"name": "probe", "type": "probe", "selector": 'job="bb"', "breaches": 5}
    )
    policy = check.policy()
    assert (policy.for_, policy.breaches) == (None, 5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"for_": None, "breaches": 0},
        {"for_": None, "breaches": 3, "blind_after": 0},
        {"for_": timedelta(seconds=-1), "breaches": 3},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        Policy(**kwargs)


# --- step_check: blindness ------------------------------------------------------------------

Outcome = Errored | Judged
CheckRow = tuple[Outcome, float, Phase, list[tuple[Labels | None, str]]]
ERR = Errored("connection refused")


def judged(**verdicts: Verdict) -> Judged:
    """``judged(a=B, z=O)`` is a per-version answer; ``judged(_=B)`` the single series ``()``."""
    return Judged(
        {(() if name == "_" else (("version", name),)): v for name, v in verdicts.items()}
    )


def errors(first: float, count: int, phase: Phase, blind_at: int | None = None) -> list[CheckRow]:
    """``count`` failed evaluations 15s apart, the ``blind_at``-th (from 0) turning blind."""
    return [
        (ERR, first + 15 * i, phase, [(None, "blind")] if i == blind_at else [])
        for i in range(count)
    ]


CHECK_TABLE: list[tuple[str, Policy, list[CheckRow]]] = [
    (
        "blind after blind_after errors, once; sighted on the next answer",
        N3,
        [
            (ERR, 0, OK, []),
            (ERR, 15, OK, []),
            (ERR, 30, OK, [(None, "blind")]),
            (ERR, 45, OK, []),
            (judged(_=O), 60, OK, [(None, "sighted")]),
            (judged(_=O), 75, OK, []),
        ],
    ),
    (
        "being blind never fires a pending series, nor recovers a firing one",
        N3,
        [
            (judged(a=B, z=B), 0, PEND, [(A, "pending"), (Z, "pending")]),
            (judged(a=B, z=B), 15, PEND, []),
            (judged(a=B, z=O), 30, FIRE, [(A, "fired"), (Z, "cleared")]),
            (judged(a=B, z=B), 45, FIRE, [(Z, "pending")]),
            *errors(first=60, count=3, phase=FIRE, blind_at=2),
            # The fourth error in a row is one past error_hold: pending Z's run is over,
            # firing A is kept (no recovery without evidence).
            (ERR, 105, FIRE, [(Z, "cleared")]),
            *errors(first=120, count=6, phase=FIRE),
            (judged(a=O, z=O), 300, OK, [(None, "sighted"), (A, "recovered")]),
        ],
    ),
    (
        "a pending series is held through error_hold failed queries, then breaches on",
        N3,
        [
            (judged(a=B), 0, PEND, [(A, "pending")]),
            (ERR, 15, PEND, []),
            (ERR, 30, PEND, []),
            (judged(a=B), 45, PEND, []),
            (ERR, 60, PEND, []),
            (judged(a=B), 75, FIRE, [(A, "fired")]),
        ],
    ),
    (
        "a pending series is cleared by one failed query past error_hold, while blind",
        N3,
        [
            (judged(a=B), 0, PEND, [(A, "pending")]),
            (ERR, 15, PEND, []),
            (ERR, 30, PEND, []),
            (ERR, 45, PEND, [(None, "blind")]),
            (ERR, 60, OK, [(A, "cleared")]),
            (judged(a=B), 75, PEND, [(None, "sighted"), (A, "pending")]),
        ],
    ),
    (
        "errors with no series known and on_error = ignore: nothing to remember",
        N3,
        [(ERR, 0, OK, []), (ERR, 15, OK, []), (ERR, 30, OK, [(None, "blind")])],
    ),
    (
        "errors with no series known and on_error = breach land on the whole check",
        N3_ERROR,
        [
            (ERR, 0, PEND, [((), "pending")]),
            (ERR, 15, PEND, []),
            (ERR, 30, FIRE, [(None, "blind"), ((), "fired")]),
            (judged(_=O), 45, OK, [(None, "sighted"), ((), "recovered")]),
        ],
    ),
    (
        "errors with series known and on_error = breach count for each of them",
        N3_ERROR,
        [
            (judged(a=B, z=O), 0, PEND, [(A, "pending")]),
            (ERR, 15, PEND, [(Z, "pending")]),
            (ERR, 30, FIRE, [(A, "fired")]),
        ],
    ),
    (
        "an answer in between resets the error count",
        N3,
        [
            (ERR, 0, OK, []),
            (ERR, 15, OK, []),
            (judged(_=N), 30, OK, []),
            (ERR, 45, OK, []),
            (ERR, 60, OK, []),
            (ERR, 75, OK, [(None, "blind")]),
        ],
    ),
    # --- per series ---
    (
        "two series, only one fires",
        N3,
        [
            (judged(a=B, z=O), 0, PEND, [(A, "pending")]),
            (judged(a=B, z=B), 15, PEND, [(Z, "pending")]),
            (judged(a=B, z=O), 30, FIRE, [(A, "fired"), (Z, "cleared")]),
        ],
    ),
    (
        "a vanished pending series gets no data: cleared at once, and a new run starts over",
        N3,
        [
            (judged(a=B, z=O), 0, PEND, [(A, "pending")]),
            (judged(a=B, z=O), 15, PEND, []),
            (judged(z=O), 30, OK, [(A, "cleared")]),
            *[(judged(z=O), 45 + 15 * i, OK, []) for i in range(4)],
            (judged(a=B, z=O), 120, PEND, [(A, "pending")]),
            (judged(a=B, z=O), 135, PEND, []),
            (judged(a=B, z=O), 150, FIRE, [(A, "fired")]),
        ],
    ),
    (
        "a vanished firing series stays firing until it answers OK",
        N1,
        [
            (judged(a=B), 0, FIRE, [(A, "pending"), (A, "fired")]),
            (judged(z=O), 15, FIRE, []),
            (judged(z=O), 30, FIRE, []),
            (judged(a=O, z=O), 45, OK, [(A, "recovered")]),
        ],
    ),
    (
        "a vanished pending series counts toward firing with on_no_data = breach",
        N3_NO_DATA,
        [
            (judged(a=B, z=O), 0, PEND, [(A, "pending")]),
            (judged(z=O), 15, PEND, []),
            (judged(z=O), 30, FIRE, [(A, "fired")]),
        ],
    ),
    (
        "a vanished ok series is dropped, even with on_no_data = breach",
        N3_NO_DATA,
        [
            (judged(a=O, z=O), 0, OK, []),
            (judged(z=O), 15, OK, []),
            (judged(z=O), 30, OK, []),
            (judged(z=O), 45, OK, []),
        ],
    ),
    (
        "an empty answer (no data on ()) then labelled data: () is superseded, never fires",
        N3_NO_DATA,
        [
            (judged(_=N), 0, PEND, [((), "pending")]),
            (judged(_=N), 15, PEND, []),
            (judged(a=O), 30, OK, [((), "cleared")]),
            (judged(a=O), 45, OK, []),
            (judged(a=O), 60, OK, []),
        ],
    ),
    (
        "a check fired on no data recovers once labelled data is back",
        N3_NO_DATA,
        [
            (judged(_=N), 0, PEND, [((), "pending")]),
            (judged(_=N), 15, PEND, []),
            (judged(_=N), 30, FIRE, [((), "fired")]),
            (judged(a=B), 45, PEND, [((), "recovered"), (A, "pending")]),
        ],
    ),
    (
        "an answer without any verdict does not supersede (): it is still no data",
        N3_NO_DATA,
        [
            (judged(_=N), 0, PEND, [((), "pending")]),
            (Judged({}), 15, PEND, []),
            (Judged({}), 30, FIRE, [((), "fired")]),
        ],
    ),
]


@pytest.mark.parametrize(
    ("policy", "rows"),
    [pytest.param(policy, rows, id=name) for name, policy, rows in CHECK_TABLE],
)
def test_step_check_table(policy: Policy, rows: list[CheckRow]) -> None:
    state = CheckState({})
    for i, (outcome, seconds, phase, expected) in enumerate(rows):
        state, changes = step_check(state, outcome, at(seconds), policy)
        got = [(c.labels, c.transition.value) for c in changes]
        assert (state.phase, got) == (phase, expected), f"evaluation {i}"
        assert state.firing == (phase is FIRE)
        for change in changes:
            if change.labels is None:
                assert change.state is None
            else:
                assert change.state == state.series.get(change.labels, change.state)


def run_check(policy: Policy, *outcomes: Outcome) -> tuple[CheckState, list[Change]]:
    state, changes = CheckState({}), list[Change]()
    for i, outcome in enumerate(outcomes):
        state, changes = step_check(state, outcome, at(15 * i), policy)
    return state, changes


def test_firing_series_lists_only_the_firing_ones() -> None:
    state, _ = run_check(N1, judged(a=B, z=O))
    assert state.firing_series() == [A]
    assert state.series[Z].phase is OK


def test_vanished_series_get_no_data() -> None:
    state, changes = run_check(N3, judged(a=B, z=O), judged(z=O))
    assert changes == [Change(A, Transition.CLEARED, SeriesState(OK, None, None, 0, N, at(15)))]
    assert set(state.series) == {Z}


def test_vanished_firing_series_stay_firing() -> None:
    state, changes = run_check(N1, judged(a=B, z=O), judged(z=O), judged(z=O))
    assert changes == []
    assert state.series[A] == SeriesState(FIRE, at(0), at(0), 1, N, at(30))


def test_vanished_ok_series_are_dropped() -> None:
    state, changes = run_check(N3, judged(a=O, z=B), judged(z=B))
    assert set(state.series) == {Z}
    assert changes == []


def test_errors_reach_every_known_series() -> None:
    state, _ = run_check(N3, judged(a=B, z=O), ERR)
    assert {labels: s.last_verdict for labels, s in state.series.items()} == {A: E, Z: E}
    assert state.error_count == 1


def test_sighted_resets_the_error_count() -> None:
    state, _ = run_check(N3, ERR, ERR, ERR)
    assert (state.error_count, state.blind) == (3, True)
    state, _ = step_check(state, judged(_=O), at(100), N3)
    assert (state.error_count, state.blind) == (0, False)


def test_changes_are_sorted_by_labels_whatever_the_answer_order() -> None:
    labels = [(("version", name),) for name in ("c", "a", "b")]
    state = CheckState({}, error_count=2, blind=False)
    _, changes = step_check(state, Judged(dict.fromkeys(labels, B)), at(0), Policy(None, 1))
    assert [c.labels for c in changes] == [
        (("version", "a"),),
        (("version", "a"),),
        (("version", "b"),),
        (("version", "b"),),
        (("version", "c"),),
        (("version", "c"),),
    ]
    assert [c.transition for c in changes[:2]] == [Transition.PENDING, Transition.FIRED]


def test_check_level_changes_come_first() -> None:
    state, _ = run_check(N1, judged(a=O), ERR, ERR, ERR)
    _, changes = step_check(state, judged(a=B), at(100), N1)
    assert [(c.labels, c.transition) for c in changes] == [
        (None, Transition.SIGHTED),
        (A, Transition.PENDING),
        (A, Transition.FIRED),
    ]


def test_check_state_is_never_mutated() -> None:
    source = {A: SeriesState()}
    state = CheckState(source)
    source[Z] = SeriesState(FIRE)
    assert set(state.series) == {A}
    with pytest.raises(TypeError):
        state.series[Z] = SeriesState()  # type: ignore[index]
    before = dict(state.series)
    new, _ = step_check(state, judged(a=B, z=B), at(0), N1)
    assert dict(state.series) == before
    assert new.series is not state.series


def test_check_state_equality_and_hash() -> None:
    one = CheckState({A: SeriesState(PEND, at(0), None, 1, B, at(0))}, 1, False)
    two = CheckState(dict(one.series), 1, False)
    assert one == two
    assert hash(one) == hash(two)
    assert CheckState() == CheckState({})
    assert CheckState().phase is OK
    assert not CheckState().firing


def test_check_phase_is_the_worst_series() -> None:
    state = CheckState({A: SeriesState(PEND), Z: SeriesState(OK)})
    assert state.phase is PEND
    state = CheckState({A: SeriesState(PEND), Z: SeriesState(FIRE), (): SeriesState(OK)})
    assert state.phase is FIRE
    assert state.firing_series() == [Z]


# --- properties -----------------------------------------------------------------------------

VERDICTS = st.sampled_from(list(Verdict))
IGNORING = st.builds(
    Policy,
    for_=st.none(),
    breaches=st.integers(min_value=1, max_value=5),
    on_no_data=st.just(IGNORE),
    on_error=st.just(IGNORE),
    error_hold=st.integers(min_value=0, max_value=4),
)


@dataclass(frozen=True)
class Model:
    """The reference model of one series under ``breaches`` (gaps ignored), written from
    the rules in the module docstring, not from the code."""

    phase: Phase = OK
    run: int = 0
    held: int = 0

    def step(self, verdict: Verdict, policy: Policy) -> Model:
        if verdict is O:
            return Model()
        if verdict is B:
            run = self.run + 1
            firing = self.phase is FIRE or run >= policy.breaches
            return Model(FIRE if firing else PEND, run)
        if self.phase is not PEND:
            return Model(self.phase, self.run)  # ok stays ok, firing stays firing
        if verdict is E and self.held < policy.error_hold:
            return Model(PEND, self.run, self.held + 1)
        return Model()


def current_run(verdicts: list[Verdict], error_hold: int) -> list[int]:
    """Indexes of the breaches of the run still going on at the end of ``verdicts``: since
    the last OK, NO_DATA or streak of more than ``error_hold`` errors."""
    run: list[int] = []
    streak = 0
    for i, v in enumerate(verdicts):
        streak = streak + 1 if v is E else 0
        if v in (O, N) or streak > error_hold:
            run = []
        elif v is B:
            run.append(i)
    return run


@given(policy=IGNORING, verdicts=st.lists(VERDICTS, max_size=40))
def test_property_breaches_fire_only_after_n_consecutive_breaches(
    policy: Policy, verdicts: list[Verdict]
) -> None:
    state = SeriesState()
    model = Model()
    for i, verdict in enumerate(verdicts):
        before = state
        state, got = step(state, verdict, at(15 * i), policy)
        model = model.step(verdict, policy)
        assert (state.phase, state.breach_count, state.errors_held) == (
            model.phase,
            model.run,
            model.held,
        )
        if Transition.FIRED in got:
            # Exactly `breaches` breaches since the last no data (held errors ignored):
            # one more would have fired earlier.
            assert verdict is B
            assert len(current_run(verdicts[: i + 1], policy.error_hold)) == policy.breaches
        if before.phase is not FIRE and verdict is B:
            long_enough = len(current_run(verdicts[: i + 1], policy.error_hold)) >= policy.breaches
            assert (state.phase is FIRE) == long_enough
        if before.phase is FIRE and state.phase is not FIRE:
            assert verdict is O
            assert got == (Transition.RECOVERED,)


@given(
    for_seconds=st.integers(min_value=0, max_value=300),
    error_hold=st.integers(min_value=0, max_value=4),
    steps=st.lists(st.tuples(VERDICTS, st.integers(min_value=1, max_value=120)), max_size=40),
)
def test_property_for_fires_only_after_breaching_continuously_for_long_enough(
    for_seconds: int, error_hold: int, steps: list[tuple[Verdict, int]]
) -> None:
    for_ = timedelta(seconds=for_seconds)
    policy = Policy(for_=for_, breaches=DEFAULT_BREACHES, error_hold=error_hold)
    state = SeriesState()
    now = T0
    times: list[datetime] = []
    verdicts: list[Verdict] = []
    for verdict, gap in steps:
        now += timedelta(seconds=gap)
        times.append(now)
        verdicts.append(verdict)
        before = state
        state, got = step(state, verdict, now, policy)
        run = current_run(verdicts, error_hold)
        run_start = times[run[0]] if run else None
        if Transition.FIRED in got:
            assert verdict is B
            assert run_start is not None
            assert now - run_start >= for_
        if state.phase is PEND:
            assert state.pending_since == run_start
        if before.phase is FIRE and state.phase is not FIRE:
            assert verdict is O
        if before.phase is not FIRE and verdict is B:
            assert run_start is not None
            assert (state.phase is FIRE) == (now - run_start >= for_)


@given(policy=IGNORING, verdicts=st.lists(st.sampled_from([N, E]), max_size=30))
def test_property_gaps_alone_never_fire_nor_recover(
    policy: Policy, verdicts: list[Verdict]
) -> None:
    for start in (SeriesState(), SeriesState(PEND, T0, None, 1), SeriesState(FIRE, T0, T0, 3)):
        state = start
        for i, verdict in enumerate(verdicts):
            state, got = step(state, verdict, at(15 * i), policy)
            assert got in ((), (Transition.CLEARED,))
        if start.phase is PEND and current_run([B, *verdicts], policy.error_hold):
            # Held: only errors, no more of them in a row than error_hold.
            assert (state.phase, state.pending_since, state.breach_count) == (PEND, T0, 1)
        elif start.phase is PEND:
            assert state.phase is OK
        else:
            assert (state.phase, state.pending_since, state.firing_since) == (
                start.phase,
                start.pending_since,
                start.firing_since,
            )


NAMES = ("a", "z")
OUTCOMES = st.one_of(
    st.just(ERR),
    st.builds(
        Judged,
        st.dictionaries(st.sampled_from([(("version", n),) for n in NAMES]), VERDICTS),
    ),
)


@given(policy=IGNORING, outcomes=st.lists(OUTCOMES, max_size=40))
def test_property_errors_and_vanished_series_never_fire_a_check(
    policy: Policy, outcomes: list[Outcome]
) -> None:
    state = CheckState()
    models: dict[Labels, Model] = {(("version", n),): Model() for n in NAMES}
    for i, outcome in enumerate(outcomes):
        before = state
        state, changes = step_check(state, outcome, at(15 * i), policy)
        for labels in models:
            # What each series was told: its verdict, no data when it vanished, an error
            # when the query failed; nothing when it was not known to begin with.
            if isinstance(outcome, Judged) and labels in outcome.verdicts:
                models[labels] = models[labels].step(outcome.verdicts[labels], policy)
            elif labels in before.series:
                models[labels] = models[labels].step(
                    N if isinstance(outcome, Judged) else E, policy
                )
            expected = models[labels]
            got = state.series.get(labels, SeriesState())
            assert (got.phase, got.breach_count) == (expected.phase, expected.run)
            if expected.phase is OK and isinstance(outcome, Judged):
                assert labels not in state.series or labels in outcome.verdicts
        for change in changes:
            if change.transition is Transition.FIRED:
                assert isinstance(outcome, Judged)
                assert outcome.verdicts.get(change.labels or ()) is B
            if change.transition is Transition.RECOVERED:
                assert isinstance(outcome, Judged)
                assert outcome.verdicts.get(change.labels or ()) is O
        assert state.blind == (state.error_count >= policy.blind_after)
        if not before.blind and state.blind:
            assert changes[0] == Change(None, Transition.BLIND, None)
