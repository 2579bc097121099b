"""Judge quality (issue 16): how often three judges roll a healthy release back, and how soon
they roll a bad one back, on a simulated corpus (``bench/judge_corpus.py``).

The judges, each in the history case (the new version takes all traffic and is compared
with the hour before the release) and the concurrent case (a 10 % canary against the 90 %
stable track):

* ``compare``: the new check's sequential test (``rollbackd.core.sequential``) with its
  defaults, worse_by 20 %, confidence 0.99, every 15 s on the counts since the release; the
  dispersion pools the baseline hour's per-minute blocks with the judged arms' completed
  minutes since the release (``pooled_dispersion``, as the check's queries do); it fires at
  the first "worse" (the check's ``breaches`` is 1);
* ``threshold``: the ``error_rate`` check as ``rules/web-service.toml`` sets it (the README
  gives no recommended values): ratio over a 1m window above 0.05, min_rate 1 req/s,
  firing after 3 consecutive breaching evaluations every 15 s (the README's default
  ``breaches``; the rule file itself says ``for = "1m"``, i.e. 5);
* ``threshold+inc``: as ``rules/kubernetes-canary.toml`` sets it: above 0.02 OR more than
  50 % worse than the baseline (``max_increase``), 2m window, 3 breaches, min_rate 0.5. Its
  baseline is the stable track's ratio over the same window in a canary, else the ratio of
  the last window before the release (as ``runtime/baselines.py`` measures it);
* ``z-test``: a fresh one-sided two-proportion z-test at 99 % at every look, of the counts
  since the release against the baseline (the hour before, or the stable track's counts
  since the release): Kayenta-style, a fixed-horizon test looked at again and again.

Every release is watched for 2 h (480 looks); a healthy release counts as rolled back if
any look fires. Times to roll back are medians over the releases of a kind, a release never
rolled back counting as later than any (so ">2h" when half or more never are).

    .venv/bin/python bench/judge_quality.py [--quick] [--healthy 300] [--bad 30] [--workers 2]

Prints markdown tables (and writes them to ``--out``). Seeded: the same arguments give the
same figures. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rollbackd.core import sequential
from rollbackd.core.sequential import Arm, Decision

sys.path.insert(0, str(Path(__file__).resolve().parent))

from judge_corpus import (
    BASELINE_STEPS,
    STEP_SECONDS,
    STEPS_PER_MINUTE,
    WATCH_STEPS,
    Cell,
    Kind,
    Release,
    Shape,
    Stream,
    Watch,
    minute_blocks,
    simulate,
)

RATIOS = (0.001, 0.01, 0.05)
RATES = (1.0, 10.0, 100.0)
SHAPES = tuple(Shape)
FACTORS = (1.1, 1.5, 2.0, 5.0)
BAD_KINDS = (Kind.ERRORS, Kind.SLOW)
SEED = 16
WORSE_BY = 0.2
CONFIDENCE = 0.99
Z_99 = 2.3263478740408408  # one-sided 99 % quantile of the standard normal
NEVER = math.inf


@dataclass(frozen=True)
class Threshold:
    """An ``error_rate`` rule's settings, in steps of 15 s."""

    above: float
    window_steps: int
    breaches: int
    min_rate: float
    max_increase: float | None = None


WEB_SERVICE = Threshold(above=0.05, window_steps=4, breaches=3, min_rate=1.0)
KUBERNETES_CANARY = Threshold(
    above=0.02, window_steps=8, breaches=3, min_rate=0.5, max_increase=0.5
)


@dataclass(frozen=True)
class Outcome:
    """When a judge fired on one release (``NEVER`` if it did not within the watch), and
    when the compare test first said "not worse" (``NEVER`` for the other judges)."""

    fired: float
    not_worse: float = NEVER


@dataclass(frozen=True)
class Group:
    """A batch of releases of one kind in one cell, with its own seed."""

    release: Release
    count: int
    seed: int


@dataclass
class Tally:
    outcomes: dict[tuple[str, Release], list[Outcome]] = field(default_factory=dict)

    def add(self, judge: str, release: Release, found: list[Outcome]) -> None:
        self.outcomes.setdefault((judge, release), []).extend(found)


# --- the judges -------------------------------------------------------------------------


def _cumulative(stream: Stream) -> tuple[np.ndarray, np.ndarray]:
    """Counts since the release at each look (after each step)."""
    return np.cumsum(stream.requests), np.cumsum(stream.bad)


def _first(mask: np.ndarray) -> float:
    hits = np.flatnonzero(mask)
    return float((hits[0] + 1) * STEP_SECONDS) if hits.size else NEVER


