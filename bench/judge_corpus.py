"""The simulated release corpus of ``bench/judge_quality.py`` (issue 16): count streams.

A release is watched for ``WATCH`` after it starts, with a baseline hour before it at the old
ratio. Time moves in steps of 15 s (the checks' interval); a minute is four steps, the block
the ``compare`` check measures burstiness on. Each step draws

* requests: Poisson(rate * 15 s * shape(t)), where shape is 1 (steady), the diurnal curve
  1 + 0.6 sin(2 pi t / 24 h + phase) with a random phase, or (bursty) a lognormal per-minute
  multiplier with mean 1 (sigma ``BURSTY_SIGMA``);
* bad requests: Binomial(requests, p) for steady and diurnal traffic; for bursty traffic a
  compound Poisson count with the same mean, clumps ~ Poisson(p * requests / CLUMP_MEAN)
  of geometric size (mean ``CLUMP_MEAN``), capped at the step's requests.

"Slow" requests (above a latency bucket) are a count of the same form as errors, so they
are drawn by the same machinery, with the cell's baseline ratio: a slow release is a second,
independent set of replicates, labelled apart so that a difference would show.

Two watches are drawn per release: the history case (the new version takes all traffic and
is compared with the hour before) and the concurrent case (a canary takes 10 % of the
requests, binomially, and the stable 90 % keep the old ratio). Pure numpy, seeded by the
caller: the same generator gives the same corpus.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

STEP_SECONDS = 15
STEPS_PER_MINUTE = 4
BASELINE_STEPS = 240  # 1 h
WATCH_STEPS = 480  # 2 h
CANARY_SHARE = 0.10
CLUMP_MEAN = 10.0
BURSTY_SIGMA = 0.5
DIURNAL_AMPLITUDE = 0.6
DAY_SECONDS = 86_400


class Shape(enum.Enum):
    STEADY = "steady"
    DIURNAL = "diurnal"
    BURSTY = "bursty"


class Kind(enum.Enum):
    """What a bad release makes worse (healthy releases make nothing worse)."""

    HEALTHY = "healthy"
    ERRORS = "errors"
    SLOW = "slow"


@dataclass(frozen=True)
class Cell:
    """One corner of the corpus: the old version's bad ratio, the traffic and its shape."""

    ratio: float
    rate: float
    shape: Shape

    def label(self) -> str:
        return f"{self.ratio:.1%} {self.rate:g}/s {self.shape.value}"


@dataclass(frozen=True)
class Release:
    cell: Cell
    kind: Kind
    factor: float
    """The new version's bad ratio over the old one's (1 for a healthy release)."""


@dataclass(frozen=True)
class Stream:
    """Per-step counts of one arm: ``requests[i]`` and ``bad[i]`` during step ``i``."""

    requests: np.ndarray
    bad: np.ndarray


@dataclass(frozen=True)
class Watch:
    """One simulated release: the baseline hour, then its two watches."""

    baseline: Stream
    full: Stream
    """History case: the new version with all of the traffic."""
    canary: Stream
    """Concurrent case: the new version with 10 % of the traffic..."""
    stable: Stream
    """...and the old version with the rest, at the old ratio."""


def _shape(
    cell: Cell, start: float, steps: int, phase: float, rng: np.random.Generator
) -> np.ndarray:
    """The traffic multiplier of each step from ``start`` seconds (release = 0)."""
    t = start + STEP_SECONDS * np.arange(steps)
    if cell.shape is Shape.DIURNAL:
        return 1.0 + DIURNAL_AMPLITUDE * np.sin(2 * np.pi * t / DAY_SECONDS + phase)
    if cell.shape is Shape.BURSTY:
        minutes = -(-steps // STEPS_PER_MINUTE)
        sigma = BURSTY_SIGMA
        noise = rng.lognormal(-sigma * sigma / 2, sigma, size=minutes)
        return np.repeat(noise, STEPS_PER_MINUTE)[:steps]
    return np.ones(steps)


def _bad(requests: np.ndarray, ratio: float, bursty: bool, rng: np.random.Generator) -> np.ndarray:
    if not bursty or ratio <= 0:
        return rng.binomial(requests, ratio)
    return _clumped(requests, ratio, rng)


def _clumped(requests: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Bad requests in clumps: along the stream's sequence of requests, runs of good
    requests alternate with runs of bad ones, both of geometric length, the bad runs of mean
    ``CLUMP_MEAN`` and the good ones of mean ``CLUMP_MEAN (1 - ratio) / ratio``, so the mean
    ratio is exactly ``ratio``. A clump may span steps (at 1 req/s it lasts ~10 s), so no
    step caps it and the mean is kept at any traffic."""
    edges = np.concatenate(([0], np.cumsum(requests)))
    total = int(edges[-1])
    good_mean = CLUMP_MEAN * (1 - ratio) / ratio
    cycles = int(total / (good_mean + CLUMP_MEAN) * 1.2) + 16
    while True:
        good = rng.geometric(1 / max(good_mean, 1.0), size=cycles)
        bad = rng.geometric(1 / CLUMP_MEAN, size=cycles)
        starts = np.concatenate(([0], np.cumsum(good + bad)[:-1]))
        if starts[-1] > total:
            break
        cycles *= 2
    bad_before = np.concatenate(([0], np.cumsum(bad)[:-1]))
    # The number of bad requests among the first x of the stream, at each step's edge.
    cycle = np.searchsorted(starts, edges, side="right") - 1
    into_bad = np.clip(edges - starts[cycle] - good[cycle], 0, bad[cycle])
    bad_upto = bad_before[cycle] + into_bad
    return np.diff(bad_upto)


def simulate(release: Release, rng: np.random.Generator) -> Watch:
    """The counts of one release's baseline hour and of its two watches."""
    cell = release.cell
    bursty = cell.shape is Shape.BURSTY
    new_ratio = min(cell.ratio * release.factor, 1.0)
    phase = rng.uniform(0, 2 * np.pi)
    per_step = cell.rate * STEP_SECONDS
    start = -BASELINE_STEPS * STEP_SECONDS
    base_requests = rng.poisson(per_step * _shape(cell, start, BASELINE_STEPS, phase, rng))
    baseline = Stream(base_requests, _bad(base_requests, cell.ratio, bursty, rng))
    # Both watches follow the same traffic curve but are drawn apart: two releases, one
    # rolled out whole, one as a canary.
    full_requests = rng.poisson(per_step * _shape(cell, 0, WATCH_STEPS, phase, rng))
    full = Stream(full_requests, _bad(full_requests, new_ratio, bursty, rng))
    total = rng.poisson(per_step * _shape(cell, 0, WATCH_STEPS, phase, rng))
    canary_requests = rng.binomial(total, CANARY_SHARE)
    stable_requests = total - canary_requests
    canary = Stream(canary_requests, _bad(canary_requests, new_ratio, bursty, rng))
    stable = Stream(stable_requests, _bad(stable_requests, cell.ratio, bursty, rng))
    return Watch(baseline, full, canary, stable)


def minute_blocks(stream: Stream) -> list[tuple[int, int]]:
    """The stream's (requests, bad) per minute, as the ``compare`` check reads its baseline."""
    minutes = len(stream.requests) // STEPS_PER_MINUTE
    shape = (minutes, STEPS_PER_MINUTE)
    requests = stream.requests[: minutes * STEPS_PER_MINUTE].reshape(shape).sum(axis=1)
    bad = stream.bad[: minutes * STEPS_PER_MINUTE].reshape(shape).sum(axis=1)
    return [(int(r), int(b)) for r, b in zip(requests, bad, strict=True)]
