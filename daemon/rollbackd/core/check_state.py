"""Whether a check is firing: a state machine judged like a Prometheus alerting rule.

Pure: no I/O and no clock (``now`` is passed in), so every rule below is table-tested. The
evaluator (``checks/judge.py``) turns query results into one :class:`Verdict` per series;
this module remembers what those verdicts add up to. A daemon that rolls releases back by
itself must never fire on noise or on missing data, and never miss a real breach; the rules
are chosen for that.

One series (:func:`step`)
    Each series is ``ok``, ``pending`` or ``firing``.

    * Effective verdict. ``NO_DATA`` counts as ``BREACH`` only when the check says
      ``on_no_data = "breach"``, ``ERROR`` only when it says ``on_error = "breach"``.
      Otherwise both are *gaps*, and a gap never moves a series toward firing. ``for`` and
      ``breaches`` mean *continuously*, as a Prometheus alerting rule does: a run is only as
      long as the evidence that it went on.
    * ``OK``: pending -> ok (``CLEARED``), firing -> ok (``RECOVERED``); the run is over, so
      ``breach_count`` and ``pending_since`` reset.
    * ``BREACH``: ok -> pending (``PENDING``, ``pending_since = now``, ``breach_count = 1``),
      then pending -> firing (``FIRED``, ``firing_since = now``) once
      ``now - pending_since >= for`` when the check sets ``for``, else once
      ``breach_count >= breaches``. With ``breaches = 1`` (or ``for = 0``) one breaching
      evaluation goes straight from ok to firing and reports ``PENDING`` then ``FIRED``. A
      firing series that breaches again stays firing, with no transition.
    * ``NO_DATA`` (a gap) ends a pending run: pending -> ok (``CLEARED``), as Prometheus
      drops a pending alert whose series is gone. The series answered, and what it said is
      that nothing breached; a later breach starts a new run with a new ``pending_since``.
    * ``ERROR`` (a gap) only says the daemon could not look. A pending run is *held* for up
      to ``Policy.error_hold`` consecutive errored evaluations (``errors_held`` counts
      them): ``breach_count`` stays as it was and, with ``for``, the time since
      ``pending_since`` still counts, but nothing fires on an error itself; the next
      ``BREACH`` fires if the run is long enough by then. The ``error_hold + 1``-th
      consecutive error ends the run (``CLEARED``). Any other verdict resets the count. So
      one failed scrape does not make the daemon forget a real breach, and an outage does
      not stitch two breaches far apart into one run.
    * Firing is kept through every gap, ``NO_DATA`` and ``ERROR`` alike: no recovery is
      claimed without evidence. Only ``OK`` recovers a firing series.
    * So ``breaches`` counts consecutive breaching evaluations, where a held error neither
      counts nor breaks the run and ``NO_DATA`` (or too many errors) breaks it; and missing
      data alone never rolls a release back.
    * ``now`` is trusted as given. If the clock steps backwards the elapsed time only
      shrinks, which can delay firing but never cause it.

One check (:func:`step_check`)
    A check's query answers for many series at once (one per version, instance, ...), or
    fails as a whole.

    * :class:`Errored` (the whole query failed): ``error_count`` goes up by one and every
      known series gets ``ERROR``. With no known series, the whole-check series ``()`` gets
      it only when ``on_error = "breach"``: otherwise there is nothing to remember. When
      ``error_count`` reaches ``blind_after`` the check turns *blind* (one check-level
      ``BLIND`` change): the daemon cannot see the release, which is worth telling a human
      but, with ``on_error = "ignore"``, never fires anything.
    * :class:`Judged` (the query answered): ``error_count`` resets, a blind check reports
      ``SIGHTED`` and is blind no more, and every series in the answer is stepped with its
      verdict, new ones from a fresh :class:`SeriesState`. A known series absent from the
      answer has vanished and gets ``NO_DATA`` (so a vanished pending series is cleared and
      dropped, a vanished firing one stays firing), except:

      - an absent series that is ``ok`` is dropped without being stepped. Label values churn
        (every release brings a new ``version``), so the map must not grow without bound,
        and a series that merely went away must not start a run even under
        ``on_no_data = "breach"``;
      - the whole-check series ``()`` is what the evaluator reports when a labelled query
        returned nothing (and what an error lands on before any series is known). Once the
        answer holds labelled series again, that emptiness or failure is over: ``()`` gets
        ``OK`` (so it clears or recovers, and is dropped). Treating it as vanished would,
        under ``on_no_data = "breach"``, fire a check whose data is back and healthy.

    * Changes come back in a deterministic order: check-level ones (``BLIND``, ``SIGHTED``)
      first, then by series labels, each series' transitions in the order they happened.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType

from rollbackd.core.samples import Labels, Verdict

WHOLE_CHECK: Labels = ()
"""The series of a single-series check, and where an empty or failed answer is recorded."""


class OnMissing(StrEnum):
    """What an evaluation without an answer (no data, or a failed query) counts as."""

    IGNORE = "ignore"
    BREACH = "breach"


class Phase(StrEnum):
    OK = "ok"
    PENDING = "pending"
    FIRING = "firing"


_SEVERITY = {Phase.OK: 0, Phase.PENDING: 1, Phase.FIRING: 2}


class Transition(StrEnum):
    PENDING = "pending"
    """ok -> pending: the first breach of a run."""
    FIRED = "fired"
    """pending (or ok, when one breach is enough) -> firing."""
    CLEARED = "cleared"
    """pending -> ok without having fired."""
    RECOVERED = "recovered"
    """firing -> ok."""
    BLIND = "blind"
    """Check-level: consecutive query errors reached ``Policy.blind_after``."""
    SIGHTED = "sighted"
    """Check-level: the first answered evaluation after being blind."""


@dataclass(frozen=True)
class Policy:
    """When a check fires: the state machine's share of a check's settings."""

    for_: timedelta | None
    """Fire when breaching continuously for this long..."""
    breaches: int
    """...or, when ``for_`` is None, after this many consecutive breaching evaluations."""
    on_no_data: OnMissing = OnMissing.IGNORE
    on_error: OnMissing = OnMissing.IGNORE
    blind_after: int = 3
    """Consecutive failed evaluations after which the check is reported blind."""
    error_hold: int = 3
    """Consecutive errored evaluations a pending run survives; one more ends it. As
    ``blind_after`` by default: a run outlives the errors that make its check blind, and
    ends at the next one."""

    def __post_init__(self) -> None:
        # The rule model checks these too, but a policy can be built by hand (tests,
        # replay), and breaches=0 would silently behave as 1.
        if self.breaches < 1:
            raise ValueError(f"breaches must be at least 1, got {self.breaches}")
        if self.blind_after < 1:
            raise ValueError(f"blind_after must be at least 1, got {self.blind_after}")
        if self.error_hold < 0:
            raise ValueError(f"error_hold must not be negative, got {self.error_hold}")
        if self.for_ is not None and self.for_ < timedelta(0):
            raise ValueError(f"for must not be negative, got {self.for_}")

    def effective(self, verdict: Verdict) -> Verdict:
        """``verdict`` after ``on_no_data``/``on_error``: OK, BREACH, or a gap (as given)."""
        if verdict is Verdict.NO_DATA and self.on_no_data is OnMissing.BREACH:
            return Verdict.BREACH
        if verdict is Verdict.ERROR and self.on_error is OnMissing.BREACH:
            return Verdict.BREACH
        return verdict


@dataclass(frozen=True)
class SeriesState:
    phase: Phase = Phase.OK
    pending_since: datetime | None = None
    """The first breaching evaluation of the current run."""
    firing_since: datetime | None = None
    breach_count: int = 0
    """Breaching evaluations in the current run (held errors neither count nor break it)."""
    last_verdict: Verdict | None = None
    """As the evaluator gave it, before ``on_no_data``/``on_error``."""
    last_evaluated: datetime | None = None
    errors_held: int = 0
    """Consecutive errored evaluations the current pending run has been held through;
    always 0 outside ``pending``. Last, so positional construction stays as it was."""


def _should_fire(state: SeriesState, now: datetime, policy: Policy) -> bool:
    if policy.for_ is not None:
        assert state.pending_since is not None
        return now - state.pending_since >= policy.for_
    return state.breach_count >= policy.breaches


def step(
    state: SeriesState, verdict: Verdict, now: datetime, policy: Policy
) -> tuple[SeriesState, tuple[Transition, ...]]:
    """One evaluation of one series: the new state and what changed, in order."""
    seen = replace(state, last_verdict=verdict, last_evaluated=now, errors_held=0)
    effective = policy.effective(verdict)
    cleared = SeriesState(last_verdict=verdict, last_evaluated=now)

    if effective is Verdict.OK:
        if state.phase is Phase.FIRING:
            return cleared, (Transition.RECOVERED,)
        if state.phase is Phase.PENDING:
            return cleared, (Transition.CLEARED,)
        return cleared, ()

    if effective is not Verdict.BREACH:
        if state.phase is not Phase.PENDING:
            return seen, ()
        if effective is Verdict.ERROR and state.errors_held < policy.error_hold:
            return replace(seen, errors_held=state.errors_held + 1), ()
        return cleared, (Transition.CLEARED,)

    if state.phase is Phase.FIRING:
        return replace(seen, breach_count=state.breach_count + 1), ()

    transitions: list[Transition] = []
    if state.phase is Phase.OK:
        pending = replace(seen, phase=Phase.PENDING, pending_since=now, breach_count=1)
        transitions.append(Transition.PENDING)
    else:
        pending = replace(seen, breach_count=state.breach_count + 1)
    if _should_fire(pending, now, policy):
        transitions.append(Transition.FIRED)
        return replace(pending, phase=Phase.FIRING, firing_since=now), tuple(transitions)
    return pending, tuple(transitions)


@dataclass(frozen=True)
class Errored:
    """The whole query failed: Prometheus down, hung, overloaded, or garbage back."""

    message: str


@dataclass(frozen=True)
class Judged:
    """The per-series verdicts of one answered evaluation."""

    verdicts: Mapping[Labels, Verdict]
    """Keyed by sorted label pairs; ``()`` for a single-series check or an empty answer."""


@dataclass(frozen=True)
class Change:
    labels: Labels | None
    """None for check-level transitions (``BLIND``, ``SIGHTED``)."""
    transition: Transition
    state: SeriesState | None
    """The series' state after the change; None for check-level transitions."""


