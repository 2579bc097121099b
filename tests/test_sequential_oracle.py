"""core/sequential.py cross-checked against independent implementations, on the same
count streams: savvi (Lindon & Malek's reference code) for the concurrent test, scipy
(numerical integration and chi-square quantiles) for the history test.

savvi and scipy are test-only dependencies (the ``dev`` extras); the daemon computes
with ``math`` alone.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import integrate, stats

from rollbackd.core.poisson_bounds import poisson_lower, poisson_upper
from rollbackd.core.sequential import (
    Arm,
    baseline_bounds,
    compare_concurrent,
    compare_with_history,
    concurrent_log_odds,
    history_log_mixture,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # savvi's imports warn about matplotlib and cvxpy
    from savvi.multinomial import Multinomial


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's multiplication method (the means here are small)."""
    total, limit, product = 0, math.exp(-mean), rng.random()
    while product > limit:
        total += 1
        product *= rng.random()
    return total


@dataclass(frozen=True)
class Look:
    """The counts one look adds, and the cumulative arms after it."""

    added_new: int
    added_stable: int
    new: Arm
    stable: Arm


def _stream(seed: int, new_requests: int, stable_requests: int, ratio: float) -> list[Look]:
    """A canary stream at a steady split (so savvi's fixed theta_0 is the split)."""
    rng = random.Random(seed)
    new, stable, looks = Arm(0, 0), Arm(0, 0), []
    for _ in range(40):
        added_new = _poisson(rng, new_requests * 0.01 * ratio)
        added_stable = _poisson(rng, stable_requests * 0.01)
        new = Arm(new.requests + new_requests, new.bad + added_new)
        stable = Arm(stable.requests + stable_requests, stable.bad + added_stable)
        looks.append(Look(added_new, added_stable, new, stable))
    return looks


# The new arm's share of requests pi0 = 1/4, 1/2 and 4/5: 1 - pi0 + pi0 is exactly 1 in
# floating point, as savvi requires of theta_0.
STREAMS = [
    (1, 100, 300, 1.0),
    (2, 100, 300, 2.0),
    (3, 500, 500, 1.0),
    (4, 500, 500, 0.7),
    (5, 400, 100, 1.5),
]


def _savvi(new_requests: int, stable_requests: int, alpha: float) -> Multinomial:
    pi0 = new_requests / (new_requests + stable_requests)
    # Our prior: the smaller arm's pseudo-count is 1, i.e. k = 1 / min(pi0, 1 - pi0).
    return Multinomial(alpha, np.array([1 - pi0, pi0]), k=1 / min(pi0, 1 - pi0))


@pytest.mark.parametrize(("seed", "new_requests", "stable_requests", "ratio"), STREAMS)
def test_concurrent_odds_equal_savvi(
    seed: int, new_requests: int, stable_requests: int, ratio: float
) -> None:
    # savvi updates look by look; ours is computed afresh from the cumulative counts.
    reference = _savvi(new_requests, stable_requests, alpha=0.01)
    for look in _stream(seed, new_requests, stable_requests, ratio):
        reference.update(np.array([look.added_stable, look.added_new]))
        ours = math.exp(concurrent_log_odds(look.new, look.stable))
        assert ours == pytest.approx(float(reference.odds), rel=1e-9)


