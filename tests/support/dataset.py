"""A synthetic, fully known dataset covering every metric of the example rules in rules/*.toml,
written as OpenMetrics and backfilled into a Prometheus TSDB with ``promtool``.

Time: one sample every :data:`STEP` seconds from :data:`START` to :data:`END` (both included),
seven hours ending ten minutes before the moment this module was imported (rounded down to
the minute), so the 6h burn-rate window has data. Query at :data:`EVAL_TIME`.

Every counter grows linearly (value = rate x seconds since its series began), so every
``rate()`` over a window inside a track's lifetime is exact and the PromQL of the checks has
known answers:

checkout (``version_label``): 1.0.0 serves until :data:`CHECKOUT_DEPLOY_TIME` with 1% errors
and fast latency (p99 ~0.47s); 2.0.0 serves after it with 30% errors and slow latency
(p99 3.75s). The blackbox probe of checkout fails from the deploy on.

payments (Argo canary): the stable 1.4.0 serves the whole range; the canary 1.5.0 serves from
:data:`PAYMENTS_CANARY_START` on, while ``rollout_info{phase="Progressing"}`` is 1 (before
it, ``phase="Healthy"``). One of three pods is down throughout.

search (burn rate): one version, 0.5% errors throughout: a burn rate of 5 over every window.

inventory: one version, 2% errors, two instances up. billing: one version, 0.2% errors,
queue depths 300 and 120 (sum 420).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .prometheus import create_blocks

STEP = 15
"""Seconds between samples."""
DURATION = 7 * 3600
END: int = (int(time.time()) // 60) * 60 - 600
"""The last sample's timestamp (unix seconds): ten minutes before import, on a minute."""
START: int = END - DURATION
EVAL_TIME: int = END - 120
"""Query here: inside the range, every window up to 6h full of data."""

BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, math.inf)
"""The ``le`` bounds of ``http_request_duration_seconds`` (as the fake service exposes)."""

FAST_LATENCY: tuple[float, ...] = (0.60, 0.85, 0.95, 0.995, 1.0, 1.0, 1.0, 1.0)
"""Cumulative share of requests at or below each of :data:`BUCKETS`: p99 in (0.25, 0.5]."""
FAST_LATENCY_MEAN = 0.08
SLOW_LATENCY: tuple[float, ...] = (0.20, 0.40, 0.60, 0.80, 0.90, 0.98, 1.0, 1.0)
"""p99 in (2.5, 5]: 3.75."""
SLOW_LATENCY_MEAN = 0.9


