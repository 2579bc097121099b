"""Is the new version worse than its baseline? Anytime-valid sequential tests on counts.

Each arm is a count of requests and of bad ones (errors, or requests slower than a
bucket). The question is the ratio ``r = new.ratio / baseline.ratio``: "worse" means
``r > 1``, and "not worse" means ``r < 1 + worse_by``. Everything is computed from the
cumulative counts since the release, so the caller keeps no state between looks.

Decisions rest on e-values: a mixture likelihood ``m`` divided by the best likelihood
the hypothesis allows, ``m / sup_{H} L``. Under H such a ratio is (bounded by) a
nonnegative martingale of mean 1, so by Ville's inequality it ever reaches ``1/alpha``
with probability at most ``alpha``, however many times it is looked at: a healthy release
watched forever is called worse at most ``alpha = 1 - confidence`` of the time.

- :func:`compare_concurrent` (a canary beside the stable track, at the same time): Lindon
  & Malek's two-arm test on counts, conditioned on the number of bad events, so the
  unknown and varying baseline rate drops out. It assumes the traffic split is steady
  (the cumulative requests give the split) and bad events Poisson given the traffic.
- :func:`compare_with_history` (no canary: the new version against a window before the
  release): the baseline window's counts are fixed and their rate uncertain, counted by a
  union bound: ``alpha / 2`` for the baseline's exact Poisson bounds, ``alpha / 2`` for a
  sequential test on the new arm alone. It assumes the baseline window's rate is what the
  old version would have had now (no drift between the window and the release).

Bursts make counts over-dispersed, which would break the Poisson bound: :func:`dispersion`
estimates the variance inflation from time blocks of the baseline, and both tests divide
every count by it (a tempered, quasi-Poisson likelihood).

Pure: stdlib ``math`` only, logs throughout (``lgamma``) so counts of 1e9 never overflow.
``savvi`` and ``scipy`` check these numbers in the tests; the daemon never imports them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from rollbackd.core.poisson_bounds import poisson_lower, poisson_upper

CONCURRENT_PSEUDO_COUNT = 1.0
"""The concurrent mixture is Beta(k pi0, k (1 - pi0)) over the share of bad events from the
new arm, with k chosen so the smaller arm's pseudo-count is this (k = 1 / min(pi0, 1 - pi0)).
One pseudo-event puts the log ratio's prior sd near 1.3 (a few-fold either way), so a 5x
regression is caught within a handful of bad events and a 1.5x one is not penalised by a
prior too narrow to reach it. Scaling on the smaller arm keeps the prior as wide when the
canary takes most of the traffic (k = 1 / pi0 alone would then be nearly flat in pi and
very wide in r)."""

HISTORY_PRIOR_SHAPE = 1.0
"""The history mixture is Gamma(shape c, rate c / UCB) over the new arm's bad rate: mean
at the baseline's upper bound, and with c = 1 (exponential) a prior sd as large as its
mean, so rates a few-fold above the baseline stay within a couple of prior sd."""

MAX_EVIDENCE = 1e300
"""Evidence is capped here so it is always a finite float (the decision uses logs)."""

_LOG_MAX_EVIDENCE = math.log(MAX_EVIDENCE)
_MAX_SPLIT = 1e12
"""A split of requests beyond this (N_large / N_small) is no canary: undecided. The prior's
pseudo-counts scale with the split, and past it they could overflow."""
_NEWTON_STEPS = 100
_NEWTON_TOLERANCE = 1e-13
_FAR = 1e4  # in log r: e^(+-1e4) is already 0 or inf in floating point


class Decision(StrEnum):
    WORSE = "worse"
    NOT_WORSE = "not worse"
    UNDECIDED = "undecided"


class Test(StrEnum):
    CONCURRENT = "concurrent"  # canary vs stable track, same time
    HISTORY = "history"  # new version vs a window before the release


@dataclass(frozen=True)
class Arm:
    """One arm's cumulative counts. Non-integer counts are fine (``increase()``)."""

    requests: float
    bad: float

    def __post_init__(self) -> None:
        for name in ("requests", "bad"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got: {value}")

    @property
    def ratio(self) -> float:
        """bad / requests; nan when there were no requests."""
        return self.bad / self.requests if self.requests > 0 else math.nan


@dataclass(frozen=True)
class Evidence:
    """What one look at the counts concluded, and the numbers it rests on.

    ``low`` and ``high`` bound r from the same sets the decisions use: ``low > 1``
    exactly when the "worse" evidence reaches the threshold (unless the "not worse"
    evidence does too), and each bound alone holds at ``confidence`` at every look.
    ``high`` is ``inf`` while the baseline has no bad events.
    """

    test: Test
    decision: Decision
    ratio: float
    low: float
    high: float
    worse: float
    not_worse: float
    threshold: float
    dispersion: float
    new: Arm
    baseline: Arm


@dataclass(frozen=True)
class _Settings:
    worse_by: float
    alpha: float
    dispersion: float


def _settings(worse_by: float, confidence: float, dispersion: float) -> _Settings:
    if not (math.isfinite(worse_by) and worse_by > 0):
        raise ValueError(f"worse_by must be a fraction > 0, got: {worse_by}")
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got: {confidence}")
    if not (math.isfinite(dispersion) and dispersion >= 1):
        raise ValueError(f"dispersion must be a finite number >= 1, got: {dispersion}")
    # Rounded so that confidence 0.99 gives the threshold 100, not 99.99999999999991.
    alpha = round(1.0 - confidence, 12)
    return _Settings(worse_by=worse_by, alpha=alpha, dispersion=dispersion)


def _ratio(new: Arm, baseline: Arm) -> float:
    """new.ratio / baseline.ratio: nan when either is undefined or both are 0."""
    a, b = new.ratio, baseline.ratio
    if math.isnan(a) or math.isnan(b) or (a == 0 and b == 0):
        return math.nan
    return a / b if b > 0 else math.inf


def _exp(v: float) -> float:
    """e^v, inf past the largest float (math.exp raises there)."""
    return math.inf if v > 709.0 else math.exp(v)


def _evidence(log_e: float) -> float:
    return MAX_EVIDENCE if log_e >= _LOG_MAX_EVIDENCE else math.exp(log_e)


def _decide(log_worse: float, log_not_worse: float, log_threshold: float) -> Decision:
    # Both at once means worse, but by less than worse_by: not worth a rollback.
    if log_not_worse >= log_threshold:
        return Decision.NOT_WORSE
    if log_worse >= log_threshold:
        return Decision.WORSE
    return Decision.UNDECIDED


def _testable(new: Arm, baseline: Arm) -> bool:
    """Requests in both arms, a bad event somewhere, and a split that is not absurd."""
    if new.requests == 0 or baseline.requests == 0 or new.bad + baseline.bad == 0:
        return False
    split = new.requests / baseline.requests
    return 1.0 / _MAX_SPLIT <= split <= _MAX_SPLIT


def _undecided(test: Test, new: Arm, baseline: Arm, threshold: float, phi: float) -> Evidence:
    """No evidence either way yet: with no requests in an arm there is no split (or no
    rate) to test, and with no bad event anywhere every ratio fits the data equally well.
    Evidence 1 is what an e-value is before any data. (A split beyond 1e12 to 1, which no
    real traffic has, is treated alike rather than risk overflow.)"""
    return Evidence(
        test=test,
        decision=Decision.UNDECIDED,
        ratio=_ratio(new, baseline),
        low=0.0,
        high=math.inf,
        worse=1.0,
        not_worse=1.0,
        threshold=threshold,
        dispersion=phi,
        new=new,
        baseline=baseline,
    )


def _root(
    g: Callable[[float], float], slope: Callable[[float], float], start: float, direction: float
) -> float:
    """Where the concave g, with g(start) >= 0, crosses 0 going ``direction`` (+1 or -1).

    Doubling steps find a point outside (g < 0); from there Newton's method converges
    monotonically to the crossing, since a concave function lies below its tangents. It
    takes a handful of steps where bisection would take forty.
    """
    step = 1.0
    while g(start + direction * step) >= 0:
        step *= 2.0
        if step > _FAR:
            return direction * math.inf  # tiny counts: the end is at r = 0 or r = inf
    u = start + direction * step
    for _ in range(_NEWTON_STEPS):
        d = slope(u)
        if d == 0 or not math.isfinite(d):
            break
        following = u - g(u) / d
        if abs(following - u) <= _NEWTON_TOLERANCE * (1.0 + abs(u)):
            return following
        u = following
    return u


# --- concurrent: the two-arm test on counts -------------------------------------------


def _softplus(u: float) -> float:
    """log(1 + e^u) without overflow."""
    if u > 0:
        return u + math.log1p(math.exp(-u))
    return math.log1p(math.exp(u))


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


@dataclass(frozen=True)
class _TwoArm:
    """The conditional (binomial) likelihood, in u = logit(pi), pi = P(a bad event is new's).

    u = log r + u0, with u0 = logit(pi0) = log(N_new / N_stable).
    """

    x: float  # bad events of the new arm, tempered
    y: float  # bad events of the stable arm, tempered
    u0: float
    log_m: float

    def log_l(self, u: float) -> float:
        total = 0.0
        if self.x > 0:
            total -= self.x * _softplus(-u)  # x log pi
        if self.y > 0:
            total -= self.y * _softplus(u)  # y log(1 - pi)
        return total

    def slope(self, u: float) -> float:
        """d log L / du = x (1 - pi) - y pi."""
        return self.x * math.exp(-_softplus(u)) - self.y * math.exp(-_softplus(-u))

    @property
    def u_hat(self) -> float:
        if self.x == 0:
            return -math.inf
        if self.y == 0:
            return math.inf
        return math.log(self.x) - math.log(self.y)


def _two_arm(new: Arm, stable: Arm, phi: float) -> _TwoArm:
    x, y = new.bad / phi, stable.bad / phi
    # a = k pi0 and b = k (1 - pi0) with k = CONCURRENT_PSEUDO_COUNT / min(pi0, 1 - pi0),
    # written with the request counts so neither is a difference of near-equal numbers.
    a = CONCURRENT_PSEUDO_COUNT * max(1.0, new.requests / stable.requests)
    b = CONCURRENT_PSEUDO_COUNT * max(1.0, stable.requests / new.requests)
    log_m = _log_beta(a + x, b + y) - _log_beta(a, b)
    u0 = math.log(new.requests) - math.log(stable.requests)
    return _TwoArm(x=x, y=y, u0=u0, log_m=log_m)


def concurrent_log_odds(new: Arm, stable: Arm, *, dispersion: float = 1.0) -> float:
    """log(m / L(pi0)): the Lindon & Malek statistic against "no difference" (r = 1).

    Exposed for the cross-check with savvi's ``Multinomial.odds``.
    """
    model = _two_arm(new, stable, dispersion)
    return model.log_m - model.log_l(model.u0)


def _two_arm_interval(model: _TwoArm, log_level: float) -> tuple[float, float]:
    """{r : L(pi(r)) >= alpha m}, found in log r."""
    target = model.log_m + log_level

    def g(u: float) -> float:
        return model.log_l(u) - target

    # A finite start inside the set: the MLE, or far out where L is within e^-40 of its top
    # when the MLE is at pi = 0 or 1 (no bad events on one side).
    if model.x == 0:
        start = -math.log(model.y) - 40.0
    elif model.y == 0:
        start = math.log(model.x) + 40.0
    else:
        start = model.u_hat
    low = 0.0 if model.x == 0 else _exp(_root(g, model.slope, start, -1.0) - model.u0)
    if model.y == 0:
        return low, math.inf
    high = _exp(_root(g, model.slope, start, +1.0) - model.u0)
    return low, high


def compare_concurrent(
    new: Arm, stable: Arm, *, worse_by: float, confidence: float, dispersion: float = 1.0
) -> Evidence:
    """The canary test: is ``new`` worse than ``stable``, counted over the same time?"""
    settings = _settings(worse_by, confidence, dispersion)
    threshold = 1.0 / settings.alpha
    if not _testable(new, stable):
        return _undecided(Test.CONCURRENT, new, stable, threshold, dispersion)
    model = _two_arm(new, stable, dispersion)
    u1 = math.log1p(worse_by) + model.u0
    log_worse = model.log_m - model.log_l(min(model.u_hat, model.u0))
    log_not_worse = model.log_m - model.log_l(max(model.u_hat, u1))
    low, high = _two_arm_interval(model, math.log(settings.alpha))
    return Evidence(
        test=Test.CONCURRENT,
        decision=_decide(log_worse, log_not_worse, -math.log(settings.alpha)),
        ratio=_ratio(new, stable),
        low=low,
        high=high,
        worse=_evidence(log_worse),
        not_worse=_evidence(log_not_worse),
        threshold=threshold,
        dispersion=dispersion,
        new=new,
        baseline=stable,
    )


# --- history: the new arm against a fixed baseline window -----------------------------


@dataclass(frozen=True)
class _Rate:
    """The new arm's Poisson likelihood L(q) = q^x e^(-q n), and its gamma mixture."""

    x: float  # bad events, tempered
    n: float  # requests, tempered
    log_m: float

    def log_l(self, q: float) -> float:
        if self.x == 0:
            return -q * self.n
        if q <= 0:
            return -math.inf
        return self.x * math.log(q) - q * self.n


def _rate(new: Arm, prior_mean: float, phi: float) -> _Rate:
    x, n = new.bad / phi, new.requests / phi
    c = HISTORY_PRIOR_SHAPE
    log_rate = math.log(c) - math.log(prior_mean)
    log_m = (
        c * log_rate
        + math.lgamma(c + x)
        - math.lgamma(c)
        - (c + x) * math.log(math.exp(log_rate) + n)
    )
    return _Rate(x=x, n=n, log_m=log_m)


def history_log_mixture(new: Arm, *, prior_mean: float, dispersion: float = 1.0) -> float:
    """log m, the new arm's likelihood averaged over the gamma prior with this mean.

    Exposed for the cross-check with a numerical integral.
    """
    return _rate(new, prior_mean, dispersion).log_m


def baseline_bounds(
    baseline: Arm, *, confidence: float, dispersion: float = 1.0
) -> tuple[float, float]:
    """The baseline's bad rate, one-sided Garwood bounds (LCB, UCB) each at ``confidence``.

    Counted in tempered units (counts over the dispersion), so bursts widen them.
    """
    count, exposure = baseline.bad / dispersion, baseline.requests / dispersion
    lower = poisson_lower(count, confidence) / exposure
    upper = poisson_upper(count, confidence) / exposure
    return lower, upper


def _rate_interval(model: _Rate, log_level: float) -> tuple[float, float]:
    """{q : L(q) >= level * m}, found in w = log(q n), the log of the expected count.

    In w, not through log_l: e^w stays near the counts, where q itself may underflow or
    overflow (tiny or huge exposures).
    """
    target = model.log_m + log_level
    log_n = math.log(model.n)
    if model.x == 0:  # L falls from 1 at q = 0: the set is [0, -target / n]
        return 0.0, _exp(math.log(-target) - log_n)

    def g(w: float) -> float:
        return model.x * (w - log_n) - math.exp(w) - target

    def slope(w: float) -> float:
        return model.x - math.exp(w)

    start = math.log(model.x)
    low = _root(g, slope, start, -1.0)
    return _exp(low - log_n), _exp(_root(g, slope, start, +1.0) - log_n)


def compare_with_history(
    new: Arm, baseline: Arm, *, worse_by: float, confidence: float, dispersion: float = 1.0
) -> Evidence:
    """The test without a canary: is ``new`` worse than the ``baseline`` window's rate?

    The baseline's bounds take alpha / 2 (one-sided each: "worse" needs only the upper,
    "not worse" only the lower), the sequential test on the new arm the other alpha / 2.
    """
    settings = _settings(worse_by, confidence, dispersion)
    half_alpha = settings.alpha / 2.0
    threshold = 1.0 / half_alpha
    if not _testable(new, baseline):
        return _undecided(Test.HISTORY, new, baseline, threshold, dispersion)
    lcb, ucb = baseline_bounds(baseline, confidence=1.0 - half_alpha, dispersion=dispersion)
    model = _rate(new, ucb, dispersion)
    q_hat = model.x / model.n
    log_worse = model.log_m - model.log_l(min(q_hat, ucb))
    log_not_worse = model.log_m - model.log_l(max(q_hat, (1.0 + worse_by) * lcb))
    q_low, q_high = _rate_interval(model, math.log(half_alpha))
    return Evidence(
        test=Test.HISTORY,
        decision=_decide(log_worse, log_not_worse, math.log(threshold)),
        ratio=_ratio(new, baseline),
        low=q_low / ucb,
        high=q_high / lcb if lcb > 0 else math.inf,
        worse=_evidence(log_worse),
        not_worse=_evidence(log_not_worse),
        threshold=threshold,
        dispersion=dispersion,
        new=new,
        baseline=baseline,
    )


# --- dispersion -----------------------------------------------------------------------


def dispersion(blocks: Sequence[Arm]) -> float:
    """The variance inflation of bad counts over time blocks of the baseline (>= 1).

    Quasi-Poisson's Pearson statistic: with the pooled ratio p, the sum over blocks of
    (bad - p req)^2 / (p req), over B - 1. Poisson counts give about 1; bursts give more.
    1.0 when it cannot be estimated (fewer than two blocks with requests, or no bad event).
    """
    return pooled_dispersion([Blocks.of(blocks)])


@dataclass(frozen=True)
class Blocks:
    """One arm's time blocks, summed up: how many had requests, and Pearson's statistic of
    their bad counts about the arm's own ratio p, sum((bad_b - p req_b)^2 / (p req_b))
    (nan when the arm had no bad event: then it says nothing about bursts)."""

    count: float
    statistic: float

    @classmethod
    def of(cls, blocks: Sequence[Arm]) -> Blocks:
        used = [b for b in blocks if b.requests > 0]
        bad = sum(b.bad for b in used)
        if bad <= 0:
            return cls(float(len(used)), math.nan)
        p = bad / sum(b.requests for b in used)
        return cls(
            float(len(used)), sum((b.bad - p * b.requests) ** 2 / (p * b.requests) for b in used)
        )


def pooled_dispersion(groups: Sequence[Blocks]) -> float:
    """The variance inflation of bad counts pooled over arms (>= 1): the arms' Pearson
    statistics summed, over the blocks less one per arm (quasi-Poisson).

    Pooling the arms since the release with the baseline is what makes a burst count
    wherever it falls: a clump of errors in the new arm raises the dispersion that divides
    its own evidence, while a steady regression (Poisson about its own, higher, ratio) does
    not. An arm with fewer than two blocks or no bad event adds nothing."""
    statistic, freedom = 0.0, 0.0
    for group in groups:
        if group.count < 2 or not math.isfinite(group.statistic):
            continue
        statistic += max(group.statistic, 0.0)
        freedom += group.count - 1
    return max(1.0, statistic / freedom) if freedom > 0 else 1.0
