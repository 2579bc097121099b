"""Check scale: N services x 3 checks at a 15 s interval against a real Prometheus.

What it does, for each N given with ``--services``:

1. starts a synthetic exporter (one HTTP endpoint, in this process) exposing, for N services,
   ``http_requests_total{service,version,code}``, the histogram
   ``http_request_duration_seconds{service,version}`` (8 buckets), ``app_build_info`` and
   ``probe_success``: 14 series per service;
2. starts a real Prometheus (``tests/support/prometheus.py``) scraping it every
   ``--scrape-interval`` seconds, and waits until every service has a rate;
3. writes a config and one rule file per service: ``error_rate``, ``latency`` and ``probe``
   checks at ``--interval`` (15 s), a ``version_query`` per service, ``mode = "dry-run"``;
4. runs the real ``rollbackd run`` as a subprocess, waits ``--warmup`` seconds (every job has
   run at least once by then: first runs are jittered over one interval), then measures for
   ``--duration`` seconds;
5. reads the daemon's own counters from its ``/metrics`` (evaluations, overruns, missed,
   Prometheus queries, evaluation durations, start delays when it has them), its CPU time
   (``/proc/PID/stat``) and peak RSS (``VmHWM`` of ``/proc/PID/status``), Prometheus' own
   ``prometheus_http_requests_total{handler="/api/v1/query"}`` and CPU, and the event-loop
   lag as seen from outside (the latency of ``GET /healthz`` once a second);
6. prints a table and one JSON line per N (``--json-out`` appends them to a file too).

A benchmark, not a test: nothing asserts a time. The machine may be shared and noisy:
compare figures taken in one run (``--services 100 500 2000``), not across days.

Needs: the project's virtualenv (``pip install -e '.[dev]'``) and Debian's ``prometheus``
(``apt-get install prometheus``). For ``--profile``: ``pip install py-spy`` into the same
virtualenv (it attaches to the daemon by pid, so it needs ptrace rights: root, or
``kernel.yama.ptrace_scope = 0``).

Run from the repository root::

    .venv/bin/python bench/check_scale.py --services 100 500 2000
    .venv/bin/python bench/check_scale.py --services 2000 --duration 90 --profile bench/out
    .venv/bin/python bench/check_scale.py --services 2000 --no-batching   # one query per check
    .venv/bin/python bench/check_scale.py --services 2000 --store postgres --daemons 3

``--store postgres`` starts a real PostgreSQL (``tests/support/postgres.py``, a fresh
database per N) and runs ``--daemons`` daemons (default 3) on it, each a member of its own
name with ``--lease-time``: they split the services through leases. Figures are then given
per daemon and in total, with the services evaluated by more than one daemon (or by none)
in the measured window, from each daemon's ``rollbackd_check_evaluations_total{service}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.postgres import Database, PostgresServer  # noqa: E402
from support.prometheus import (  # noqa: E402
    PrometheusServer,
    ScrapeTarget,
    free_port,
)

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, math.inf)
LATENCY_SHARE = (0.60, 0.85, 0.95, 0.995, 1.0, 1.0, 1.0, 1.0)
"""Cumulative share of requests per bucket: p99 in (0.25, 0.5], well below the threshold."""
TOKEN_ENV = "ROLLBACKD_BENCH_TOKEN"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the synthetic exporter -----------------------------------------------------------------


class Exporter:
    """One endpoint exposing every service's series. Counters grow linearly with time
    (``rate x seconds since start``), so every rate is known; all services are healthy
    unless ``bad`` says otherwise (error ratio 30%)."""

    def __init__(self, services: list[str], bad: frozenset[str] = frozenset()) -> None:
        self.services = services
        self.started = time.time()
        self.scrapes = 0
        self._rows: list[tuple[str, float, float, float]] = []
        for index, name in enumerate(services):
            rps = 5.0 + (index % 20)
            errors = 0.3 if name in bad else 0.01
            self._rows.append((name, rps, rps * errors, rps * 0.08))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def render(self) -> bytes:
        elapsed = time.time() - self.started
        out: list[str] = [
            "# TYPE http_requests_total counter\n",
        ]
        for name, rps, err, _ in self._rows:
            base = f'service="{name}",version="1.0.0"'
            out.append(f'http_requests_total{{{base},code="200"}} {(rps - err) * elapsed:.3f}\n')
            out.append(f'http_requests_total{{{base},code="500"}} {err * elapsed:.3f}\n')
        out.append("# TYPE http_request_duration_seconds histogram\n")
        les = ["+Inf" if math.isinf(b) else repr(b) for b in BUCKETS]
        for name, rps, _, mean in self._rows:
            base = f'service="{name}",version="1.0.0"'
            count = rps * elapsed
            for le, share in zip(les, LATENCY_SHARE, strict=True):
                out.append(
                    f'http_request_duration_seconds_bucket{{{base},le="{le}"}} '
                    f"{count * share:.3f}\n"
                )
            out.append(f"http_request_duration_seconds_count{{{base}}} {count:.3f}\n")
            out.append(f"http_request_duration_seconds_sum{{{base}}} {mean * elapsed:.3f}\n")
        out.append("# TYPE app_build_info gauge\n")
        out.extend(
            f'app_build_info{{service="{name}",version="1.0.0"}} 1\n' for name, *_ in self._rows
        )
        out.append("# TYPE probe_success gauge\n")
        out.extend(
            f'probe_success{{service="{name}",instance="https://{name}.example/health"}} 1\n'
            for name, *_ in self._rows
        )
        return "".join(out).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.render()
                exporter.scrapes += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


# --- config and rules -----------------------------------------------------------------------

RULE = """[service]
name = "{name}"
version_query = 'max by (version) (app_build_info{{service="{name}"}})'
version_label = "version"