def _savvi_ratio_interval(reference: Multinomial, pi0: float) -> tuple[float, float]:
    """savvi's confidence set for theta (cvxpy), as a set for r = odds(pi) / odds(pi0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theta = reference.calculate_conf_int()
    low, high = theta[1]
    odds0 = pi0 / (1 - pi0)
    return low / (1 - low) / odds0, high / (1 - high) / odds0


@pytest.mark.parametrize(("seed", "new_requests", "stable_requests", "ratio"), STREAMS)
def test_concurrent_interval_equals_savvi(
    seed: int, new_requests: int, stable_requests: int, ratio: float
) -> None:
    confidence = 0.95
    pi0 = new_requests / (new_requests + stable_requests)
    reference = _savvi(new_requests, stable_requests, alpha=1 - confidence)
    checked = 0
    for index, look in enumerate(_stream(seed, new_requests, stable_requests, ratio)):
        reference.update(np.array([look.added_stable, look.added_new]))
        if index % 8 != 7 or look.new.bad == 0 or look.stable.bad == 0:
            continue  # cvxpy is slow; and with no bad events on a side an end is 0 or inf
        ours = compare_concurrent(look.new, look.stable, worse_by=0.2, confidence=confidence)
        low, high = _savvi_ratio_interval(reference, pi0)
        assert ours.low == pytest.approx(low, rel=1e-4)
        assert ours.high == pytest.approx(high, rel=1e-4)
        checked += 1
    assert checked >= 3


def _scipy_log_mixture(x: float, n: float, prior_mean: float, shape: float = 1.0) -> float:
    """log of the integral of q^x e^(-q n) against Gamma(shape, rate shape / prior_mean).

    Integrated relative to the likelihood's top, so nothing underflows.
    """
    q_hat = x / n
    top = (x * math.log(q_hat) if x > 0 else 0.0) - q_hat * n
    prior = stats.gamma(a=shape, scale=prior_mean / shape)

    def integrand(q: float) -> float:
        log_l = (x * math.log(q) if x > 0 else 0.0) - q * n
        return math.exp(log_l - top) * float(prior.pdf(q))

    upper = (x + 40 * math.sqrt(x + 1) + 40) / n  # far past the likelihood's mass
    points = [q_hat] if 0 < q_hat < upper else None
    value, _ = integrate.quad(integrand, 0, upper, points=points, epsabs=0, epsrel=1e-12, limit=200)
    return math.log(value) + top


@pytest.mark.parametrize(
    ("new", "prior_mean", "phi"),
    [
        (Arm(1000, 0), 0.004, 1.0),
        (Arm(1000, 4), 0.004, 1.0),
        (Arm(25_000, 250), 0.012, 1.0),
        (Arm(25_000, 250), 0.012, 2.5),
        (Arm(3333.3, 12.5), 0.002, 1.0),
        (Arm(1e6, 30_000), 0.011, 1.0),
    ],
)
def test_history_mixture_equals_a_numerical_integral(
    new: Arm, prior_mean: float, phi: float
) -> None:
    ours = history_log_mixture(new, prior_mean=prior_mean, dispersion=phi)
    reference = _scipy_log_mixture(new.bad / phi, new.requests / phi, prior_mean)
    assert ours == pytest.approx(reference, rel=1e-9, abs=1e-9)


def _chi2_bounds(count: float, confidence: float) -> tuple[float, float]:
    upper = stats.chi2.ppf(confidence, 2 * count + 2) / 2
    lower = stats.chi2.ppf(1 - confidence, 2 * count) / 2 if count > 0 else 0.0
    return float(lower), float(upper)


@pytest.mark.parametrize("count", [0, 0.3, 1, 2.5, 7, 42, 999, 1000, 12_345.6, 1e6, 1e9])
@pytest.mark.parametrize("confidence", [0.95, 0.975, 0.995, 0.9995])
def test_garwood_bounds_equal_chi_square_quantiles(count: float, confidence: float) -> None:
    lower, upper = _chi2_bounds(count, confidence)
    assert poisson_upper(count, confidence) == pytest.approx(upper, rel=1e-9)
    assert poisson_lower(count, confidence) == pytest.approx(lower, rel=1e-9)


def _history_stream(seed: int, ratio: float) -> tuple[Arm, list[Arm]]:
    rng = random.Random(seed)
    baseline = Arm(20_000, _poisson(rng, 200))
    new, looks = Arm(0, 0), []
    for _ in range(30):
        new = Arm(new.requests + 500, new.bad + _poisson(rng, 5 * ratio))
        looks.append(new)
    return baseline, looks


@pytest.mark.parametrize(("seed", "ratio"), [(11, 1.0), (12, 2.0), (13, 0.6)])
def test_history_evidence_equals_scipy(seed: int, ratio: float) -> None:
    # The whole history statistic rebuilt from scipy: chi-square baseline bounds at
    # alpha / 2, the mixture by quadrature, the likelihood at the hypothesis' boundary.
    confidence, worse_by = 0.95, 0.2
    baseline, looks = _history_stream(seed, ratio)
    lcb, ucb = (bound / baseline.requests for bound in _chi2_bounds(baseline.bad, 0.975))
    assert baseline_bounds(baseline, confidence=0.975) == pytest.approx((lcb, ucb), rel=1e-9)
    for index, new in enumerate(looks):
        if index % 3 != 2 or new.bad == 0:
            continue  # scipy's quadrature with its gamma pdf is slow
        ours = compare_with_history(new, baseline, worse_by=worse_by, confidence=confidence)
        log_m = _scipy_log_mixture(new.bad, new.requests, ucb)
        q_hat = new.bad / new.requests

        def log_l(q: float, new: Arm = new) -> float:
            return new.bad * math.log(q) - q * new.requests

        worse = math.exp(log_m - log_l(min(q_hat, ucb)))
        not_worse = math.exp(log_m - log_l(max(q_hat, (1 + worse_by) * lcb)))
        assert ours.worse == pytest.approx(worse, rel=1e-8)
        assert ours.not_worse == pytest.approx(not_worse, rel=1e-8)
