"""The demo: a service with a good 1.0.0 and a bad 2.0.0, a real Prometheus scraping it every
second, and rollbackd watching. 1.0.0 bakes, 2.0.0 goes out, rollbackd detects it, rolls back
to 1.0.0 through a deploy command, verifies, and this prints what happened and when.

Run it with ``bash scripts/demo.sh`` (which installs what is missing first). It exits 0 when
the rollback happened and was verified, and cleans up after itself.

The simulated service and the local Prometheus are the ones the tests use
(``tests/support``); rollbackd itself runs exactly as in production: ``rollbackd run``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.fake_service import FakeService  # noqa: E402
from support.prometheus import PrometheusServer, ScrapeTarget  # noqa: E402

DEPLOY = ROOT / "tests" / "support" / "deploy.py"
DEADLINE = 150.0  # seconds for the whole story; the demo must end within 3 minutes

RULES = """
[service]
name = "checkout"
version_query = 'max by (version) (app_build_info{{service="checkout"}})'
version_label = "version"
bake_time = "5s"
rollback_window = "1h"

[[rollback]]
type = "command"
argv = {deploy}
timeout = "1m"

[verify]
window = "5s"
version_timeout = "30s"

[[check]]
name = "error-rate"
type = "error_rate"
selector = 'service="checkout"'
errors = 'code=~"5.."'
above = 0.05
window = "10s"
breaches = 2
interval = "1s"
min_rate = 1

[[check]]
name = "p99"
type = "latency"
metric = "http_request_duration_seconds"
selector = 'service="checkout"'
above = "500ms"
window = "10s"
breaches = 2
interval = "1s"
"""

CONFIG = """
[daemon]
mode = "auto"
state_dir = "state"
rule_files = ["rules/*.toml"]
log_format = "json"

[prometheus]
url = "{prometheus}"
timeout = "2s"

[server]
listen = "127.0.0.1:0"
token_env = "ROLLBACKD_DEMO_TOKEN"