[[rollback]]
type = "command"
argv = ["/bin/true", "{{to_version}}"]

[[check]]
name = "error-rate"
type = "error_rate"
selector = 'service="{name}"'
errors = 'code=~"5.."'
above = 0.05
window = "1m"
interval = "{interval}s"

[[check]]
name = "p99"
type = "latency"
metric = "http_request_duration_seconds"
selector = 'service="{name}"'
quantile = 0.99
above = "1s"
window = "1m"
interval = "{interval}s"

[[check]]
name = "probe"
type = "probe"
selector = 'service="{name}"'
interval = "{interval}s"
"""


def store_section(database: Database | None, member: str, lease_time: float) -> str:
    """``[store]`` for a daemon on PostgreSQL; nothing (SQLite) without a database."""
    if database is None:
        return ""
    return (
        f'\n[store]\nurl = "{database.url}"\npassword_file = "{database.password_file}"\n'
        f'lease_time = "{lease_time:g}s"\nmember = "{member}"\n'
    )


def write_config(
    directory: Path,
    services: list[str],
    prometheus_url: str,
    port: int,
    interval: float,
    store: str = "",
) -> Path:
    rules = directory / "rules"
    rules.mkdir(parents=True)
    for name in services:
        (rules / f"{name}.toml").write_text(RULE.format(name=name, interval=f"{interval:g}"))
    config = directory / "config.toml"
    config.write_text(
        f"""[daemon]
mode = "dry-run"
state_dir = "state"
rule_files = ["rules/*.toml"]
log_format = "json"
log_level = "info"

[prometheus]
url = "{prometheus_url}"
timeout = "10s"