def expected_quantile(q: float, cumulative: Sequence[float]) -> float:
    """What ``histogram_quantile(q, ...)`` answers for a histogram whose buckets grow in
    proportion to ``cumulative`` (Prometheus' linear interpolation within a bucket)."""
    total = cumulative[-1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(BUCKETS, cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    raise AssertionError("unreachable: the +Inf bucket holds every request")


@dataclass(frozen=True)
class Track:
    """One version of one service, serving from ``start`` to ``end`` (both included)."""

    service: str
    namespace: str
    job: str
    version: str
    start: int
    end: int
    rps: float
    error_ratio: float
    latency: tuple[float, ...]
    latency_mean: float

    @property
    def labels(self) -> dict[str, str]:
        return {
            "service": self.service,
            "namespace": self.namespace,
            "job": self.job,
            "version": self.version,
        }

    @property
    def p99(self) -> float:
        return expected_quantile(0.99, self.latency)


# --- checkout: a bad release at CHECKOUT_DEPLOY_TIME ----------------------------------------
CHECKOUT_V1 = "1.0.0"
CHECKOUT_V2 = "2.0.0"
CHECKOUT_DEPLOY_TIME: int = END - 30 * 60
"""2.0.0's first sample; 1.0.0's last is one STEP before."""
CHECKOUT_V1_EVAL_TIME: int = CHECKOUT_DEPLOY_TIME - 120
"""Query here to see 1.0.0 serving (and 2.0.0 not yet)."""
CHECKOUT_RPS = 10.0
CHECKOUT_V1_ERROR_RATIO = 0.01
CHECKOUT_V2_ERROR_RATIO = 0.30
CHECKOUT_PROBE_INSTANCE = "https://checkout.example.com/health"
SEARCH_PROBE_INSTANCE = "https://search.example.com/health"

# --- payments: a canary in progress ---------------------------------------------------------
PAYMENTS_STABLE = "1.4.0"
PAYMENTS_CANARY = "1.5.0"
PAYMENTS_CANARY_START: int = END - 20 * 60
PAYMENTS_STABLE_RPS = 18.0
PAYMENTS_CANARY_RPS = 2.0
PAYMENTS_STABLE_ERROR_RATIO = 0.005
PAYMENTS_CANARY_ERROR_RATIO = 0.04
PAYMENTS_PODS = ("payments-0", "payments-1", "payments-2")
PAYMENTS_PODS_DOWN = 1
"""payments-2 is down (``up == 0``) throughout."""

# --- orders: a release judged by compare checks against the hour before it -----------------
ORDERS_V1 = "4.1.0"
ORDERS_V2 = "4.2.0"
ORDERS_DEPLOY_TIME: int = END - 40 * 60
ORDERS_RPS = 20.0
ORDERS_V1_ERROR_RATIO = 0.01
ORDERS_V2_ERROR_RATIO = 0.03
"""Three times the errors; its latency is unchanged."""

# --- search, inventory, billing: one version each -------------------------------------------
SEARCH_VERSION = "2.3.0"
SEARCH_RPS = 20.0
SEARCH_ERROR_RATIO = 0.005
SEARCH_OBJECTIVE = 0.999
SEARCH_BURN_RATE = SEARCH_ERROR_RATIO / (1 - SEARCH_OBJECTIVE)
"""5 (x the error budget), over every window."""
INVENTORY_VERSION = "0.9.0"
INVENTORY_RPS = 4.0
INVENTORY_ERROR_RATIO = 0.02
INVENTORY_INSTANCES = ("inventory-1:9100", "inventory-2:9100")
BILLING_VERSION = "3.2.1"
BILLING_RPS = 5.0
BILLING_ERROR_RATIO = 0.002
BILLING_QUEUES: dict[str, float] = {"invoices": 300.0, "emails": 120.0}
BILLING_QUEUE_DEPTH = sum(BILLING_QUEUES.values())
"""420: what ``sum(billing_queue_depth{service="billing"})`` answers."""


def _track(
    service: str,
    version: str,
    rps: float,
    error_ratio: float,
    *,
    start: int = START,
    end: int = END,
    slow: bool = False,
) -> Track:
    return Track(
        service=service,
        namespace=service,
        job=service,
        version=version,
        start=start,
        end=end,
        rps=rps,
        error_ratio=error_ratio,
        latency=SLOW_LATENCY if slow else FAST_LATENCY,
        latency_mean=SLOW_LATENCY_MEAN if slow else FAST_LATENCY_MEAN,
    )


TRACKS: tuple[Track, ...] = (
    _track(
        "checkout",
        CHECKOUT_V1,
        CHECKOUT_RPS,
        CHECKOUT_V1_ERROR_RATIO,
        end=CHECKOUT_DEPLOY_TIME - STEP,
    ),
    _track(
        "checkout",
        CHECKOUT_V2,
        CHECKOUT_RPS,
        CHECKOUT_V2_ERROR_RATIO,
        start=CHECKOUT_DEPLOY_TIME,
        slow=True,
    ),
    _track("payments", PAYMENTS_STABLE, PAYMENTS_STABLE_RPS, PAYMENTS_STABLE_ERROR_RATIO),
    _track(
        "payments",
        PAYMENTS_CANARY,
        PAYMENTS_CANARY_RPS,
        PAYMENTS_CANARY_ERROR_RATIO,
        start=PAYMENTS_CANARY_START,
        slow=True,
    ),
    _track("orders", ORDERS_V1, ORDERS_RPS, ORDERS_V1_ERROR_RATIO, end=ORDERS_DEPLOY_TIME - STEP),
    _track("orders", ORDERS_V2, ORDERS_RPS, ORDERS_V2_ERROR_RATIO, start=ORDERS_DEPLOY_TIME),
    _track("search", SEARCH_VERSION, SEARCH_RPS, SEARCH_ERROR_RATIO),
    _track("inventory", INVENTORY_VERSION, INVENTORY_RPS, INVENTORY_ERROR_RATIO),
    _track("billing", BILLING_VERSION, BILLING_RPS, BILLING_ERROR_RATIO),
)


def track(service: str, version: str) -> Track:
    for candidate in TRACKS:
        if candidate.service == service and candidate.version == version:
            return candidate
    raise KeyError((service, version))


# --- OpenMetrics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Series:
    name: str
    labels: dict[str, str]
    start: int = START
    end: int = END
    rate: float = 0.0
    """Per second: the value at t is ``rate * (t - start)`` ..."""
    value: float | None = None
    """... unless this constant is set ..."""
    then: tuple[int, float] | None = None
    """... which changes to ``then[1]`` from ``then[0]`` on."""

    def lines(self) -> Iterator[str]:
        inside = ",".join(f'{k}="{_escape(v)}"' for k, v in self.labels.items())
        prefix = f"{self.name}{{{inside}}}"
        if self.value is not None:
            value = _number(self.value)
            change, after = self.then if self.then else (self.end + 1, self.value)
            for t in range(self.start, change, STEP):
                yield f"{prefix} {value} {t}\n"
            value = _number(after)
            for t in range(change, self.end + 1, STEP):
                yield f"{prefix} {value} {t}\n"
        else:
            rate, start = self.rate, self.start
            for t in range(start, self.end + 1, STEP):
                yield f"{prefix} {rate * (t - start):.12g} {t}\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _families() -> list[tuple[str, str, list[_Series]]]:
    """(family name, OpenMetrics type, series) for every metric of the dataset."""
    requests: list[_Series] = []
    durations: list[_Series] = []
    build_info: list[_Series] = []
    for t in TRACKS:
        piece = functools.partial(_Series, start=t.start, end=t.end)
        errors = t.rps * t.error_ratio
        requests.append(
            piece("http_requests_total", {**t.labels, "code": "200"}, rate=t.rps - errors)
        )
        requests.append(piece("http_requests_total", {**t.labels, "code": "500"}, rate=errors))
        for bound, share in zip(BUCKETS, t.latency, strict=True):
            labels = {**t.labels, "le": _number(bound)}
            durations.append(
                piece("http_request_duration_seconds_bucket", labels, rate=t.rps * share)
            )
        durations.append(piece("http_request_duration_seconds_count", t.labels, rate=t.rps))
        durations.append(
            piece("http_request_duration_seconds_sum", t.labels, rate=t.rps * t.latency_mean)
        )
        build = {"service": t.service, "version": t.version, "namespace": t.namespace}
        build_info.append(piece("app_build_info", build, value=1.0))

    probes = [
        _Series(
            "probe_success",
            {"job": "blackbox", "instance": CHECKOUT_PROBE_INSTANCE},
            value=1.0,
            then=(CHECKOUT_DEPLOY_TIME, 0.0),
        ),
        _Series(
            "probe_success",
            {"job": "blackbox", "instance": SEARCH_PROBE_INSTANCE},
            value=1.0,
        ),
    ]

    up = [
        _Series(
            "up",
            {"namespace": "payments", "job": "payments", "instance": pod},
            value=0.0 if index >= len(PAYMENTS_PODS) - PAYMENTS_PODS_DOWN else 1.0,
        )
        for index, pod in enumerate(PAYMENTS_PODS)
    ]
    up += [
        _Series("up", {"namespace": "inventory", "job": "inventory", "instance": i}, value=1.0)
        for i in INVENTORY_INSTANCES
    ]
    up += [
        _Series("up", {"namespace": s, "job": s, "instance": f"{s}-0:8080"}, value=1.0)
        for s in ("checkout", "search", "billing")
    ]

    rollout = [
        _Series(
            "rollout_info",
            {"namespace": "payments", "name": "payments", "phase": "Healthy"},
            start=START,
            end=PAYMENTS_CANARY_START - STEP,
            value=1.0,
        ),
        _Series(
            "rollout_info",
            {"namespace": "payments", "name": "payments", "phase": "Progressing"},
            start=PAYMENTS_CANARY_START,
            end=END,
            value=1.0,
        ),
    ]
    queues = [
        _Series(
            "billing_queue_depth",
            {"service": "billing", "namespace": "billing", "job": "billing", "queue": queue},
            value=depth,
        )
        for queue, depth in BILLING_QUEUES.items()
    ]
    return [
        ("http_requests", "counter", requests),
        ("http_request_duration_seconds", "histogram", durations),
        ("app_build_info", "gauge", build_info),
        ("probe_success", "gauge", probes),
        ("up", "gauge", up),
        ("rollout_info", "gauge", rollout),
        ("billing_queue_depth", "gauge", queues),
    ]


def openmetrics_lines() -> Iterator[str]:
    for family, kind, series in _families():
        yield f"# TYPE {family} {kind}\n"
        for one in series:
            yield from one.lines()
    yield "# EOF\n"


def write_openmetrics(path: Path) -> Path:
    """Write the dataset to ``path`` as OpenMetrics text; return the path."""
    with path.open("w") as out:
        out.writelines(openmetrics_lines())
    return path


def backfill(storage_dir: Path) -> None:
    """Write the dataset next to ``storage_dir`` and turn it into blocks inside it."""
    storage_dir.mkdir(parents=True, exist_ok=True)
    source = storage_dir.parent / "dataset.openmetrics"
    write_openmetrics(source)
    try:
        create_blocks(source, storage_dir)
    finally:
        source.unlink(missing_ok=True)
