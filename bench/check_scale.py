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


def write_config(
    directory: Path, services: list[str], prometheus_url: str, port: int, interval: float
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
"""
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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")": state is field 3, utime 14 and stime 15 (1-based in proc(5)).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


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
    )


# --- one run --------------------------------------------------------------------------------


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


def run_one(args: argparse.Namespace, n: int, workdir: Path) -> Result:
    names = [f"svc-{i:05d}" for i in range(n)]
    exporter = Exporter(names)
    exporter.start()
    prom = PrometheusServer(
        workdir / "prometheus",
        targets=[ScrapeTarget(exporter.address, job="bench")],
        scrape_interval=f"{args.scrape_interval:g}s",
        evaluation_interval="60s",
    )
    daemon: subprocess.Popen[bytes] | None = None
    profiler: subprocess.Popen[bytes] | None = None
    http = httpx.Client()
    try:
        prom.start()
        prom.wait_ready(60)
        wait_for_data(prom, n, timeout=120)
        port = free_port()
        config = write_config(workdir / "daemon", names, prom.url, port, args.interval)
        env = {**os.environ, TOKEN_ENV: "bench-token-" + "x" * 24}
        log_path = workdir / "daemon" / "daemon.log"
        batching = {"on": True, "off": False, "default": None}[args.batching]
        with log_path.open("wb") as log:
            daemon = subprocess.Popen(
                [*daemon_command(batching), "-c", str(config)],
                cwd=workdir / "daemon",
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if daemon.poll() is not None:
                raise RuntimeError(
                    f"rollbackd exited with {daemon.returncode}:\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            with contextlib.suppress(httpx.TransportError):
                if http.get(f"{url}/metrics", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("rollbackd did not serve /metrics within 120 s")
            time.sleep(0.5)
        print(f"  N={n}: daemon up (pid {daemon.pid}); warm-up {args.warmup:g}s", flush=True)
        time.sleep(args.warmup)
        lines_before = _count_lines(log_path)
        before = snapshot(http, url, daemon.pid, prom)
        profile_path = None
        if args.profile:
            out = Path(args.profile)
            out.mkdir(parents=True, exist_ok=True)
            profile_path = str(out / f"check_scale-{n}-{args.batching}.txt")
            profiler = subprocess.Popen(
                [
                    shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(daemon.pid),
                    "--duration",
                    str(int(args.duration)),
                    "--rate",
                    "50",
                    "--format",
                    "raw",
                    "--output",
                    profile_path,
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        print(f"  N={n}: measuring {args.duration:g}s", flush=True)
        lags: list[float] = []
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                http.get(f"{url}/healthz", timeout=30)
                lags.append(time.monotonic() - started)
            except httpx.TransportError:
                lags.append(30.0)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        after = snapshot(http, url, daemon.pid, prom)
        lines_after = _count_lines(log_path)
        if profiler is not None:
            profiler.wait(timeout=120)
        outcomes = _query_outcomes(http.get(f"{url}/metrics", timeout=60).text)
        rss_peak = status_kib(daemon.pid, "VmHWM") / 1024
        rss_end = status_kib(daemon.pid, "VmRSS") / 1024
        threads = status_kib(daemon.pid, "Threads")
        elapsed = after.at - before.at
        intervals = elapsed / args.interval
        d = {k: after.daemon[k] - before.daemon[k] for k in DAEMON_COUNTERS}
        checks = 3 * n
        evals = d["rollbackd_check_evaluations_total"] / elapsed
        expected = checks / args.interval
        dur_count = d["rollbackd_check_evaluation_duration_seconds_count"]
        delay_count = d["rollbackd_job_start_delay_seconds_count"]
        dur_b = _delta(after.daemon_duration_buckets, before.daemon_duration_buckets)
        delay_b = _delta(after.daemon_delay_buckets, before.daemon_delay_buckets)
        return Result(
            services=n,
            checks=checks,
            interval=args.interval,
            duration=round(elapsed, 1),
            batching=args.batching,
            evaluations_per_s=round(evals, 1),
            expected_per_s=round(expected, 1),
            evaluations_ratio=round(evals / expected, 3),
            overruns=d["rollbackd_check_overruns_total"],
            missed=d["rollbackd_check_missed_total"],
            daemon_queries_per_interval=round(
                d["rollbackd_prometheus_queries_total"] / intervals, 1
            ),
            prometheus_queries_per_interval=round(
                (after.prometheus_queries - before.prometheus_queries) / intervals, 1
            ),
            daemon_cpu_percent=round(100 * (after.daemon_cpu - before.daemon_cpu) / elapsed, 1),
            prometheus_cpu_percent=round(
                100 * (after.prometheus_cpu - before.prometheus_cpu) / elapsed, 1
            ),
            daemon_rss_peak_mib=round(rss_peak, 1),
            daemon_rss_end_mib=round(rss_end, 1),
            daemon_threads=threads,
            eval_duration_mean_ms=round(
                1000 * d["rollbackd_check_evaluation_duration_seconds_sum"] / dur_count, 1
            )
            if dur_count
            else None,
            eval_duration_p99_le_s=quantile(dur_b, 0.99),
            start_delay_mean_ms=round(
                1000 * d["rollbackd_job_start_delay_seconds_sum"] / delay_count, 1
            )
            if delay_count
            else None,
            start_delay_p99_le_s=quantile(delay_b, 0.99),
            loop_lag_p50_ms=round(1000 * percentile(lags, 0.5), 1),
            loop_lag_max_ms=round(1000 * max(lags, default=math.nan), 1),
            metrics_scrape_s=round(after.metrics_seconds, 2),
            metrics_mib=round(after.metrics_bytes / 2**20, 1),
            log_lines_per_s=round((lines_after - lines_before) / elapsed, 1),
            query_outcomes=outcomes,
            profile=profile_path,
        )
    finally:
        if profiler is not None and profiler.poll() is None:
            profiler.terminate()
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        http.close()
        prom.close()
        exporter.stop()


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
)


def table(results: list[Result]) -> str:
    rows = [[label for _, label in COLUMNS]]
    for r in results:
        values = asdict(r)
        rows.append(
            [
                "-"
                if values[key] is None
                else f"{values[key]:g}"
                if isinstance(values[key], float)
                else str(values[key])
                for key, _ in COLUMNS
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


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
    parser.add_argument("--profile", metavar="DIR", help="py-spy the daemon into DIR")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    parser.add_argument("--json-out", metavar="FILE", help="append the JSON lines to FILE")
    args = parser.parse_args()

    info = machine()
    print("machine:", json.dumps(info), flush=True)
    results: list[Result] = []
    with workspace(args.keep) as root:
        for n in args.services:
            workdir = root / f"n{n}-{args.batching}"
            if workdir.exists():
                shutil.rmtree(workdir)
            workdir.mkdir(parents=True)
            print(f"N={n} services ({3 * n} checks), batching {args.batching}", flush=True)
            result = run_one(args, n, workdir)
            results.append(result)
            line = json.dumps({"bench": "check_scale", "machine": info, **asdict(result)})
            print(line, flush=True)
            if args.json_out:
                with Path(args.json_out).open("a") as out:
                    out.write(line + "\n")
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