[server]
listen = "127.0.0.1:{port}"
token_env = "{TOKEN_ENV}"
{store}"""
    )
    return config


# --- reading counters -----------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def metric_sums(text: str, names: set[str], label_filter: str | None = None) -> dict[str, float]:
    """Sum of every sample of each metric in ``names`` (``label_filter``: a substring the
    labels must hold)."""
    sums = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        match = _SAMPLE.match(line)
        if match is None or match.group(1) not in names:
            continue
        if label_filter is not None and label_filter not in (match.group(2) or ""):
            continue
        with contextlib.suppress(ValueError):
            sums[match.group(1)] += float(match.group(3))
    return sums


def histogram_buckets(text: str, name: str) -> dict[float, float]:
    """``le -> cumulative count`` summed over every series of the histogram ``name``."""
    buckets: dict[float, float] = {}
    pattern = re.compile(rf'^{name}_bucket\{{.*le="([^"]+)".*\}}\s+(\S+)')
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            le = float(match.group(1))
            buckets[le] = buckets.get(le, 0.0) + float(match.group(2))
    return buckets


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """An upper bound of the q-quantile: the first bucket bound holding q of the count."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    for bound in bounds:
        if buckets[bound] >= q * total:
            return bound
    return bounds[-1]


DAEMON_COUNTERS = {
    "rollbackd_check_evaluations_total",
    "rollbackd_check_overruns_total",
    "rollbackd_check_missed_total",
    "rollbackd_prometheus_queries_total",
    "rollbackd_check_evaluation_duration_seconds_sum",
    "rollbackd_check_evaluation_duration_seconds_count",
    "rollbackd_job_start_delay_seconds_sum",
    "rollbackd_job_start_delay_seconds_count",
    "rollbackd_lease_takeovers_total",
}


@dataclass
class Snapshot:
    at: float
    daemon: dict[str, float]
    daemon_delay_buckets: dict[float, float]
    daemon_duration_buckets: dict[float, float]
    daemon_cpu: float
    prometheus_queries: float
    prometheus_cpu: float
    metrics_bytes: int
    metrics_seconds: float
    by_service: dict[str, float] = field(default_factory=dict)
    """Evaluations per service (``rollbackd_check_evaluations_total``, every check)."""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")": state is field 3, utime 14 and stime 15 (1-based in proc(5)).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


_EVALUATIONS = re.compile(
    r'^rollbackd_check_evaluations_total\{[^}]*service="([^"]+)"[^}]*\}\s+(\S+)', re.M
)


