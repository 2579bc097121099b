"""Webhook intake: Alertmanager payloads at rising rates against a real ``rollbackd run``.

What it does:

1. writes a config and three rule files whose ``[[alert]]`` mappings name alertnames this
   script never sends (``mode = "dry-run"`` too), so every alert is recorded as "matches no
   [[alert]]" and nothing reaches the rollback pipeline: intake only. ``[prometheus]`` points
   at a closed port; intake never asks it;
2. runs the real ``rollbackd run`` as a subprocess (port 0, address read from
   ``<state_dir>/api.address``, token from an environment variable);
3. for each rate in ``--rates`` (alerts/s), for ``--duration`` seconds, sends Alertmanager
   webhook payloads (version "4", ``--per-payload`` alerts each, every alert with a unique
   fingerprint and startsAt) with one async httpx client of at most ``--connections``
   connections. Open loop: payload *i* is scheduled at ``start + i / payloads_per_second``
   whatever the answers do, and its latency runs from that scheduled time to the answer, so a
   daemon that falls behind shows it as latency, not as a lower offered rate;
4. after each step counts the step's rows in the daemon's SQLite ``alerts`` table (read-only
   connection; each step has its own ``receiver``): stored, lost (sent but not stored) and
   duplicated (rows beyond one per (fingerprint, startsAt, status)); then re-sends a sample
   of the step's payloads and checks that no row was added, that the daemon answered
   ``new = 0`` for them, and that their ``deliveries`` went to 2;
5. prints a table and one JSON line (``--json-out`` appends it to a file too).

The target (issue #8): >= 1,000 alerts/s with p99 < 100 ms, none lost, none duplicated. A
step "meets" it when the achieved rate is within 5 % of the offered rate, p99 < 100 ms, and
errors, lost and duplicated are all zero. A benchmark, not a test: nothing asserts a time.
The client runs on the same machine as the daemon and competes with it for CPU.

Run from the repository root::

    .venv/bin/python bench/webhook_intake.py
    .venv/bin/python bench/webhook_intake.py --rates 1000 --duration 20 --profile bench/out

``--store postgres`` starts a real PostgreSQL (``tests/support/postgres.py``) and runs the
daemon on it (``[store]``; one daemon, which holds every lease): the counts then come from
its ``alerts`` table over psycopg.

    .venv/bin/python bench/webhook_intake.py --store postgres

``--profile DIR`` runs ``py-spy record`` (``pip install py-spy`` into the virtualenv; needs
ptrace rights) on the daemon during the last rate and writes a flame graph and a raw
collapsed-stack file there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.postgres import Database, PostgresServer  # noqa: E402

TOKEN = "bench-webhook-token-0123456789"
TOKEN_ENV = "ROLLBACKD_BENCH_TOKEN"
WEBHOOK = "/api/v1/alertmanager"
SERVICES = ("checkout", "payments", "search")
TARGET_RATE = 1000
TARGET_P99_MS = 100.0


# -- config and daemon --------------------------------------------------------------------


def rule_file(name: str) -> str:
    return f"""
[service]
name = "{name}"
rollback_window = "1h"

[[rollback]]
type = "command"
argv = ["/bin/true", "{{to_version}}"]
timeout = "20s"

[verify]
window = "100ms"

[[alert]]
alertname = "{name.capitalize()}NeverSent"
matchers = ['service="{name}"']
"""


def store_section(database: Database | None) -> str:
    """``[store]`` on PostgreSQL; nothing (SQLite under state_dir) without a database."""
    if database is None:
        return ""
    return (
        f'\n[store]\nurl = "{database.url}"\npassword_file = "{database.password_file}"\n'
        'member = "bench-intake"\n'
    )


def write_config(directory: Path, database: Database | None = None) -> Path:
    (directory / "rules").mkdir(parents=True, exist_ok=True)
    for name in SERVICES:
        (directory / "rules" / f"{name}.toml").write_text(rule_file(name))
    config = directory / "config.toml"
    config.write_text(
        f"""
[daemon]
mode = "dry-run"
state_dir = "state"
rule_files = ["rules/*.toml"]
log_format = "console"

