"""Time to rollback (issue #8, part 1): a bad release at t0 -> the rollback executor invoked.

One real Prometheus scrapes simulated services every 1 s. Each run has three fake services,
one per path, all switched from a healthy 1.0.0 to a bad 2.0.0 (30 % errors) at the same t0:

* ``poll-N``: rollbackd polling, a version-scoped ``error_rate`` check every 1 s
  (by default window 1m, above 0.05, breaches 1, min_rate 0: the rule's condition, scoped
  to the version) -> command executor;
* ``amd-N``: a Prometheus alerting rule (``for: 0s``, rule evaluated every 1 s) ->
  Alertmanager with its default timings (group_wait 30s, group_interval 5m) ->
  rollbackd's webhook (``POST /api/v1/alertmanager``, bearer token) -> executor;
* ``amt-N``: the same rule -> a tuned Alertmanager (group_wait 1s, group_interval 1s) ->
  the same webhook -> executor.

Every executor is one inline ``python -S -I -c`` that appends its service and ``time.time()``
(taken first thing) to a file. Runs are parallel within one Prometheus, each with its own
services, t0 staggered by a non-whole number of seconds so that they fall at different
phases of the scrape, rule evaluation and check cycles. Each service is healthy for
``--warmup`` seconds (>= 70 s, so the rule's 1m rate window holds only good data) first.

Decision overhead is rollbackd's own share of the polling path: the ``check.breach`` event's
``at`` (the firing evaluation) -> the executor step's ``rollback_steps.started_at`` (spawn),
and -> the executor's own first ``time.time()`` (which adds interpreter start-up).

    .venv/bin/python bench/time_to_rollback.py [--runs 5] [--warmup 75] [--stagger 7.3]

Prints a table and one JSON line. Everything started is stopped. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from rollbackd.core.durations import parse_duration  # noqa: E402
from support.alertmanager import AlertmanagerServer  # noqa: E402
from support.configs import write_config  # noqa: E402
from support.daemon_process import TOKEN, DaemonProcess, set_mode  # noqa: E402
from support.fake_service import FakeService  # noqa: E402
from support.prometheus import PrometheusServer, ScrapeTarget  # noqa: E402

PATHS = ("poll", "amd", "amt")
LABELS = {
    "poll": "rollbackd polling (1 s check)",
    "amd": "rule -> Alertmanager defaults -> webhook",
    "amt": "rule -> Alertmanager tuned (1s/1s) -> webhook",
}
RPS = 10.0
BAD_ERROR_RATIO = 0.3
GOOD_ERROR_RATIO = 0.0

# Records time.time() before anything else. No braces: rollbackd reads {...} as placeholders.
RECORD = (
    "import sys, time; t = time.time(); "
    "f = open(sys.argv[1], 'a'); f.write(sys.argv[2] + ' ' + repr(t) + chr(10)); f.close()"
)


def executor(log: Path, service: str, *, target: bool) -> str:
    argv = [sys.executable, "-S", "-I", "-c", RECORD, str(log), service]
    if target:
        argv.append("{to_version}")
    return f'[[rollback]]\ntype = "command"\nargv = {json.dumps(argv)}\ntimeout = "20s"\n'


def poll_rules(
    name: str, log: Path, window: str, min_rate: float, compare_baseline: str | None
) -> str:
    return f"""
[service]
name = "{name}"
version_query = 'max by (version) (app_build_info{{service="{name}"}})'
version_label = "version"
bake_time = "5s"
rollback_window = "1h"

{executor(log, name, target=True)}

[verify]
window = "1s"
version_timeout = "5s"

{check_rule(name, window, min_rate, compare_baseline)}"""


def check_rule(name: str, window: str, min_rate: float, compare_baseline: str | None) -> str:
    """The polling path's check: the threshold ``error_rate`` one, or with
    ``--compare-baseline`` a ``compare`` check against that window before the release."""
    if compare_baseline is not None:
        return f"""[[check]]
name = "errors-vs-baseline"
type = "compare"
selector = 'service="{name}"'
errors = 'code=~"5.."'
baseline_window = "{compare_baseline}"
interval = "1s"
min_rate = {min_rate}
"""
    return f"""[[check]]
name = "error-rate"
type = "error_rate"
selector = 'service="{name}"'
errors = 'code=~"5.."'
above = 0.05
window = "{window}"
breaches = 1
interval = "1s"
min_rate = {min_rate}
"""


def alert_rules(name: str, log: Path) -> str:
    return f"""
[service]
name = "{name}"
rollback_window = "1h"

{executor(log, name, target=False)}

[verify]
window = "100ms"