def evaluations_by_service(text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for match in _EVALUATIONS.finditer(text):
        counts[match.group(1)] = counts.get(match.group(1), 0.0) + float(match.group(2))
    return counts


def snapshot(
    http: httpx.Client, daemon_url: str, daemon_pid: int, prom: PrometheusServer
) -> Snapshot:
    started = time.monotonic()
    text = http.get(f"{daemon_url}/metrics", timeout=60).text
    took = time.monotonic() - started
    prom_text = http.get(f"{prom.url}/metrics", timeout=30).text
    prom_queries = metric_sums(
        prom_text, {"prometheus_http_requests_total"}, 'handler="/api/v1/query"'
    )["prometheus_http_requests_total"]
    prom_pid = prom._process.pid if prom._process else 0
    return Snapshot(
        at=time.monotonic(),
        daemon=metric_sums(text, DAEMON_COUNTERS),
        daemon_delay_buckets=histogram_buckets(text, "rollbackd_job_start_delay_seconds"),
        daemon_duration_buckets=histogram_buckets(
            text, "rollbackd_check_evaluation_duration_seconds"
        ),
        daemon_cpu=cpu_seconds(daemon_pid),
        prometheus_queries=prom_queries,
        prometheus_cpu=cpu_seconds(prom_pid) if prom_pid else 0.0,
        metrics_bytes=len(text),
        metrics_seconds=took,
        by_service=evaluations_by_service(text),
    )


# --- one run --------------------------------------------------------------------------------


@dataclass
class DaemonFigures:
    """One daemon's share of a run (with several daemons on PostgreSQL)."""

    member: str
    leases_held: float
    services_evaluated: int
    evaluations_per_s: float
    overruns: float
    missed: float
    queries_per_interval: float
    cpu_percent: float
    rss_peak_mib: float
    eval_duration_mean_ms: float | None
    loop_lag_p50_ms: float
    loop_lag_max_ms: float
    log_lines_per_s: float
    takeovers: float
    """Leases taken with a new epoch (``rollbackd_lease_takeovers_total``) in the window."""


@dataclass
class Result:
    services: int
    checks: int
    interval: float
    duration: float
    batching: str
    evaluations_per_s: float
    expected_per_s: float
    evaluations_ratio: float
    overruns: float
    missed: float
    daemon_queries_per_interval: float
    prometheus_queries_per_interval: float
    daemon_cpu_percent: float
    prometheus_cpu_percent: float
    daemon_rss_peak_mib: float
    daemon_rss_end_mib: float
    daemon_threads: int
    eval_duration_mean_ms: float | None
    eval_duration_p99_le_s: float | None
    start_delay_mean_ms: float | None
    start_delay_p99_le_s: float | None
    loop_lag_p50_ms: float
    loop_lag_max_ms: float
    metrics_scrape_s: float
    metrics_mib: float
    log_lines_per_s: float
    query_outcomes: dict[str, float] = field(default_factory=dict)
    profile: str | None = None
    store: str = "sqlite"
    daemons: int = 1
    """With several: counters, queries and CPU are sums over the daemons; RSS, mean times
    and lags are the largest daemon's."""
    lease_time: float | None = None
    services_judged_twice: int = 0
    """Services evaluated by more than one daemon in the measured window."""
    services_judged_by_none: int = 0
    split_converged: bool | None = None
    """With several daemons: whether the leases were split fairly before the warm-up."""
    per_daemon: list[DaemonFigures] = field(default_factory=list)


@dataclass
class Running:
    """A ``rollbackd run`` under test."""

    member: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path


def wait_for_data(prom: PrometheusServer, services: int, timeout: float) -> None:
    prom.wait_for(
        "count(rate(http_requests_total[1m]) > 0)",
        lambda result: bool(result) and float(result[0]["value"][1]) >= 2 * services,
        timeout=timeout,
        interval=1.0,
    )


def daemon_command(batching: bool | None) -> list[str]:
    if batching is None:
        return [sys.executable, "-m", "rollbackd", "run"]
    # The engine's default, switched for this process only: before/after in one run.
    code = (
        "import sys, rollbackd.runtime.engine as e; "
        f"e.QUERY_BATCHING = {batching!r}; "
        "from rollbackd.cli.main import main; sys.exit(main())"
    )
    return [sys.executable, "-c", code, "run"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_daemons(
    args: argparse.Namespace,
    names: list[str],
    workdir: Path,
    prom: PrometheusServer,
    database: Database | None,
    http: httpx.Client,
    started: list[Running],
) -> None:
    """Start ``args.daemons`` daemons (all at once, as a fleet starts), appending each to
    ``started`` (for the caller to stop whatever happens), and wait for their /metrics."""
    env = {**os.environ, TOKEN_ENV: "bench-token-" + "x" * 24}
    batching = {"on": True, "off": False, "default": None}[args.batching]
    count = args.daemons if database is not None else 1
    for k in range(count):
        member = f"bench-{k}" if database is not None else "solo"
        directory = workdir / ("daemon" if count == 1 else f"daemon-{k}")
        port = free_port()
        store = store_section(database, member, args.lease_time)
        config = write_config(directory, names, prom.url, port, args.interval, store)
        log_path = directory / "daemon.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*daemon_command(batching), "-c", str(config)],
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(Running(member, process, f"http://127.0.0.1:{port}", log_path))
    deadline = time.monotonic() + 180
    for daemon in started:
        while True:
            if daemon.process.poll() is not None:
                raise RuntimeError(
                    f"rollbackd {daemon.member} exited with {daemon.process.returncode}:\n"
                    + daemon.log_path.read_text(errors="replace")[-3000:]
                )
            with contextlib.suppress(httpx.TransportError):
                if http.get(f"{daemon.url}/metrics", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"rollbackd {daemon.member} did not serve /metrics in 180 s")
            time.sleep(0.5)


def await_split(
    http: httpx.Client, daemons: list[Running], services: int, timeout: float
) -> tuple[list[float], bool]:
    """With several daemons: wait until their leases cover every service, each daemon
    holding its fair share (give or take one); the leases each holds, and whether they
    got there within ``timeout`` (if not, the run measures what it finds)."""
    fair = services / len(daemons)
    deadline = time.monotonic() + timeout
    while True:
        held = [
            metric_sums(http.get(f"{d.url}/metrics", timeout=60).text, {"rollbackd_leases_held"})[
                "rollbackd_leases_held"
            ]
            for d in daemons
        ]
        if sum(held) == services and all(abs(h - fair) <= 1 for h in held):
            return held, True
        if time.monotonic() > deadline:
            return held, False
        time.sleep(1.0)


def start_profiler(args: argparse.Namespace, n: int, pid: int) -> tuple[Any, str | None]:
    if not args.profile:
        return None, None
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.store == "sqlite" else f"-{args.store}"
    profile_path = str(out / f"check_scale-{n}-{args.batching}{suffix}.txt")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    options = ["--rate", "50", "--format", "raw", "--output", profile_path, "--nonblocking"]
    profiler = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--duration", str(int(args.duration)), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return profiler, profile_path


def measure_lag(http: httpx.Client, daemons: list[Running], seconds: float) -> list[list[float]]:
    """``GET /healthz`` of every daemon once a second for ``seconds``: each one's latencies."""
    lags: list[list[float]] = [[] for _ in daemons]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        round_started = time.monotonic()
        for k, daemon in enumerate(daemons):
            started = time.monotonic()
            try:
                http.get(f"{daemon.url}/healthz", timeout=30)
                lags[k].append(time.monotonic() - started)
            except httpx.TransportError:
                lags[k].append(30.0)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - round_started)))
    return lags


