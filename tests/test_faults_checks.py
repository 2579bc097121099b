"""Fault injection around checks: a Prometheus that keeps failing for 1,000 polls grows no
threads and no memory and never rolls back; flapping around the threshold for 10 minutes
rolls back at most once."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from rollbackd.core.model import RollbackState
from rollbackd.core.samples import Verdict
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.runner import Runner
from rollbackd.runtime.verify import Verifier
from rollbackd.store.sqlite import Store
from support.configs import load_config
from support.prometheus import PrometheusServer, create_blocks, free_port, poll

pytestmark = [pytest.mark.faults]

RECORD = str(Path(__file__).parent / "support" / "record_run.py")


def rules(name: str, check: str, runs: Path) -> str:
    argv = [sys.executable, RECORD, str(runs), "{to_version}"]
    return (
        f'[service]\nname = "{name}"\nrollback_window = "1h"\n'
        f'[[rollback]]\ntype = "command"\nargv = {json.dumps(argv)}\n'
        '[verify]\nwindow = "10ms"\n'
        f"{check}"
    )


async def test_a_thousand_failed_polls_leak_nothing_and_never_fire(tmp_path: Path) -> None:
    check = (
        '[[check]]\nname = "errors"\ntype = "error_rate"\nerrors = \'code="500"\'\n'
        'above = 0.01\nbreaches = 1\ninterval = "20ms"\n'
    )
    runs = tmp_path / "runs.jsonl"
    port = free_port()
    # The stand-in Prometheus answers 503 as while it starts; it runs in its own process so
    # that only the daemon's memory and threads are measured here.
    server = subprocess.Popen([sys.executable, "-c", UNAVAILABLE, str(port)])
    try:
        poll(lambda: _listening(port), timeout=10)
        loaded = load_config(
            tmp_path,
            f"http://127.0.0.1:{port}",
            {"svc": rules("svc", check, runs)},
            timeout="20ms",
        )
        store = Store(tmp_path / "state.db")
        engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), store)
        pipeline = Pipeline(engine)
        runner = Runner(engine, pipeline.on_fire)
        service = loaded.services["svc"]
        check_spec = service.rules.check[0]
        for i in range(50):  # warm up pools, caches and lazy imports
            await runner.run_check(service, check_spec, 1000.0 + i)
        threads = other_threads()
        gc.collect()  # failed requests leave exception/traceback cycles for the collector
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for i in range(1000):
            evaluation = await runner.run_check(service, check_spec, 2000.0 + i)
            assert evaluation.verdict is Verdict.ERROR
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        # Queries run on asyncio's default pool, bounded by its max_workers; nothing else
        # may start a thread per poll.
        assert other_threads() <= threads
        pool = [t for t in threading.enumerate() if t.name.startswith("asyncio_")]
        assert len(pool) <= min(32, (os.cpu_count() or 1) + 4)
        assert grown < 1_000_000, f"{grown} bytes more after 1,000 failed polls"
        assert engine.check_state("svc", "errors").blind
        assert not engine.check_state("svc", "errors").firing
        assert store.rollbacks() == []
        assert [e.type for e in store.events()] == ["prometheus.unreachable"]
        store.close()
    finally:
        server.kill()
        server.wait()


UNAVAILABLE = """
import http.server, sys

class Starting(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", "19")
        self.end_headers()
        self.wfile.write(b"Service Unavailable")

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Starting).serve_forever()
"""


def other_threads() -> int:
    return sum(1 for t in threading.enumerate() if not t.name.startswith("asyncio_"))


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def flapping_openmetrics(path: Path, start: int, pattern: list[float]) -> None:
    lines = ["# TYPE flappy_error_ratio gauge"]
    lines += [
        f'flappy_error_ratio{{service="flappy"}} {v} {start + 15 * i}'
        for i, v in enumerate(pattern)
    ]
    lines.append("# EOF")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.prometheus
async def test_flapping_for_ten_minutes_rolls_back_at_most_once(tmp_path: Path) -> None:
    start = (int(time.time()) // 60) * 60 - 3 * 3600
    # 10 minutes of 15 s samples: single spikes (never two in a row) for 5 minutes, then
    # spikes in pairs for 5 minutes.
    singles = [0.2 if i % 2 == 0 else 0.0 for i in range(20)]
    pairs = [0.2 if i % 3 != 2 else 0.0 for i in range(20)]
    data = tmp_path / "flappy.om"
    flapping_openmetrics(data, start, singles + pairs)
    prometheus = PrometheusServer(tmp_path / "prometheus")
    create_blocks(data, prometheus.storage_dir)
    prometheus.start()
    try:
        prometheus.wait_ready()
        check = (
            '[[check]]\nname = "flappy"\ntype = "query"\n'
            "query = 'max(flappy_error_ratio{service=\"flappy\"})'\n"
            'above = 0.1\nbreaches = 2\ninterval = "15s"\n'
        )
        runs = tmp_path / "runs.jsonl"
        loaded = load_config(tmp_path, prometheus.url, {"flappy": rules("flappy", check, runs)})
        store = Store(tmp_path / "state.db")
        engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), store)
        now = [float(start)]

        async def advance(seconds: float) -> None:
            now[0] += seconds

        # The verifier judges the same backfilled past as the checks, in simulated time.
        verifier = Verifier(engine, clock=lambda: now[0], sleep=advance)
        pipeline = Pipeline(engine, clock=lambda: now[0], verifier=verifier)
        runner = Runner(engine, pipeline.on_fire)
        await engine.versions.record_release("flappy", "1.0.0", start - 7200)
        store.mark_baked("flappy", "1.0.0", start - 3600)
        await engine.versions.record_release("flappy", "2.0.0", start - 60)
        fired_at: list[float] = []
        for i in range(40):
            at = float(start + 15 * i)
            if at < now[0]:
                continue  # the verification judged this stretch already
            now[0] = at
            [evaluation] = await runner.tick(at)
            if any(c.transition.value == "fired" for c in evaluation.changes):
                fired_at.append(at)
            await pipeline.wait_idle()
        # Single spikes never fired; pairs fired more than once; one rollback ran.
        assert fired_at and min(fired_at) >= start + 15 * 20
        assert len(fired_at) > 1
        [rollback] = store.rollbacks()
        # Still flapping after the switch: verification sees it fire again, and freezes.
        assert rollback.state is RollbackState.FAILED
        assert rollback.outcome.startswith("verification failed: check flappy fired again")
        assert len(runs.read_text().splitlines()) == 1
        assert len(store.triggers(rollback.id)) == len(fired_at) - 1
        store.close()
    finally:
        prometheus.stop()