@dataclass(frozen=True)
class CheckState:
    series: Mapping[Labels, SeriesState] = field(default_factory=lambda: MappingProxyType({}))
    """Read-only: a copy taken at construction, so no caller can change a state later."""
    error_count: int = 0
    """Consecutive evaluations whose query failed."""
    blind: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "series", MappingProxyType(dict(self.series)))

    def __hash__(self) -> int:
        return hash((frozenset(self.series.items()), self.error_count, self.blind))

    @property
    def firing(self) -> bool:
        return any(s.phase is Phase.FIRING for s in self.series.values())

    @property
    def phase(self) -> Phase:
        """The worst phase of any series: firing, then pending, then ok."""
        return max(
            (s.phase for s in self.series.values()), key=_SEVERITY.__getitem__, default=Phase.OK
        )

    def firing_series(self) -> list[Labels]:
        return sorted(labels for labels, s in self.series.items() if s.phase is Phase.FIRING)


def _step_all(
    series: dict[Labels, SeriesState],
    verdicts: Iterable[tuple[Labels, Verdict]],
    now: datetime,
    policy: Policy,
) -> list[Change]:
    changes: list[Change] = []
    for labels, verdict in verdicts:
        new, transitions = step(series.get(labels, SeriesState()), verdict, now, policy)
        series[labels] = new
        changes.extend(Change(labels, t, new) for t in transitions)
    return changes