def run_one(args: argparse.Namespace, n: int, workdir: Path, pg: PostgresServer | None) -> Result:
    names = [f"svc-{i:05d}" for i in range(n)]
    exporter = Exporter(names)
    exporter.start()
    prom = PrometheusServer(
        workdir / "prometheus",
        targets=[ScrapeTarget(exporter.address, job="bench")],
        scrape_interval=f"{args.scrape_interval:g}s",
        evaluation_interval="60s",
    )
    daemons: list[Running] = []
    profiler: subprocess.Popen[bytes] | None = None
    http = httpx.Client()
    try:
        prom.start()
        prom.wait_ready(60)
        wait_for_data(prom, n, timeout=120)
        database = pg.create_database(f"bench_{n}") if pg is not None else None
        start_daemons(args, names, workdir, prom, database, http, daemons)
        pids = ", ".join(str(d.process.pid) for d in daemons)
        print(f"  N={n}: {len(daemons)} daemon(s) up (pid {pids})", flush=True)
        split_converged = None
        if database is not None:
            held, split_converged = await_split(http, daemons, n, args.split_timeout)
            state = "split" if split_converged else f"NOT split fairly in {args.split_timeout:g}s"
            print(f"  N={n}: leases {state}: {held}", flush=True)
        print(f"  N={n}: warm-up {args.warmup:g}s", flush=True)
        time.sleep(args.warmup)
        lines_before = [_count_lines(d.log_path) for d in daemons]
        before = [snapshot(http, d.url, d.process.pid, prom) for d in daemons]
        profiler, profile_path = start_profiler(args, n, daemons[0].process.pid)
        print(f"  N={n}: measuring {args.duration:g}s", flush=True)
        lags = measure_lag(http, daemons, args.duration)
        after = [snapshot(http, d.url, d.process.pid, prom) for d in daemons]
        lines_after = [_count_lines(d.log_path) for d in daemons]
        if profiler is not None:
            profiler.wait(timeout=120)
        held_end = [
            metric_sums(http.get(f"{d.url}/metrics", timeout=60).text, {"rollbackd_leases_held"})[
                "rollbackd_leases_held"
            ]
            for d in daemons
        ]
        outcomes = _query_outcomes(http.get(f"{daemons[0].url}/metrics", timeout=60).text)
        result = summarise(
            args,
            n,
            daemons,
            before,
            after,
            lags,
            [b - a for a, b in zip(lines_before, lines_after, strict=True)],
            held_end,
            outcomes,
            profile_path,
            database is not None,
        )
        result.split_converged = split_converged
        return result
    finally:
        if profiler is not None and profiler.poll() is None:
            profiler.terminate()
        for daemon in daemons:
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGTERM)
        for daemon in daemons:
            try:
                daemon.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait()
        http.close()
        prom.close()
        exporter.stop()