[prometheus]
url = "http://127.0.0.1:9"
timeout = "2s"

[server]
listen = "127.0.0.1:0"
token_env = "{TOKEN_ENV}"
{store_section(database)}"""
    )
    return config


def poll(ready: Any, *, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Daemon:
    def __init__(self, config: Path, database: Database | None = None) -> None:
        self.config = config
        self.database = database
        self.state_dir = config.parent / "state"
        self.db = self.state_dir / "state.db"
        self.log = config.parent / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, TOKEN_ENV: TOKEN}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rollbackd", "run", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        address = self.state_dir / "api.address"

        def listening() -> bool:
            self.assert_alive()
            return address.exists()

        poll(listening, timeout=timeout, what=f"rollbackd to listen (log: {self.log})")
        self.url = "http://" + address.read_text().strip()

        def healthy() -> bool:
            self.assert_alive()
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        poll(healthy, timeout=timeout, what="/healthz to answer 200")

    def assert_alive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            tail = self.log.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"rollbackd exited with {code}:\n" + "\n".join(tail))

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def cpu_seconds(self) -> float:
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """``sql`` with ``?`` placeholders, on the daemon's store (read only on SQLite)."""
        if self.database is not None:
            with psycopg.connect(self.database.url, password=self.database.password) as pg:
                return [tuple(row) for row in pg.execute(sql.replace("?", "%s"), params)]
        with contextlib.closing(
            sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        ) as conn:
            return list(conn.execute(sql, params))


# -- payloads -----------------------------------------------------------------------------


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def payload(step: int, index: int, per_payload: int, base: float) -> bytes:
    """One delivery: ``per_payload`` firing alerts, each unique in fingerprint and startsAt.
    The fingerprint is hex (as Alertmanager's) and encodes step, payload and alert."""
    receiver = f"bench-step-{step}"
    alerts = []
    for k in range(per_payload):
        seq = index * per_payload + k
        service = SERVICES[seq % len(SERVICES)]
        labels = {
            "alertname": "BenchIntake",
            "service": service,
            "severity": "page",
            "instance": f"10.0.{seq % 250}.{seq % 200}:8080",
            "job": service,
        }
        alerts.append(
            {
                "status": "firing",
                "labels": labels,
                "annotations": {
                    "summary": f"{service} error ratio above 5% (seq {seq})",
                    "description": "Synthetic alert from bench/webhook_intake.py.",
                },
                "startsAt": iso(base + seq / 1000),
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus.invalid/graph?g0.expr=up",
                "fingerprint": f"{step:04x}{seq:012x}",
            }
        )
    body = {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="BenchIntake", step="{step}", payload="{index}"}}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": receiver,
        "groupLabels": {"alertname": "BenchIntake"},
        "commonLabels": {"alertname": "BenchIntake", "severity": "page"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.invalid",
        "alerts": alerts,
    }
    return json.dumps(body).encode()


# -- one step -----------------------------------------------------------------------------


