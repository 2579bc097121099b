"""An executor that hangs, ignores SIGTERM, floods stdout and leaves a grandchild behind,
run by `rollbackd run` as part of a real rollback: the timeout kills its whole process
group, the record keeps a bounded tail of what it wrote, the daemon's memory does not follow
the flood, and the next executor in the chain rolls the service back."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from support.configs import write_config
from support.daemon_process import DaemonProcess, executions, recorder
from support.prometheus import poll

pytestmark = pytest.mark.faults

TAIL_BYTES = 16384  # rollbackd.executors.process.DEFAULT_TAIL_BYTES

# Ignores SIGTERM, starts a grandchild that ignores it too (and says its pid), then writes
# to stdout and stderr as fast as it can, forever.
HOSTILE = """
import os, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    "while True: time.sleep(1)"])
open(sys.argv[1], "w").write(str(child.pid))
line = b"x" * 65535 + b"\\n"
while True:
    sys.stdout.buffer.write(line)
    sys.stderr.buffer.write(line[:1024])
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0 until reaped; it runs nothing.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_a_hostile_executor_is_killed_with_its_group_and_the_chain_goes_on(
    tmp_path: Path,
) -> None:
    log = tmp_path / "runs.jsonl"
    grandchild_file = tmp_path / "grandchild.pid"
    hostile = [sys.executable, "-c", HOSTILE, str(grandchild_file)]
    rules = f"""
[service]
name = "api"
rollback_window = "1h"

[[rollback]]
type = "command"
argv = {json.dumps(hostile)}
timeout = "1s"

{recorder(log, target=False)}

[verify]
window = "100ms"

[[alert]]
alertname = "ApiDown"
"""
    config = write_config(tmp_path, "http://127.0.0.1:9", {"api": rules})
    with DaemonProcess(config) as daemon, daemon.http() as api:
        assert daemon.process is not None
        before = rss_kib(daemon.process.pid)
        answer = api.post("/api/v1/rollbacks", json={"service": "api", "reason": "flood test"})
        assert answer.status_code == 202, answer.text
        rollback_id = answer.json()["rollback"]["id"]
        daemon.await_rows(
            "SELECT id FROM rollbacks WHERE id = ? AND state = 'succeeded'",
            rollback_id,
            what="the chain to roll back through its second executor",
        )
        after = rss_kib(daemon.process.pid)

        steps = daemon.rows(
            "SELECT kind, ok, summary, length(CAST(stdout_tail AS BLOB)), "
            "length(CAST(stderr_tail AS BLOB)) FROM rollback_steps WHERE rollback_id = ? "
            "ORDER BY id",
            rollback_id,
        )
        [flooded, second, verify] = steps
        assert flooded[:2] == ("rollback", 0)
        assert "timed out" in flooded[2] and "killed" in flooded[2], flooded[2]
        assert 0 < flooded[3] <= TAIL_BYTES
        assert 0 < flooded[4] <= TAIL_BYTES
        assert second[:2] == ("rollback", 1)
        assert verify[:2] == ("verify", 1)
        assert len(executions(log)) == 1

        # The grandchild ignored SIGTERM too: the group's SIGKILL took it.
        grandchild = int(grandchild_file.read_text())
        poll(lambda: not alive(grandchild), timeout=10, what="the grandchild to be gone")
        # Hundreds of megabytes went through the pipe; the daemon kept 2 x 16 KiB of them.
        assert after - before < 64 * 1024, f"RSS grew from {before} KiB to {after} KiB"
        assert api.get("/healthz").status_code == 200