def summarise(
    args: argparse.Namespace,
    n: int,
    daemons: list[Running],
    before: list[Snapshot],
    after: list[Snapshot],
    lags: list[list[float]],
    log_lines: list[int],
    held: list[float],
    outcomes: dict[str, float],
    profile_path: str | None,
    postgres: bool,
) -> Result:
    """Per-daemon figures and the totals; Prometheus' figures from the first and last
    snapshot, which bracket every daemon's."""
    elapsed = after[-1].at - before[0].at
    intervals = elapsed / args.interval
    per: list[DaemonFigures] = []
    judged: dict[str, int] = {}
    totals = dict.fromkeys(DAEMON_COUNTERS, 0.0)
    cpu_total = 0.0
    rss_peaks: list[float] = []
    for k, daemon in enumerate(daemons):
        own = after[k].at - before[k].at
        d = {key: after[k].daemon[key] - before[k].daemon[key] for key in DAEMON_COUNTERS}
        for key in DAEMON_COUNTERS:
            totals[key] += d[key]
        evaluated = [
            s for s, v in after[k].by_service.items() if v > before[k].by_service.get(s, 0.0)
        ]
        for service in evaluated:
            judged[service] = judged.get(service, 0) + 1
        cpu = 100 * (after[k].daemon_cpu - before[k].daemon_cpu) / own
        cpu_total += cpu
        rss_peaks.append(status_kib(daemon.process.pid, "VmHWM") / 1024)
        count = d["rollbackd_check_evaluation_duration_seconds_count"]
        per.append(
            DaemonFigures(
                member=daemon.member,
                leases_held=held[k],
                services_evaluated=len(evaluated),
                evaluations_per_s=round(d["rollbackd_check_evaluations_total"] / own, 1),
                overruns=d["rollbackd_check_overruns_total"],
                missed=d["rollbackd_check_missed_total"],
                queries_per_interval=round(
                    d["rollbackd_prometheus_queries_total"] / (own / args.interval), 1
                ),
                cpu_percent=round(cpu, 1),
                rss_peak_mib=round(rss_peaks[-1], 1),
                eval_duration_mean_ms=round(
                    1000 * d["rollbackd_check_evaluation_duration_seconds_sum"] / count, 1
                )
                if count
                else None,
                loop_lag_p50_ms=round(1000 * percentile(lags[k], 0.5), 1),
                loop_lag_max_ms=round(1000 * max(lags[k], default=math.nan), 1),
                log_lines_per_s=round(log_lines[k] / own, 1),
                takeovers=d["rollbackd_lease_takeovers_total"],
            )
        )
    checks = 3 * n
    evals = totals["rollbackd_check_evaluations_total"] / elapsed
    expected = checks / args.interval
    dur_count = totals["rollbackd_check_evaluation_duration_seconds_count"]
    delay_count = totals["rollbackd_job_start_delay_seconds_count"]
    dur_b: dict[float, float] = {}
    delay_b: dict[float, float] = {}
    for b, a in zip(before, after, strict=True):
        for le, v in _delta(a.daemon_duration_buckets, b.daemon_duration_buckets).items():
            dur_b[le] = dur_b.get(le, 0.0) + v
        for le, v in _delta(a.daemon_delay_buckets, b.daemon_delay_buckets).items():
            delay_b[le] = delay_b.get(le, 0.0) + v
    first = daemons[0].process.pid
    return Result(
        services=n,
        checks=checks,
        interval=args.interval,
        duration=round(elapsed, 1),
        batching=args.batching,
        evaluations_per_s=round(evals, 1),
        expected_per_s=round(expected, 1),
        evaluations_ratio=round(evals / expected, 3),
        overruns=totals["rollbackd_check_overruns_total"],
        missed=totals["rollbackd_check_missed_total"],
        daemon_queries_per_interval=round(
            totals["rollbackd_prometheus_queries_total"] / intervals, 1
        ),
        prometheus_queries_per_interval=round(
            (after[-1].prometheus_queries - before[0].prometheus_queries) / intervals, 1
        ),
        daemon_cpu_percent=round(cpu_total, 1),
        prometheus_cpu_percent=round(
            100 * (after[-1].prometheus_cpu - before[0].prometheus_cpu) / elapsed, 1
        ),
        daemon_rss_peak_mib=round(max(rss_peaks), 1),
        daemon_rss_end_mib=round(status_kib(first, "VmRSS") / 1024, 1),
        daemon_threads=status_kib(first, "Threads"),
        eval_duration_mean_ms=round(
            1000 * totals["rollbackd_check_evaluation_duration_seconds_sum"] / dur_count, 1
        )
        if dur_count
        else None,
        eval_duration_p99_le_s=quantile(dur_b, 0.99),
        start_delay_mean_ms=round(
            1000 * totals["rollbackd_job_start_delay_seconds_sum"] / delay_count, 1
        )
        if delay_count
        else None,
        start_delay_p99_le_s=quantile(delay_b, 0.99),
        loop_lag_p50_ms=max(f.loop_lag_p50_ms for f in per),
        loop_lag_max_ms=max(f.loop_lag_max_ms for f in per),
        metrics_scrape_s=round(max(a.metrics_seconds for a in after), 2),
        metrics_mib=round(max(a.metrics_bytes for a in after) / 2**20, 1),
        log_lines_per_s=round(sum(log_lines) / elapsed, 1),
        query_outcomes=outcomes,
        profile=profile_path,
        store="postgres" if postgres else "sqlite",
        daemons=len(daemons),
        lease_time=args.lease_time if postgres else None,
        services_judged_twice=sum(1 for c in judged.values() if c > 1),
        services_judged_by_none=n - len(judged),
        per_daemon=per,
    )