[[alert]]
alertname = "BadRelease"
matchers = ['service="{name}"']
"""


def alerting_rule(name: str, path: str) -> dict[str, Any]:
    errors = f'sum(rate(http_requests_total{{service="{name}",code=~"5.."}}[1m]))'
    total = f'sum(rate(http_requests_total{{service="{name}"}}[1m]))'
    return {
        "alert": "BadRelease",
        "expr": f"{errors} / {total} > 0.05",
        "for": "0s",
        "labels": {"service": name, "path": path, "severity": "critical"},
    }


def route_only(server: AlertmanagerServer, path: str, *, tuned: bool) -> None:
    """Deliver only this path's alerts (Prometheus sends every alert to both); the defaults
    Alertmanager keeps Alertmanager's own group_wait / group_interval / repeat_interval."""
    route: dict[str, Any] = {
        "receiver": "drop",
        "group_by": ["alertname", "service"],
        "routes": [{"receiver": "rollbackd", "matchers": [f'path="{path}"']}],
    }
    if tuned:
        route.update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    server.config["route"] = route
    server.config["receivers"].append({"name": "drop"})


def read_log(log: Path) -> dict[str, float]:
    if not log.exists():
        return {}
    found: dict[str, float] = {}
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            found.setdefault(parts[0], float(parts[1]))
    return found