def step_check(
    state: CheckState, outcome: Errored | Judged, now: datetime, policy: Policy
) -> tuple[CheckState, list[Change]]:
    """One evaluation of a whole check: the new state and every change, in a stable order."""
    series = dict(state.series)
    check_level: list[Change] = []

    if isinstance(outcome, Errored):
        error_count = state.error_count + 1
        blind = state.blind
        if series:
            targets = [(labels, Verdict.ERROR) for labels in series]
        elif policy.on_error is OnMissing.BREACH:
            targets = [(WHOLE_CHECK, Verdict.ERROR)]
        else:
            targets = []
        if error_count >= policy.blind_after and not blind:
            blind = True
            check_level.append(Change(None, Transition.BLIND, None))
        changes = _step_all(series, targets, now, policy)
    else:
        error_count = 0
        blind = False
        if state.blind:
            check_level.append(Change(None, Transition.SIGHTED, None))
        answered = dict(outcome.verdicts)
        targets = list(answered.items())
        vanished = [labels for labels in series if labels not in answered]
        for labels in vanished:
            if labels == WHOLE_CHECK and answered:
                targets.append((labels, Verdict.OK))
            elif series[labels].phase is Phase.OK:
                del series[labels]
            else:
                targets.append((labels, Verdict.NO_DATA))
        changes = _step_all(series, targets, now, policy)
        for labels in vanished:
            if labels in series and series[labels].phase is Phase.OK:
                del series[labels]

    changes.sort(key=lambda change: change.labels or ())
    return CheckState(series, error_count, blind), check_level + changes