def _delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: v - before.get(le, 0.0) for le, v in after.items()}


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def _query_outcomes(text: str) -> dict[str, float]:
    outcomes: dict[str, float] = {}
    for match in re.finditer(
        r'^rollbackd_prometheus_queries_total\{outcome="([^"]+)"\}\s+(\S+)', text, re.M
    ):
        outcomes[match.group(1)] = float(match.group(2))
    return outcomes


# --- the machine and the report -------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    prom_version = subprocess.run(
        ["prometheus", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "prometheus": prom_version[0] if prom_version else "?",
        "kernel": platform.release(),
    }


COLUMNS = (
    ("services", "N"),
    ("checks", "checks"),
    ("store", "store"),
    ("daemons", "daemons"),
    ("batching", "batch"),
    ("evaluations_per_s", "eval/s"),
    ("expected_per_s", "expect/s"),
    ("overruns", "overrun"),
    ("missed", "missed"),
    ("daemon_queries_per_interval", "q/int"),
    ("prometheus_queries_per_interval", "prom q/int"),
    ("daemon_cpu_percent", "cpu%"),
    ("prometheus_cpu_percent", "prom cpu%"),
    ("daemon_rss_peak_mib", "rss MiB"),
    ("eval_duration_mean_ms", "eval ms"),
    ("start_delay_mean_ms", "delay ms"),
    ("loop_lag_max_ms", "lag max ms"),
    ("services_judged_twice", "twice"),
    ("services_judged_by_none", "none"),
)
PER_DAEMON = (
    ("member", "member"),
    ("leases_held", "leases"),
    ("services_evaluated", "evaluated"),
    ("evaluations_per_s", "eval/s"),
    ("overruns", "overrun"),
    ("missed", "missed"),
    ("queries_per_interval", "q/int"),
    ("cpu_percent", "cpu%"),
    ("rss_peak_mib", "rss MiB"),
    ("eval_duration_mean_ms", "eval ms"),
    ("loop_lag_max_ms", "lag max ms"),
    ("takeovers", "takeovers"),
)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def table(results: list[Result]) -> str:
    rows = [[label for _, label in COLUMNS]]
    for r in results:
        values = asdict(r)
        rows.append([_cell(values[key]) for key, _ in COLUMNS])
    text = _aligned(rows)
    for r in results:
        if r.daemons > 1:
            per = [[label for _, label in PER_DAEMON]]
            per.extend([_cell(getattr(f, key)) for key, _ in PER_DAEMON] for f in r.per_daemon)
            text += f"\n\nN={r.services}, per daemon:\n" + _aligned(per)
    return text