def rows(db: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return list(conn.execute(sql, params))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with few samples, p99 is the maximum)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=75.0, help="healthy seconds before t0")
    parser.add_argument("--stagger", type=float, default=7.3, help="seconds between runs' t0")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-run limit after t0")
    parser.add_argument("--window", default="1m", help="the polling check's rate window")
    parser.add_argument(
        "--min-rate", type=float, default=0.0, help="the polling check's min_rate (req/s)"
    )
    parser.add_argument(
        "--compare-baseline",
        metavar="WINDOW",
        help="judge the polling path with a compare check (defaults: worse_by 20%%, "
        "confidence 0.99) against this baseline window (at most --warmup), not error_rate",
    )
    parser.add_argument(
        "--good-error-ratio", type=float, default=GOOD_ERROR_RATIO, help="1.0.0's error ratio"
    )
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rollbackd-ttr-"))
    log = work / "executors.log"
    services = {
        (path, i): FakeService(f"{path}-{i}", "1.0.0", error_ratio=args.good_error_ratio, rps=RPS)
        for i in range(args.runs)
        for path in PATHS
    }
    started: list[Any] = []
    try:
        for svc in services.values():
            svc.start()
            started.append(svc)
        (work / "prom").mkdir()
        rule_file = work / "prom" / "rules.yml"
        rule_file.write_text(
            json.dumps(
                {
                    "groups": [
                        {
                            "name": "bad-release",
                            "interval": "1s",
                            "rules": [
                                alerting_rule(svc.service, path)
                                for (path, _), svc in services.items()
                                if path != "poll"
                            ],
                        }
                    ]
                }
            )
        )
        prometheus = PrometheusServer(
            work / "prom",
            targets=[ScrapeTarget(svc.address, job="svc") for svc in services.values()],
            rule_files=[rule_file],
            scrape_interval="1s",
            evaluation_interval="1s",
        )

        names = {key: svc.service for key, svc in services.items()}
        polling_dir, classic_dir = work / "polling", work / "classic"
        polling_dir.mkdir()
        classic_dir.mkdir()
        polling_config = write_config(
            polling_dir,
            prometheus.url,
            {
                n: poll_rules(n, log, args.window, args.min_rate, args.compare_baseline)
                for (p, _), n in names.items()
                if p == "poll"
            },
        )
        classic_config = write_config(
            classic_dir,
            prometheus.url,
            {n: alert_rules(n, log) for (p, _), n in names.items() if p != "poll"},
        )
        set_mode(polling_config, "auto")
        set_mode(classic_config, "auto")
        polling = DaemonProcess(polling_config)
        classic = DaemonProcess(classic_config)
        # A compare check's baseline is the window before the version went live: with it,
        # the polling daemon starts once that window holds 1.0.0's requests (a daemon
        # started with its services would find no baseline, and 1.0.0 would never bake).
        started.append(classic)
        classic.start()
        if args.compare_baseline is None:
            started.append(polling)
            polling.start()

        credentials = work / "am.token"
        credentials.write_text(TOKEN + "\n")
        managers: dict[str, AlertmanagerServer] = {}
        for path in ("amd", "amt"):
            server = AlertmanagerServer(
                work / path,
                webhook_url=f"{classic.url}/api/v1/alertmanager",
                credentials_file=credentials,
            )
            route_only(server, path, tuned=path == "amt")
            started.append(server)
            server.start()
            managers[path] = server
        prometheus.alertmanagers = [f"127.0.0.1:{m.port}" for m in managers.values()]
        started.append(prometheus)
        prometheus.start()
        prometheus.wait_ready()
        prometheus.wait_for('up{job="svc"} == 1', lambda r: len(r) == len(services), timeout=30)
        first_scrape = time.time()
        print(f"work dir {work}; {len(services)} services scraped; warming up", flush=True)
        if args.compare_baseline is not None:
            time.sleep(parse_duration(args.compare_baseline).total_seconds() + 5)
            started.append(polling)
            polling.start()

        t0s: dict[int, float] = {}
        for i in range(args.runs):
            due = first_scrape + args.warmup + i * args.stagger
            while time.time() < due:
                for daemon in (polling, classic):
                    daemon.assert_alive()
                time.sleep(min(0.05, max(0.0, due - time.time())))
            name = names[("poll", i)]
            baked = rows(
                polling.db,
                "SELECT count(*) FROM versions WHERE service = ? AND version = '1.0.0' "
                "AND baked_at IS NOT NULL",
                name,
            )
            if baked != [(1,)]:
                raise RuntimeError(f"{name} 1.0.0 has not baked; see {polling.log}")
            t0 = time.time()
            for path in PATHS:
                services[(path, i)].update(version="2.0.0", error_ratio=BAD_ERROR_RATIO)
            t0s[i] = t0
            print(f"run {i}: bad release at t0", flush=True)

        deadline = max(t0s.values()) + args.timeout
        while len(read_log(log)) < len(services) and time.time() < deadline:
            time.sleep(0.2)
        invoked = read_log(log)

        results: dict[str, list[float | None]] = {p: [] for p in PATHS}
        for i in range(args.runs):
            for path in PATHS:
                at = invoked.get(names[(path, i)])
                results[path].append(None if at is None else at - t0s[i])

        spawn: list[float] = []
        own: list[float] = []
        for i in range(args.runs):
            name = names[("poll", i)]
            breach = rows(
                polling.db,
                "SELECT min(at) FROM events WHERE type = 'check.breach' AND service = ?",
                name,
            )[0][0]
            step = rows(
                polling.db,
                "SELECT min(s.started_at) FROM rollback_steps s "
                "JOIN rollbacks r ON r.id = s.rollback_id WHERE r.service = ?",
                name,
            )[0][0]
            if breach is not None and step is not None:
                spawn.append(step - breach)
            if breach is not None and name in invoked:
                own.append(invoked[name] - breach)
        webhook: list[float] = []
        for i in range(args.runs):
            for path in ("amd", "amt"):
                name = names[(path, i)]
                received = rows(
                    classic.db,
                    "SELECT min(received_at) FROM alerts WHERE matched_service = ?",
                    name,
                )[0][0]
                if received is not None and name in invoked:
                    webhook.append(invoked[name] - received)
    finally:
        # Daemons first (they query Prometheus), then the rest, newest first.
        daemons = [t for t in started if isinstance(t, DaemonProcess)]
        for thing in daemons + [t for t in reversed(started) if t not in daemons]:
            with contextlib.suppress(Exception):
                if hasattr(thing, "close"):
                    thing.close()
                else:
                    thing.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    medians: dict[str, float | None] = {}
    print()
    print(f"{'path':<48} {'n':>3} {'median':>8} {'min':>7} {'max':>7}  runs (s)")
    for path in PATHS:
        done = [v for v in results[path] if v is not None]
        medians[path] = statistics.median(done) if done else None
        shown = " ".join("-" if v is None else f"{v:.2f}" for v in results[path])
        if done:
            print(
                f"{LABELS[path]:<48} {len(done):>3} {medians[path]:>7.2f}s {min(done):>6.2f}s "
                f"{max(done):>6.2f}s  {shown}"
            )
        else:
            print(f"{LABELS[path]:<48} {0:>3} {'-':>8}  {shown}")
    poll_median = medians["poll"]
    ratios = {
        p: (m / poll_median if m is not None and poll_median else None)
        for p, m in medians.items()
        if p != "poll"
    }
    for path, ratio in ratios.items():
        text = "-" if ratio is None else f"{ratio:.1f}x"
        print(f"speed-up of rollbackd polling over {path}: {text}")

    def pct(values: list[float]) -> dict[str, float | int | None]:
        if not values:
            return {"n": 0, "p50_ms": None, "p99_ms": None}
        return {
            "n": len(values),
            "p50_ms": round(percentile(values, 50) * 1000, 1),
            "p99_ms": round(percentile(values, 99) * 1000, 1),
        }

    overhead = {
        "breach_to_spawn": pct(spawn),
        "breach_to_executor_first_line": pct(own),
        "webhook_received_to_executor_first_line": pct(webhook),
    }
    for key, value in overhead.items():
        print(
            f"decision overhead {key}: n={value['n']} p50={value['p50_ms']} ms "
            f"p99={value['p99_ms']} ms"
        )
    print(
        json.dumps(
            {
                "bench": "time_to_rollback",
                "runs": args.runs,
                "warmup_s": args.warmup,
                "check": {
                    "window": args.window,
                    "min_rate": args.min_rate,
                    "compare_baseline": args.compare_baseline,
                    "good_error_ratio": args.good_error_ratio,
                },
                "t0_to_executor_s": {
                    p: [None if v is None else round(v, 3) for v in results[p]] for p in PATHS
                },
                "median_s": {p: None if m is None else round(m, 3) for p, m in medians.items()},
                "speedup": {p: None if r is None else round(r, 2) for p, r in ratios.items()},
                "decision_overhead": overhead,
            }
        )
    )
    return 0 if all(v is not None for p in PATHS for v in results[p]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
