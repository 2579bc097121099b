"""The judge-quality bench (``bench/judge_quality.py``) runs, on a handful of releases, and its
fast path to the compare test's decision agrees with the public functions."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rollbackd.core import sequential
from rollbackd.core.sequential import Arm

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench() -> Iterator[object]:
    sys.path.insert(0, str(BENCH))
    try:
        import judge_corpus
        import judge_quality

        yield judge_quality, judge_corpus
    finally:
        sys.path.remove(str(BENCH))


def test_a_small_run_gives_a_row_per_judge(bench, monkeypatch) -> None:
    judge_quality, judge_corpus = bench
    monkeypatch.setattr(judge_quality, "VERIFY_EVERY_LOOK", True)
    cells = (
        judge_corpus.Cell(0.05, 10.0, judge_corpus.Shape.BURSTY),
        judge_corpus.Cell(0.01, 100.0, judge_corpus.Shape.STEADY),
    )
    plan = judge_quality.Plan(healthy=2, bad=1, chunk=2, cells=cells, factors=(5.0,))
    tally = judge_quality.run(plan, workers=1)
    text = judge_quality.report(tally, plan)
    for judge in judge_quality.JUDGES:
        assert f"| {judge} | " in judge_quality.headline_table(tally, plan)
        assert f"### {judge}: median time to roll back" in text
        for release in (r for r, _ in plan.releases()):
            assert len(tally.outcomes[(judge, release)]) == (
                2 if release.kind is judge_corpus.Kind.HEALTHY else 1
            )
    # A 5x regression at 1 % and 100 req/s, watched for two hours: every judge sees it.
    steady_bad = judge_corpus.Release(cells[1], judge_corpus.Kind.ERRORS, 5.0)
    for judge in ("compare history", "compare canary", "z-test history"):
        assert tally.outcomes[(judge, steady_bad)][0].fired < judge_quality.NEVER


def test_the_fast_decision_is_the_public_one(bench) -> None:
    judge_quality, _ = bench
    rng = np.random.default_rng(7)
    for _ in range(300):
        base_requests = float(rng.integers(1, 400_000))
        base = Arm(base_requests, float(rng.binomial(int(base_requests), rng.uniform(0, 0.1))))
        phi = float(rng.choice([1.0, 1.0, 3.5, 19.0]))
        fast = judge_quality.FastDecision(base)
        new_requests = float(rng.integers(0, 50_000))
        p = rng.uniform(0, 0.2)
        new = Arm(new_requests, float(rng.binomial(int(new_requests), p)))
        for concurrent in (False, True):
            got = fast.concurrent(new, base, phi) if concurrent else fast.history(new, phi)
            assert got is judge_quality._public_decision(new, base, concurrent, phi)


def test_wilson_interval_brackets_the_share(bench) -> None:
    judge_quality, _ = bench
    low, high = judge_quality.wilson(3, 300)
    assert low < 0.01 < high
    assert judge_quality.wilson(0, 300)[0] == pytest.approx(0.0, abs=1e-12)
    assert 0.01 < judge_quality.wilson(0, 300)[1] < 0.013


def test_clumped_bad_counts_keep_the_mean_ratio(bench) -> None:
    _, judge_corpus = bench
    rng = np.random.default_rng(3)
    requests = rng.poisson(150, size=20_000)
    bad = judge_corpus._clumped(requests, 0.02, rng)
    assert (bad >= 0).all() and (bad <= requests).all()
    assert bad.sum() / requests.sum() == pytest.approx(0.02, rel=0.05)
    assert (
        sequential.dispersion([Arm(float(r), float(b)) for r, b in zip(requests, bad, strict=True)])
        > 5
    )
