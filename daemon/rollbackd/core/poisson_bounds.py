"""Exact (Garwood) confidence bounds for the mean of a Poisson count, in pure Python.

The history test of ``core/sequential.py`` counts the uncertainty of the baseline's rate
with these bounds. For a count ``k`` the one-sided upper bound at confidence ``c`` is the
mean ``mu`` at which seeing ``k`` or fewer events has probability ``1 - c``; the lower
bound is the mean at which seeing ``k`` or more has probability ``1 - c``. Both are
quantiles of the gamma distribution, so they come from the regularised incomplete gamma
function, inverted by Newton's method inside a bisection bracket:

    upper: P(k + 1, mu) = c          lower: P(k, mu) = 1 - c   (0 when k == 0)

``k`` may be non-integer (Prometheus' ``increase()`` extrapolates, and counts are divided
by the dispersion); the same formulas are the natural continuous extension.

P is computed by its power series below ``x = s + 1`` and by the continued fraction of Q
above (Numerical Recipes, 6.2); both need about ``sqrt(s)`` terms near ``x = s``, so for
large shapes Temme's uniform asymptotic expansion (Gil, Segura & Temme, "Numerical methods
for special functions", 8.3) takes over, accurate there to far better than a bound needs.
"""

from __future__ import annotations

import math
from functools import lru_cache

_EPS = 1e-16
_MAX_TERMS = 100_000
_TINY = 1e-300
LARGE_SHAPE = 1000.0
"""From this shape on Temme's expansion is used: its error is then below 1e-11, while the
series would need thousands of terms per evaluation (and there are ~60 per bound)."""

# Taylor coefficients of Temme's C0 and C1 in eta, for |eta| small where the closed forms
# cancel (DiDonato & Morris 1986, the d0k and d1k constants).
_C0_SERIES = (-1 / 3, 1 / 12, -2 / 135, 1 / 864, 1 / 2835, -139 / 777600)
_C1_SERIES = (-1 / 540, -1 / 288, 1 / 378, -7 / 10368)


def regularized_gamma_p(s: float, x: float) -> float:
    """P(s, x) = gamma(s, x) / Gamma(s), the gamma distribution's CDF, for s > 0, x >= 0."""
    if x <= 0:
        return 0.0
    if s >= LARGE_SHAPE:
        lower, _ = _temme(s, x)
        return lower
    if x < s + 1:
        return _series_p(s, x)
    return 1.0 - _continued_fraction_q(s, x)


def regularized_gamma_q(s: float, x: float) -> float:
    """Q(s, x) = 1 - P(s, x), computed directly (no cancellation in the upper tail)."""
    if x <= 0:
        return 1.0
    if s >= LARGE_SHAPE:
        _, upper = _temme(s, x)
        return upper
    if x < s + 1:
        return 1.0 - _series_p(s, x)
    return _continued_fraction_q(s, x)


def _log_prefactor(s: float, x: float) -> float:
    """log(x^s e^-x / Gamma(s)), the factor both expansions share."""
    return s * math.log(x) - x - math.lgamma(s)


def _series_p(s: float, x: float) -> float:
    term = 1.0 / s
    total = term
    shape = s
    for _ in range(_MAX_TERMS):
        shape += 1.0
        term *= x / shape
        total += term
        if abs(term) < abs(total) * _EPS:
            break
    return min(1.0, total * math.exp(_log_prefactor(s, x)))


def _continued_fraction_q(s: float, x: float) -> float:
    # Modified Lentz's method on Q's continued fraction.
    b = x + 1.0 - s
    c = 1.0 / _TINY
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_TERMS):
        an = -i * (i - s)
        b += 2.0
        d = an * d + b
        d = _TINY if abs(d) < _TINY else d
        c = b + an / c
        c = _TINY if abs(c) < _TINY else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return min(1.0, math.exp(_log_prefactor(s, x)) * h)


def _polynomial(coefficients: tuple[float, ...], t: float) -> float:
    total = 0.0
    for coefficient in reversed(coefficients):
        total = total * t + coefficient
    return total


def _temme(s: float, x: float) -> tuple[float, float]:
    """(P, Q) by Temme's uniform expansion with its first two correction terms."""
    d = (x - s) / s  # lambda - 1
    if abs(d) < 0.01:
        # d - log1p(d) by its series: the direct difference cancels near d = 0.
        half_eta2 = sum((-1) ** k * d**k / k for k in range(2, 14))
    else:
        half_eta2 = d - math.log1p(d)
    eta = math.copysign(math.sqrt(2.0 * max(half_eta2, 0.0)), d)
    if abs(eta) < 0.01:
        c0 = _polynomial(_C0_SERIES, eta)
        c1 = _polynomial(_C1_SERIES, eta)
    else:
        c0 = 1.0 / d - 1.0 / eta
        c1 = 1.0 / eta**3 - 1.0 / d**3 - 1.0 / d**2 - 1.0 / (12.0 * d)
    z = eta * math.sqrt(s / 2.0)
    remainder = math.exp(-s * eta * eta / 2.0) / math.sqrt(2.0 * math.pi * s) * (c0 + c1 / s)
    upper = 0.5 * math.erfc(z) + remainder
    lower = 0.5 * math.erfc(-z) - remainder
    return min(1.0, max(0.0, lower)), min(1.0, max(0.0, upper))


def _solve_p(s: float, target: float) -> float:
    """The x with P(s, x) = target (P rises in x): bracket, then Newton in log x kept
    inside the bracket (bisecting when a step would leave it)."""
    lo = hi = max(s, 1.0)
    factor = 2.0
    while regularized_gamma_p(s, hi) < target:
        lo, hi = hi, hi * factor
        factor *= factor
    while regularized_gamma_p(s, lo) > target:
        if lo <= _TINY:
            return 0.0  # the quantile underflows: a tiny shape puts its mass at 0
        lo, hi = max(lo / factor, _TINY), lo
        factor = min(factor * factor, 1e100)
    log_lo, log_hi = math.log(lo), math.log(hi)
    v = (log_lo + log_hi) / 2.0
    log_gamma = math.lgamma(s)
    for _ in range(200):
        error = regularized_gamma_p(s, math.exp(v)) - target
        if error < 0:
            log_lo = v
        else:
            log_hi = v
        # dP / d(log x) = x times the gamma density at x.
        slope = math.exp(s * v - math.exp(v) - log_gamma)
        following = v - error / slope if slope > 0 else math.nan
        if not log_lo < following < log_hi:
            following = (log_lo + log_hi) / 2.0
        if abs(following - v) < 1e-15 * max(1.0, abs(v)) or log_hi - log_lo < 1e-15:
            return math.exp(following)
        v = following
    return math.exp(v)


def _check(count: float, confidence: float) -> None:
    if not (math.isfinite(count) and count >= 0):
        raise ValueError(f"count must be a finite number >= 0, got: {count}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got: {confidence}")


@lru_cache(maxsize=1024)
def poisson_upper(count: float, confidence: float) -> float:
    """One-sided upper bound for a Poisson mean, having seen ``count`` events.

    Cached: the daemon asks again at every evaluation for the same fixed baseline.
    """
    _check(count, confidence)
    return _solve_p(count + 1.0, confidence)


@lru_cache(maxsize=1024)
def poisson_lower(count: float, confidence: float) -> float:
    """One-sided lower bound for a Poisson mean, having seen ``count`` events (0 for none)."""
    _check(count, confidence)
    if count == 0:
        return 0.0
    return _solve_p(count, 1.0 - confidence)