[guards]
cooldown = "15m"
max_rollbacks = 3
window = "1h"
"""

BOLD = "\033[1m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


class Story:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.t0: float | None = None  # wall time of the bad release
        self.timeline: list[tuple[float, str]] = []

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {text}", flush=True)

    def mark(self, at: float, text: str) -> None:
        self.timeline.append((at, text))
        since = f"t0{at - self.t0:+.1f}s" if self.t0 is not None else ""
        self.say(f"{BOLD}{since:>9}{RESET}  {text}")

    def check_deadline(self) -> None:
        if time.monotonic() - self.start > DEADLINE:
            raise TimeoutError(f"the demo did not finish within {DEADLINE:.0f}s")


def read_events(db: Path, after: int) -> list[tuple[int, float, str, dict[str, Any]]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as conn:
            rows = conn.execute(
                "SELECT id, at, type, data FROM events WHERE id > ? ORDER BY id", (after,)
            ).fetchall()
    except sqlite3.OperationalError:
        return []  # the daemon is still creating its schema
    return [(int(i), float(at), str(kind), json.loads(data)) for i, at, kind, data in rows]


def read_steps(db: Path, rollback_id: int) -> list[tuple[str, str, float, float | None, str]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as conn:
        return conn.execute(
            "SELECT kind, executor, started_at, finished_at, summary FROM rollback_steps "
            "WHERE rollback_id = ? ORDER BY id",
            (rollback_id,),
        ).fetchall()


def describe(kind: str, data: dict[str, Any]) -> str | None:
    if kind == "version.changed":
        return f"rollbackd sees version {data['to_version']} running"
    if kind == "version.baked":
        return f"version {data['version']} baked: it is the last known good"
    if kind == "check.breach":
        return f"check {data['check']} fired: {data['reason']}"
    if kind == "rollback.started":
        return (
            f"rollback {data['rollback_id']} started: {data['from_version']} -> "
            f"{data['to_version']}"
        )
    if kind in ("rollback.succeeded", "rollback.failed", "verify.failed"):
        return f"{kind}: {data.get('outcome') or data.get('reason')}"
    if kind in ("rollback.refused", "service.frozen", "canary.aborted"):
        return f"{kind}: {data.get('reason', '')}"
    return None


def main() -> int:
    story = Story()
    work = Path(tempfile.mkdtemp(prefix="rollbackd-demo-"))
    service = FakeService("checkout", "1.0.0", error_ratio=0.002, latency_seconds=0.04, rps=40)
    prometheus: PrometheusServer | None = None
    daemon: subprocess.Popen[bytes] | None = None
    try:
        service.start()
        story.say(f"demo service checkout 1.0.0 serving on {service.address} (0.2% errors)")
        prometheus = PrometheusServer(
            work / "prometheus", targets=[ScrapeTarget(service.address, job="checkout")]
        )
        prometheus.start()
        prometheus.wait_ready()
        story.say(f"Prometheus {prometheus.url} scraping it every 1s; waiting for the first scrape")
        prometheus.wait_for('app_build_info{service="checkout"}', timeout=30)

        # The deploy command puts a version back; the demo's good version behaves well.
        deploy = [
            sys.executable,
            str(DEPLOY),
            f"{service.url}/control",
            "{to_version}",
            "--error-ratio",
            "0.002",
            "--latency-seconds",
            "0.04",
        ]
        (work / "rules").mkdir()
        (work / "rules" / "checkout.toml").write_text(RULES.format(deploy=json.dumps(deploy)))
        config = work / "config.toml"
        config.write_text(CONFIG.format(prometheus=prometheus.url))
        check = subprocess.run(
            [sys.executable, "-m", "rollbackd", "check", "-c", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            print(check.stderr, file=sys.stderr)
            return 1
        story.say("rollbackd check: config valid; worst-case detection per check:")
        for line in check.stdout.splitlines():
            if "worst-case" in line:
                print("          " + " ".join(line.split()), flush=True)

        log = (work / "rollbackd.log").open("wb")
        env = {**os.environ, "ROLLBACKD_DEMO_TOKEN": "demo-token"}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "rollbackd", "run", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        story.say(f"rollbackd run started (pid {daemon.pid}); log: {work / 'rollbackd.log'}")
        db = work / "state" / "state.db"

        last = 0
        released = False
        outcome: str | None = None
        rollback_id: int | None = None
        while outcome is None:
            story.check_deadline()
            if daemon.poll() is not None:
                raise RuntimeError(f"rollbackd exited with {daemon.returncode}")
            for event_id, at, kind, data in read_events(db, last):
                last = event_id
                text = describe(kind, data)
                if text:
                    story.mark(at, text)
                if kind == "version.baked" and not released:
                    story.t0 = time.time()
                    service.update(version="2.0.0", error_ratio=0.3, latency_seconds=0.9)
                    released = True
                    story.mark(story.t0, "deployed 2.0.0: 30% errors, p99 0.9s (the bad release)")
                if kind == "rollback.started":
                    rollback_id = int(data["rollback_id"])
                if kind in ("rollback.succeeded", "rollback.failed", "verify.failed"):
                    outcome = kind
            time.sleep(0.2)  # the demo polls the daemon's audit log for progress

        assert rollback_id is not None
        print()
        print(f"{BOLD}What rollbackd did{RESET} (t0 = the bad release went out):")
        for kind, executor, started, finished, summary in read_steps(db, rollback_id):
            took = f"{finished - started:.1f}s" if finished else "unfinished"
            print(f"  {kind:<9} {executor:<40} {took:>7}  {summary}")
        assert story.t0 is not None
        detected = next((at for at, text in story.timeline if "fired" in text), None)
        done = story.timeline[-1][0]
        print()
        if detected is not None:
            print(f"  bad release -> detected:   {detected - story.t0:5.1f}s")
        print(f"  bad release -> verified:   {done - story.t0:5.1f}s")
        print(f"  service now runs:          {service.version}")
        ok = outcome == "rollback.succeeded" and service.version == "1.0.0"
        print(f"\n{BOLD}{'rollback succeeded and verified' if ok else 'rollback FAILED'}{RESET}")
        return 0 if ok else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if prometheus is not None:
            prometheus.stop()
        service.stop()
        if os.environ.get("ROLLBACKD_DEMO_KEEP"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