@dataclass
class Step:
    target: int
    payloads: int = 0
    sent_alerts: int = 0
    ok_payloads: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    achieved: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    resent_payloads: int = 0
    resend_new: int = 0
    resend_rows_added: int = 0
    resend_deliveries_ok: bool = False
    daemon_cpu_pct: float = 0.0
    client_cpu_pct: float = 0.0
    meets: bool = False


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_step(
    client: httpx.AsyncClient,
    daemon: Daemon,
    *,
    step: int,
    rate: int,
    duration: float,
    per_payload: int,
    drain: float,
    resend: int,
) -> Step:
    result = Step(target=rate)
    pps = rate / per_payload
    count = max(1, round(pps * duration))
    base = time.time() - 3600 + step  # startsAt an hour ago, distinct per step
    bodies = [payload(step, i, per_payload, base) for i in range(count)]
    latencies: list[float] = []
    answered: list[float] = []

    async def send(body: bytes, scheduled: float) -> None:
        try:
            response = await client.post(WEBHOOK, content=body)
        except httpx.HTTPError as exc:
            kind = type(exc).__name__
            result.error_kinds[kind] = result.error_kinds.get(kind, 0) + 1
            result.errors += 1
            return
        done = time.perf_counter()
        latencies.append(done - scheduled)
        answered.append(done)
        if 200 <= response.status_code < 300:
            result.ok_payloads += 1
        else:
            kind = f"HTTP {response.status_code}"
            result.error_kinds[kind] = result.error_kinds.get(kind, 0) + 1
            result.errors += 1

    cpu_before = daemon.cpu_seconds()
    client_before = time.process_time()
    start = time.perf_counter() + 0.05
    tasks: list[asyncio.Task[None]] = []
    for i, body in enumerate(bodies):
        scheduled = start + i / pps
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(body, scheduled)))
    _, pending = await asyncio.wait(tasks, timeout=drain) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        result.errors += len(pending)
        result.error_kinds["unanswered at drain limit"] = len(pending)
    end = max(answered) if answered else time.perf_counter()
    elapsed = max(end - start, 1e-9)
    result.daemon_cpu_pct = 100 * (daemon.cpu_seconds() - cpu_before) / elapsed
    result.client_cpu_pct = 100 * (time.process_time() - client_before) / elapsed

    result.payloads = count
    result.sent_alerts = count * per_payload
    result.achieved = result.ok_payloads * per_payload / max(end - start, 1e-9)
    ms = [x * 1000 for x in latencies]
    result.p50_ms = percentile(ms, 0.50)
    result.p90_ms = percentile(ms, 0.90)
    result.p99_ms = percentile(ms, 0.99)
    result.max_ms = max(ms) if ms else float("nan")

    receiver = f"bench-step-{step}"
    count_sql = (
        "SELECT count(*), count(DISTINCT fingerprint || '|' || starts_at || '|' || status)"
        " FROM alerts WHERE receiver = ?"
    )
    [(rows, distinct)] = daemon.rows(count_sql, receiver)
    result.stored = distinct
    result.lost = result.sent_alerts - distinct
    result.duplicated = rows - distinct

    # Re-send a sample (as Alertmanager does every group_interval): no new row, new = 0.
    sample = sorted(set(range(0, count, max(1, count // max(1, resend)))))[:resend]
    fingerprints: list[str] = []
    for i in sample:
        response = await client.post(WEBHOOK, content=bodies[i])
        response.raise_for_status()
        answer = response.json()
        result.resend_new += int(answer["new"])
        fingerprints.extend(a["fingerprint"] for a in answer["alerts"])
    result.resent_payloads = len(sample)
    [(rows_after, distinct_after)] = daemon.rows(count_sql, receiver)
    result.resend_rows_added = rows_after - rows
    result.duplicated = max(result.duplicated, rows_after - distinct_after)
    if fingerprints:
        marks = ",".join("?" * len(fingerprints))
        [(twice,)] = daemon.rows(
            f"SELECT count(*) FROM alerts WHERE receiver = ? AND deliveries = 2"
            f" AND fingerprint IN ({marks})",
            receiver,
            *fingerprints,
        )
        result.resend_deliveries_ok = twice == len(fingerprints)

    result.meets = (
        result.achieved >= 0.95 * rate
        and result.p99_ms < TARGET_P99_MS
        and result.errors == 0
        and result.lost == 0
        and result.duplicated == 0
        and result.resend_new == 0
        and result.resend_rows_added == 0
        and result.resend_deliveries_ok
    )
    return result


# -- main ---------------------------------------------------------------------------------


def start_profiler(pid: int, directory: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("--profile: py-spy not found (pip install py-spy); not profiling", file=sys.stderr)
        return None
    directory.mkdir(parents=True, exist_ok=True)
    common = ["--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200", "--nonblocking"]
    return subprocess.Popen(
        [spy, "record", *common, "--format", "raw", "-o", str(directory / "webhook.collapsed")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def bench(args: argparse.Namespace, daemon: Daemon) -> list[Step]:
    limits = httpx.Limits(
        max_connections=args.connections, max_keepalive_connections=args.connections
    )
    timeout = httpx.Timeout(args.request_timeout, pool=args.request_timeout)
    results: list[Step] = []
    async with httpx.AsyncClient(
        base_url=daemon.url,
        headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
        limits=limits,
        timeout=timeout,
    ) as client:
        # Warm up the connections and the daemon's code paths (not counted).
        await run_step(
            client, daemon, step=0, rate=100, duration=1, per_payload=args.per_payload,
            drain=args.drain, resend=2,
        )  # fmt: skip
        for step, rate in enumerate(args.rates, start=1):
            profiler = None
            if args.profile and step == len(args.rates):
                assert daemon.process is not None
                profiler = start_profiler(daemon.process.pid, args.profile, args.duration)
            result = await run_step(
                client,
                daemon,
                step=step,
                rate=rate,
                duration=args.duration,
                per_payload=args.per_payload,
                drain=args.drain,
                resend=args.resend,
            )
            if profiler is not None:
                try:
                    profiler.wait(timeout=args.duration + 30)
                except subprocess.TimeoutExpired:
                    profiler.kill()
                    profiler.wait()
            daemon.assert_alive()
            results.append(result)
            print(row(result), flush=True)
    return results


HEADER = (
    f"{'target/s':>8} {'achieved/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
    f"{'errors':>6} {'sent':>6} {'stored':>6} {'lost':>5} {'dup':>4} {'resend':>11} "
    f"{'d-cpu%':>6} {'c-cpu%':>6} meets"
)


def row(r: Step) -> str:
    resend = f"{r.resent_payloads}p new={r.resend_new}"
    return (
        f"{r.target:>8} {r.achieved:>10.0f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {r.max_ms:>8.1f} "
        f"{r.errors:>6} {r.sent_alerts:>6} {r.stored:>6} {r.lost:>5} {r.duplicated:>4} "
        f"{resend:>11} {r.daemon_cpu_pct:>6.0f} {r.client_cpu_pct:>6.0f} "
        f"{'yes' if r.meets else 'no'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[100, 250, 500, 1000, 2000])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--per-payload", type=int, default=10, help="alerts per payload")
    parser.add_argument("--connections", type=int, default=32, help="max client connections")
    parser.add_argument("--request-timeout", type=float, default=20.0)
    parser.add_argument(
        "--drain", type=float, default=30.0, help="seconds to wait for answers after sending"
    )
    parser.add_argument("--resend", type=int, default=20, help="payloads re-sent per step")
    parser.add_argument("--profile", type=Path, help="py-spy the daemon during the last rate")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="rollbackd-webhook-"))
    load_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        database = None
        if args.store == "postgres":
            database = stack.enter_context(PostgresServer()).create_database("intake")
        daemon = Daemon(write_config(directory, database), database)
        results = run(args, daemon, directory)
    load_end = os.getloadavg()
    print(f"load average (1, 5, 15 min): at start {load_start}, at end {load_end}")
    loads = {"store": args.store, "loadavg_start": load_start, "loadavg_end": load_end}
    report(args, results, loads)
    return 0


def run(args: argparse.Namespace, daemon: Daemon, directory: Path) -> list[Step]:
    results: list[Step] = []
    try:
        daemon.start()
        print(f"rollbackd at {daemon.url}, work directory {directory}", flush=True)
        print(HEADER, flush=True)
        results = asyncio.run(bench(args, daemon))
    finally:
        daemon.stop()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return results


def report(args: argparse.Namespace, results: list[Step], extra: dict[str, Any]) -> None:
    met = [r.target for r in results if r.meets]
    sustained = max(met) if met else 0
    summary = {
        "bench": "webhook_intake",
        "per_payload": args.per_payload,
        "duration_s": args.duration,
        "connections": args.connections,
        "sustained_alerts_per_s": sustained,
        "target_met": sustained >= TARGET_RATE,
        "steps": [asdict(r) for r in results],
        **extra,
    }
    print(
        f"sustained: {sustained} alerts/s meets p99 < {TARGET_P99_MS:.0f} ms, 0 lost, 0 dup; "
        f"target {TARGET_RATE}/s {'met' if sustained >= TARGET_RATE else 'missed'}"
    )
    line = json.dumps(summary, sort_keys=True)
    print(line)
    if args.json_out:
        with args.json_out.open("a") as out:
            out.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