class FastDecision:
    """The compare test's decision alone, as ``compare_concurrent`` and
    ``compare_with_history`` reach it, without the confidence interval they also compute
    (about 90 % of their time, and not needed here), and with the history baseline's bounds
    computed once per dispersion rather than at every look. It is built from the module's own
    pieces; ``verify`` checks it against the public functions wherever it changes its mind
    (and, in ``--quick`` runs and the test, at every look)."""

    def __init__(self, baseline: Arm) -> None:
        self.log_threshold = -math.log(1 - CONFIDENCE)
        self.half_log_threshold = -math.log((1 - CONFIDENCE) / 2)
        self.baseline = baseline
        self._bounds: dict[float, tuple[float, float]] = {}

    def bounds(self, phi: float) -> tuple[float, float]:
        if phi not in self._bounds:
            self._bounds[phi] = sequential.baseline_bounds(
                self.baseline, confidence=1 - (1 - CONFIDENCE) / 2, dispersion=phi
            )
        return self._bounds[phi]

    def concurrent(self, new: Arm, stable: Arm, phi: float) -> Decision:
        if new.requests == 0 or stable.requests == 0 or new.bad + stable.bad == 0:
            return Decision.UNDECIDED
        model = sequential._two_arm(new, stable, phi)
        u1 = math.log1p(WORSE_BY) + model.u0
        log_worse = model.log_m - model.log_l(min(model.u_hat, model.u0))
        log_not_worse = model.log_m - model.log_l(max(model.u_hat, u1))
        return sequential._decide(log_worse, log_not_worse, self.log_threshold)

    def history(self, new: Arm, phi: float) -> Decision:
        if new.requests == 0 or self.baseline.requests == 0 or new.bad + self.baseline.bad == 0:
            return Decision.UNDECIDED
        lcb, ucb = self.bounds(phi)
        model = sequential._rate(new, ucb, phi)
        q_hat = model.x / model.n
        log_worse = model.log_m - model.log_l(min(q_hat, ucb))
        log_not_worse = model.log_m - model.log_l(max(q_hat, (1.0 + WORSE_BY) * lcb))
        return sequential._decide(log_worse, log_not_worse, self.half_log_threshold)


