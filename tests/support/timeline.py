"""A service's history as backfilled Prometheus data: which versions served when, how well,
and whether a canary ran — so the real engine and pipeline can judge hours of it, with the
rules' default windows (1m rates, 15s intervals, 10m bake time, 2m verification), in a
second of simulated time per evaluation.

Each :class:`Segment` is one deploy of one version: its pods (an ``instance`` label of
their own, so a version deployed again is a new series whose counters start at 0) serve
``rps`` requests per second with ``error_ratio`` failing, fast or slow, from ``start`` to
``end``. ``app_build_info`` is 1 while a segment serves and 0 from its end to the end of
the timeline: backfilled data has no staleness markers, so a stopped series would linger
for Prometheus' 5-minute lookback; the scenarios' ``version_query`` keeps only values above
0, as a user whose exporter keeps old builds at 0 writes it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import BUCKETS, FAST_LATENCY, FAST_LATENCY_MEAN, SLOW_LATENCY, SLOW_LATENCY_MEAN
from .prometheus import create_blocks

STEP = 15
"""Seconds between samples, as a default scrape interval."""
SERVICE = "shop"
VERSION_QUERY = f'max by (version) (app_build_info{{service="{SERVICE}"}}) > 0'
CANARY_QUERY = f'max(canary_weight{{service="{SERVICE}"}}) > 0'


def origin() -> int:
    """Where timelines start: three hours before now, on a minute, so every sample is in
    the past for the server and the whole story fits."""
    return (int(time.time()) // 60) * 60 - 3 * 3600


@dataclass(frozen=True)
class Segment:
    version: str
    start: int
    end: int
    rps: float = 10.0
    error_ratio: float = 0.01
    slow: bool = False


@dataclass
class Timeline:
    segments: Sequence[Segment]
    canary: Sequence[tuple[int, int]] = ()
    """(start, end) of each period in which ``canary_weight`` is 20."""
    end: int = field(default=0)

    def __post_init__(self) -> None:
        self.end = max([self.end, *(s.end for s in self.segments)])

    def lines(self) -> Iterator[str]:
        counter = itertools.count(1)
        pods = [f"{s.version}-{next(counter)}" for s in self.segments]
        start = min(s.start for s in self.segments)
        yield "# TYPE http_requests counter\n"
        for seg, pod in zip(self.segments, pods, strict=True):
            labels = f'service="{SERVICE}",version="{seg.version}",instance="{pod}"'
            errors = seg.rps * seg.error_ratio
            for code, rate in (("200", seg.rps - errors), ("500", errors)):
                yield from _counter(f'http_requests_total{{{labels},code="{code}"}}', seg, rate)
        yield "# TYPE http_request_duration_seconds histogram\n"
        for seg, pod in zip(self.segments, pods, strict=True):
            labels = f'service="{SERVICE}",version="{seg.version}",instance="{pod}"'
            shares = SLOW_LATENCY if seg.slow else FAST_LATENCY
            mean = SLOW_LATENCY_MEAN if seg.slow else FAST_LATENCY_MEAN
            for bound, share in zip(BUCKETS, shares, strict=True):
                le = "+Inf" if bound == float("inf") else repr(bound)
                name = f'http_request_duration_seconds_bucket{{{labels},le="{le}"}}'
                yield from _counter(name, seg, seg.rps * share)
            yield from _counter(f"http_request_duration_seconds_count{{{labels}}}", seg, seg.rps)
            yield from _counter(
                f"http_request_duration_seconds_sum{{{labels}}}", seg, seg.rps * mean
            )
        yield "# TYPE app_build_info gauge\n"
        for seg, pod in zip(self.segments, pods, strict=True):
            name = f'app_build_info{{service="{SERVICE}",version="{seg.version}",instance="{pod}"}}'
            for t in range(seg.start, self.end + 1, STEP):
                yield f"{name} {1 if t <= seg.end else 0} {t}\n"
        yield "# TYPE canary_weight gauge\n"
        for t in range(start, self.end + 1, STEP):
            weight = 20 if any(a <= t <= b for a, b in self.canary) else 0
            yield f'canary_weight{{service="{SERVICE}"}} {weight} {t}\n'
        yield "# EOF\n"

    def backfill(self, storage_dir: Path) -> None:
        storage_dir.mkdir(parents=True, exist_ok=True)
        source = storage_dir.parent / "timeline.openmetrics"
        with source.open("w") as out:
            out.writelines(self.lines())
        create_blocks(source, storage_dir)


def _counter(name: str, seg: Segment, rate: float) -> Iterator[str]:
    for t in range(seg.start, seg.end + 1, STEP):
        yield f"{name} {rate * (t - seg.start):.12g} {t}\n"