@contextlib.contextmanager
def workspace(keep: str | None) -> Iterator[Path]:
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="check-scale-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--interval", type=float, default=15.0, help="check interval, seconds")
    parser.add_argument("--duration", type=float, default=75.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=40.0, help="seconds before measuring")
    parser.add_argument("--scrape-interval", type=float, default=5.0)
    parser.add_argument(
        "--batching",
        choices=["default", "on", "off"],
        default="default",
        help="query batching: the engine's default, or forced on/off for this run",
    )
    parser.add_argument("--no-batching", dest="batching", action="store_const", const="off")
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="postgres: a real PostgreSQL and --daemons daemons sharing it",
    )
    parser.add_argument("--daemons", type=int, default=3, help="with --store postgres")
    parser.add_argument(
        "--lease-time", type=float, default=10.0, help="seconds, with --store postgres"
    )
    parser.add_argument(
        "--split-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for a fair lease split before measuring anyway",
    )
    parser.add_argument("--profile", metavar="DIR", help="py-spy the (first) daemon into DIR")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    parser.add_argument("--json-out", metavar="FILE", help="append the JSON lines to FILE")
    args = parser.parse_args()

    info = machine()
    print("machine:", json.dumps(info), flush=True)
    results: list[Result] = []
    with workspace(args.keep) as root, contextlib.ExitStack() as stack:
        pg = stack.enter_context(PostgresServer()) if args.store == "postgres" else None
        for n in args.services:
            workdir = root / f"n{n}-{args.batching}-{args.store}"
            if workdir.exists():
                shutil.rmtree(workdir)
            workdir.mkdir(parents=True)
            print(
                f"N={n} services ({3 * n} checks), batching {args.batching}, {args.store}",
                flush=True,
            )
            load_start = os.getloadavg()
            result = run_one(args, n, workdir, pg)
            load_end = os.getloadavg()
            results.append(result)
            print(f"  load average (1, 5, 15 min): at start {load_start}, at end {load_end}")
            line = json.dumps(
                {
                    "bench": "check_scale",
                    "machine": info,
                    "loadavg_start": load_start,
                    "loadavg_end": load_end,
                    **asdict(result),
                }
            )
            print(line, flush=True)
            if args.json_out:
                with Path(args.json_out).open("a") as out:
                    out.write(line + "\n")
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