class RecentBlocks:
    """An arm's completed one-minute blocks since the release, summed as the check's
    ``recent blocks`` queries sum them, at each look."""

    def __init__(self, stream: Stream) -> None:
        blocks = minute_blocks(stream)
        requests = np.array([r for r, _ in blocks], dtype=float)
        bad = np.array([b for _, b in blocks], dtype=float)
        used = requests > 0
        squares = np.where(used, bad**2 / np.maximum(requests, 1), 0.0)

        def running(values: np.ndarray) -> np.ndarray:
            return np.concatenate(([0.0], np.cumsum(values)))

        self.count = running(used.astype(float))
        self.squares = running(squares)
        self.requests = running(requests)
        self.bad = running(bad)

    def at(self, look: int) -> tuple[sequential.Blocks, Arm]:
        """The blocks' count and Pearson statistic about their own ratio (as the check's
        query computes it: sum(bad^2 / req) / p - sum(bad)), and their totals."""
        minutes = min((look + 1) // STEPS_PER_MINUTE, len(self.count) - 1)
        arm = Arm(float(self.requests[minutes]), float(self.bad[minutes]))
        statistic = float(self.squares[minutes]) / arm.ratio - arm.bad if arm.bad > 0 else math.nan
        return sequential.Blocks(float(self.count[minutes]), statistic), arm


def _public_decision(new: Arm, baseline: Arm, concurrent: bool, phi: float) -> Decision:
    judge = sequential.compare_concurrent if concurrent else sequential.compare_with_history
    return judge(new, baseline, worse_by=WORSE_BY, confidence=CONFIDENCE, dispersion=phi).decision


VERIFY_EVERY_LOOK = False
"""Set by ``--quick`` (and the test): check the fast decision at every look, not only where
it changes."""


def _compare(watch: Watch, concurrent: bool) -> Outcome:
    """As the check judges: the counts through the last whole minute, the dispersion
    pooled over the baseline hour's blocks and the judged arms' blocks since the release."""
    base_blocks = sequential.Blocks.of(
        [Arm(float(r), float(b)) for r, b in minute_blocks(watch.baseline)]
    )
    judged = [watch.canary, watch.stable] if concurrent else [watch.full]
    recent = [RecentBlocks(stream) for stream in judged]
    history = Arm(float(watch.baseline.requests.sum()), float(watch.baseline.bad.sum()))
    fast = FastDecision(history)
    not_worse = NEVER
    last = Decision.UNDECIDED
    for look in range(WATCH_STEPS):
        # The check judges the counts through the last whole minute (``counted_until``).
        blocks, arms = zip(*(r.at(look) for r in recent), strict=True)
        new = arms[0]
        if new.requests == 0:
            continue  # no whole minute, or no requests, since the release: NO_DATA
        phi = sequential.pooled_dispersion([base_blocks, *blocks])
        if concurrent:
            baseline = arms[1]
            decision = fast.concurrent(new, baseline, phi)
        else:
            baseline = history
            decision = fast.history(new, phi)
        if decision is not last or VERIFY_EVERY_LOOK:
            public = _public_decision(new, baseline, concurrent, phi)
            if public is not decision:
                raise AssertionError(f"fast {decision} != public {public}: {new} vs {baseline}")
            last = decision
        at = float((look + 1) * STEP_SECONDS)
        if decision is Decision.WORSE:
            return Outcome(at, not_worse)
        if decision is Decision.NOT_WORSE and not_worse == NEVER:
            not_worse = at
    return Outcome(NEVER, not_worse)


def _windowed(stream: Stream, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(requests, bad, seconds) over the window ending at each look; a window that would
    reach back before the release holds only what the new version has served."""
    requests, bad = _cumulative(stream)
    shifted = np.concatenate((np.zeros(steps, dtype=requests.dtype), requests))[:-steps]
    shifted_bad = np.concatenate((np.zeros(steps, dtype=bad.dtype), bad))[:-steps]
    seconds = STEP_SECONDS * np.minimum(np.arange(1, len(requests) + 1), steps)
    return requests - shifted, bad - shifted_bad, seconds


def _threshold(watch: Watch, concurrent: bool, rule: Threshold) -> Outcome:
    stream = watch.canary if concurrent else watch.full
    requests, bad, seconds = _windowed(stream, rule.window_steps)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(requests > 0, bad / np.maximum(requests, 1), np.nan)
    has_data = (requests > 0) & (requests / seconds >= rule.min_rate)
    breach = has_data & (ratio > rule.above)
    if rule.max_increase is not None:
        if concurrent:
            base_requests, base_bad, _ = _windowed(watch.stable, rule.window_steps)
            base = np.where(base_requests > 0, base_bad / np.maximum(base_requests, 1), 0.0)
        else:
            last = slice(BASELINE_STEPS - rule.window_steps, BASELINE_STEPS)
            last_requests = watch.baseline.requests[last].sum()
            before = watch.baseline.bad[last].sum() / last_requests if last_requests else 0.0
            base = np.full(len(ratio), before)
        # A baseline of 0 makes no relative comparison (checks/judge.py).
        breach |= has_data & (base > 0) & (ratio > base * (1 + rule.max_increase))
    # A run of ``breaches`` consecutive breaching looks; NO_DATA and OK both end a run.
    run = np.zeros(len(breach), dtype=np.int64)
    count = 0
    for i, b in enumerate(breach):
        count = count + 1 if b else 0
        run[i] = count
    return Outcome(_first(run >= rule.breaches))


def _z_test(watch: Watch, concurrent: bool) -> Outcome:
    new_requests, new_bad = _cumulative(watch.canary if concurrent else watch.full)
    if concurrent:
        base_requests, base_bad = _cumulative(watch.stable)
    else:
        base_requests = np.full(WATCH_STEPS, watch.baseline.requests.sum())
        base_bad = np.full(WATCH_STEPS, watch.baseline.bad.sum())
    n1, x1 = new_requests.astype(float), new_bad.astype(float)
    n0, x0 = base_requests.astype(float), base_bad.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = (x1 + x0) / (n1 + n0)
        spread = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
        z = (x1 / n1 - x0 / n0) / spread
    valid = (n1 > 0) & (n0 > 0) & (spread > 0)
    return Outcome(_first(valid & (z > Z_99)))


JudgeFn = Callable[[Watch], Outcome]
JUDGES: dict[str, JudgeFn] = {
    "compare history": lambda w: _compare(w, concurrent=False),
    "compare canary": lambda w: _compare(w, concurrent=True),
    "threshold history": lambda w: _threshold(w, False, WEB_SERVICE),
    "threshold canary": lambda w: _threshold(w, True, WEB_SERVICE),
    "threshold+inc history": lambda w: _threshold(w, False, KUBERNETES_CANARY),
    "threshold+inc canary": lambda w: _threshold(w, True, KUBERNETES_CANARY),
    "z-test history": lambda w: _z_test(w, concurrent=False),
    "z-test canary": lambda w: _z_test(w, concurrent=True),
}


def judge_group(group: Group) -> tuple[Group, dict[str, list[Outcome]]]:
    """Simulate and judge one group's releases (a worker's unit of work)."""
    rng = np.random.default_rng(group.seed)
    found: dict[str, list[Outcome]] = {name: [] for name in JUDGES}
    for _ in range(group.count):
        watch = simulate(group.release, rng)
        for name, judge in JUDGES.items():
            found[name].append(judge(watch))
    return group, found


# --- the corpus and the run -------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    healthy: int
    bad: int
    chunk: int = 50
    cells: tuple[Cell, ...] = tuple(
        Cell(ratio, rate, shape) for shape in SHAPES for ratio in RATIOS for rate in RATES
    )
    factors: tuple[float, ...] = FACTORS
    seed: int = SEED

    def releases(self) -> Iterator[tuple[Release, int]]:
        for cell in self.cells:
            yield Release(cell, Kind.HEALTHY, 1.0), self.healthy
            for kind in BAD_KINDS:
                for factor in self.factors:
                    yield Release(cell, kind, factor), self.bad

    def groups(self) -> list[Group]:
        """Every release batch with its own child seed, in a fixed order: the figures do
        not depend on which worker ran what."""
        batches: list[tuple[Release, int]] = []
        for release, count in self.releases():
            for start in range(0, count, self.chunk):
                batches.append((release, min(self.chunk, count - start)))
        seeds = np.random.SeedSequence(self.seed).generate_state(len(batches))
        return [Group(r, n, int(s)) for (r, n), s in zip(batches, seeds, strict=True)]


def run(plan: Plan, workers: int) -> Tally:
    tally = Tally()
    groups = plan.groups()
    # Long groups first (healthy ones run the whole watch), so the two workers end together.
    groups.sort(key=lambda g: -g.count * (2 if g.release.kind is Kind.HEALTHY else 1))
    if workers <= 1:
        results: Iterator[tuple[Group, dict[str, list[Outcome]]]] = map(judge_group, groups)
        for group, found in results:
            _collect(tally, group, found)
        return tally
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for group, found in pool.imap_unordered(judge_group, groups):
            _collect(tally, group, found)
    return tally


def _collect(tally: Tally, group: Group, found: dict[str, list[Outcome]]) -> None:
    for name, outcomes in found.items():
        tally.add(name, group.release, outcomes)


# --- the tables -------------------------------------------------------------------------


def wilson(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95 % Wilson score interval of a share."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def share_text(hits: int, n: int) -> str:
    low, high = wilson(hits, n)
    return f"{hits}/{n} {hits / n:.1%} [{low:.1%}, {high:.1%}]" if n else "-"


def duration_text(seconds: float) -> str:
    if seconds == NEVER:
        return ">2h"
    minutes, secs = divmod(round(seconds), 60)
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def detection_text(outcomes: Sequence[Outcome]) -> str:
    """Median time to roll back, and the share never rolled back within the watch."""
    times = sorted(o.fired for o in outcomes)
    if not times:
        return "-"
    median = float(np.median(times))  # a never (inf) in the middle makes it inf: ">2h"
    never = sum(t == NEVER for t in times) / len(times)
    return f"{duration_text(median)} ({never:.0%})"


def _healthy(tally: Tally, judge: str, keep: Callable[[Cell], bool]) -> tuple[int, int]:
    hits = n = 0
    for (name, release), outcomes in tally.outcomes.items():
        if name == judge and release.kind is Kind.HEALTHY and keep(release.cell):
            hits += sum(o.fired != NEVER for o in outcomes)
            n += len(outcomes)
    return hits, n


def headline_table(tally: Tally, plan: Plan) -> str:
    """Healthy releases rolled back, pooled over cells: all, and by traffic shape."""
    head = ["judge", "all cells"] + [s.value for s in SHAPES]
    lines = [_row(head), _row(["---"] * len(head))]
    for judge in JUDGES:
        row = [judge, share_text(*_healthy(tally, judge, lambda _c: True))]
        for shape in SHAPES:
            row.append(share_text(*_healthy(tally, judge, lambda c, s=shape: c.shape is s)))
        lines.append(_row(row))
    return "\n".join(lines)


def healthy_table(tally: Tally, plan: Plan) -> str:
    """Healthy releases rolled back, per cell and judge."""
    head = ["cell", *JUDGES]
    lines = [_row(head), _row(["---"] * len(head))]
    for cell in plan.cells:
        row = [cell.label()]
        for judge in JUDGES:
            row.append(share_text(*_healthy(tally, judge, lambda c, x=cell: c == x)))
        lines.append(_row(row))
    return "\n".join(lines)


def detection_table(tally: Tally, plan: Plan, judge: str) -> str:
    """One judge: median time to roll back each kind of bad release, per cell."""
    kinds = [(k, f) for k in BAD_KINDS for f in plan.factors]
    head = ["cell"] + [f"{k.value} {f:g}x" for k, f in kinds]
    lines = [_row(head), _row(["---"] * len(head))]
    for cell in plan.cells:
        row = [cell.label()]
        for kind, factor in kinds:
            row.append(detection_text(tally.outcomes.get((judge, Release(cell, kind, factor)), [])))
        lines.append(_row(row))
    return "\n".join(lines)


def _outcomes(tally: Tally, judge: str, keep: Callable[[Release], bool]) -> list[Outcome]:
    return [
        o
        for (name, release), found in tally.outcomes.items()
        if name == judge and keep(release)
        for o in found
    ]


def not_worse_table(tally: Tally, plan: Plan) -> str:
    """The compare test's other decision: how soon a healthy release is called "not worse"
    (it may bake early), and how many releases at least 1.5x worse were called "not worse"
    at some look before any "worse" (a check that stopped there would let them bake)."""
    judges = ("compare history", "compare canary")
    head = ["cell"]
    for judge in judges:
        head += [f"{judge}: healthy, median to 'not worse'", f"{judge}: >=1.5x, 'not worse' first"]
    lines = [_row(head), _row(["---"] * len(head))]
    for cell in (*plan.cells, None):
        row = [cell.label() if cell else "all cells"]
        for judge in judges:
            healthy = _outcomes(
                tally, judge, lambda r, c=cell: r.kind is Kind.HEALTHY and c in (None, r.cell)
            )
            bad = _outcomes(
                tally,
                judge,
                lambda r, c=cell: (
                    r.kind is not Kind.HEALTHY and r.factor >= 1.5 and c in (None, r.cell)
                ),
            )
            median = float(np.median([o.not_worse for o in healthy])) if healthy else NEVER
            early = sum(o.not_worse < o.fired for o in bad)
            row += [duration_text(median), f"{early}/{len(bad)}"]
        lines.append(_row(row))
    return "\n".join(lines)


def summary_table(tally: Tally, plan: Plan) -> str:
    """Per cell and judge: median time to roll back a 2x and a 5x release (errors and slow
    pooled: the same machinery), with the share never rolled back."""
    head = ["cell", *JUDGES]
    lines = [_row(head), _row(["---"] * len(head))]
    for cell in plan.cells:
        row = [cell.label()]
        for judge in JUDGES:
            texts = [
                detection_text(
                    _outcomes(
                        tally,
                        judge,
                        lambda r, f=f, c=cell: (
                            r.cell == c and r.kind is not Kind.HEALTHY and r.factor == f
                        ),
                    )
                )
                for f in (2.0, 5.0)
                if f in plan.factors
            ]
            row.append(" / ".join(texts))
        lines.append(_row(row))
    return "\n".join(lines)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def report(tally: Tally, plan: Plan) -> str:
    parts = [
        "### Healthy releases rolled back, pooled (95 % Wilson intervals)",
        headline_table(tally, plan),
        "### Healthy releases rolled back, per cell",
        healthy_table(tally, plan),
        "### Median time to roll back a 2x / 5x release (share never rolled back in 2 h)",
        summary_table(tally, plan),
        "### The compare test's 'not worse'",
        not_worse_table(tally, plan),
    ]
    for judge in JUDGES:
        parts += [
            f"### {judge}: median time to roll back (share never rolled back in 2 h)",
            detection_table(tally, plan, judge),
        ]
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (< 1 minute)")
    parser.add_argument("--healthy", type=int, default=300, help="healthy releases per cell")
    parser.add_argument("--bad", type=int, default=30, help="bad releases per kind and cell")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, help="also write the tables here")
    args = parser.parse_args(argv)
    global VERIFY_EVERY_LOOK
    VERIFY_EVERY_LOOK = args.quick
    plan = (
        Plan(healthy=6, bad=2, chunk=6, seed=args.seed)
        if args.quick
        else Plan(healthy=args.healthy, bad=args.bad, seed=args.seed)
    )
    started = time.monotonic()
    tally = run(plan, args.workers)
    elapsed = time.monotonic() - started
    text = report(tally, plan)
    text += (
        f"\n{plan.healthy} healthy releases per cell, {plan.bad} per bad kind and cell, "
        f"seed {plan.seed}, {args.workers} workers, {elapsed:.0f} s\n"
    )
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
