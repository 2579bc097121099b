"""HA failover: a bad release with the service's holder SIGKILLed at the release, against
the same release with no failure; three real daemons on one real PostgreSQL.

What one repetition does (a fresh database each, so that no guard, bake or lease of an
earlier repetition counts):

1. starts ``--daemons`` real ``rollbackd run`` processes (``tests/support/daemon_process.py``)
   on one PostgreSQL (``tests/support/postgres.py``), members ``daemon-0`` ... with
   ``lease_time`` L, watching one service, ``checkout``: the fake service
   (``tests/support/fake_service.py``, 10 requests/s) scraped by a real Prometheus every
   1 s, and judged by the error-rate check of ``tests/support/configs.py``
   ``checkout_rules`` (every 1 s, 10 s window, above 10 %, 2 breaches; rolled back by
   ``tests/support/deploy.py``, verified for 2 s);
2. waits until the daemon the fair split gives ``checkout`` to holds its lease, has
   evaluated it, and 1.0.0 is baked (the last known good);
3. at t0 switches the fake service to a bad ``2.0.<rep>`` (50 % errors) and, in the
   ``kill`` case, SIGKILLs the holder right after;
4. until the rollback has succeeded, polls every 50 ms each other daemon's
   ``rollbackd_check_evaluations_total`` for ``checkout`` on its ``/metrics``: the first
   rise is "first evaluation by the new holder"; the new lease's ``acquired_at`` (the
   database's clock), the ``check.breach`` event and the rollback's ``finished_at`` come
   from the database afterwards (one host: every clock is the same).

Measured: (a) holder killed -> first evaluation of ``checkout`` by another daemon, and the
lease's takeover; (b) t0 -> rollback succeeded, ``kill`` against ``none``. Each
``--lease-times`` value (default 10 s, the shipped default, and 3 s, the least allowed),
each case, ``--reps`` times, interleaved. It prints one line per repetition, a summary
(median and max) and one JSON line (``--json-out`` appends it to a file too), with the load
averages (``os.getloadavg``, as ``uptime`` shows them) before each repetition.

A benchmark, not a test: nothing asserts a time. Run from the repository root::

    .venv/bin/python bench/ha_failover.py
    .venv/bin/python bench/ha_failover.py --lease-times 3 --reps 3 --daemons 2

Needs the project's virtualenv, Debian's ``prometheus`` and ``postgresql``
(``bash scripts/setup.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from check_scale import evaluations_by_service, machine, metric_sums  # noqa: E402

from rollbackd.runtime.leases import assign  # noqa: E402
from support.configs import checkout_rules, write_config  # noqa: E402
from support.daemon_process import DaemonProcess  # noqa: E402
from support.fake_service import FakeService  # noqa: E402
from support.postgres import Database, PostgresServer  # noqa: E402
from support.prometheus import PrometheusServer, ScrapeTarget, poll  # noqa: E402

SERVICE = "checkout"
POLL = 0.05


@dataclass
class Rep:
    """One repetition. Times in seconds from t0 (the release), None when it never came."""

    lease_time: float
    case: str
    """``kill`` (the holder SIGKILLed at the release) or ``none``."""
    rep: int
    holder: str
    load_before: tuple[float, float, float]
    killed_after: float | None = None
    first_eval_by_other: float | None = None
    """t0 -> the first evaluation of the service by a daemon other than the first holder."""
    new_holder: str | None = None
    lease_acquired: float | None = None
    """t0 -> the new lease's ``acquired_at`` (the database's clock)."""
    breach: float | None = None
    rollback_succeeded: float | None = None
    rollbacks: int = 0


class Member(DaemonProcess):
    """``rollbackd run`` as ``member`` of the shared store."""

    def __init__(self, config: Path, member: str) -> None:
        super().__init__(config)
        self.member = member

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def metrics(self, http: httpx.Client) -> str:
        return http.get(f"{self.url}/metrics", timeout=10).text


def rows(database: Database, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(database.url, password=database.password) as conn:
        return [tuple(row) for row in conn.execute(sql, params).fetchall()]


def store_section(database: Database, member: str, lease_time: float) -> str:
    return (
        f'\n[store]\nurl = "{database.url}"\npassword_file = "{database.password_file}"\n'
        f'lease_time = "{lease_time:g}s"\nmember = "{member}"\n'
    )


def start_members(
    workdir: Path,
    database: Database,
    prometheus: PrometheusServer,
    args: argparse.Namespace,
    lease_time: float,
    fake: FakeService,
    started: list[Member],
) -> None:
    """The daemons, appended to ``started`` as they start (for the caller to stop)."""
    log = workdir / "deploys.jsonl"
    rules = {SERVICE: checkout_rules(f"{fake.url}/control", log)}
    for k in range(args.daemons):
        directory = workdir / f"daemon-{k}"
        directory.mkdir()
        extra = store_section(database, f"daemon-{k}", lease_time)
        member = Member(write_config(directory, prometheus.url, rules, extra=extra), f"daemon-{k}")
        started.append(member)
        member.start(timeout=60)


def await_ready(database: Database, holder: Member, members: list[Member]) -> None:
    """The fair owner holds the lease (by the database's clock), has evaluated the
    service, and 1.0.0 is baked."""

    def ready() -> bool:
        for member in members:
            member.assert_alive()
        lease = rows(
            database,
            "SELECT holder FROM leases WHERE service = %s"
            " AND expires_at > extract(epoch FROM clock_timestamp())",
            SERVICE,
        )
        if lease != [(holder.member,)]:
            return False
        with httpx.Client() as http:
            text = holder.metrics(http)
        if metric_sums(text, {"rollbackd_leases_held"})["rollbackd_leases_held"] != 1:
            return False
        if evaluations_by_service(text).get(SERVICE, 0.0) == 0:
            return False
        baked = rows(
            database,
            "SELECT 1 FROM versions WHERE service = %s AND version = '1.0.0'"
            " AND baked_at IS NOT NULL",
            SERVICE,
        )
        return bool(baked)

    poll(ready, timeout=120, interval=0.2, what=f"{holder.member} to hold {SERVICE}, 1.0.0 baked")


def one_rep(
    args: argparse.Namespace,
    pg: PostgresServer,
    prometheus: PrometheusServer,
    fake: FakeService,
    lease_time: float,
    case: str,
    rep: int,
    index: int,
) -> Rep:
    fake.update(version="1.0.0", error_ratio=0.0)
    database = pg.create_database(f"failover_{index}")
    workdir = Path(tempfile.mkdtemp(prefix=f"ha-failover-{index}-"))
    members: list[Member] = []
    try:
        start_members(workdir, database, prometheus, args, lease_time, fake, members)
        owner = assign([SERVICE], [m.member for m in members])
        [holder] = [m for m in members if owner[m.member]]
        others = [m for m in members if m is not holder]
        await_ready(database, holder, members)
        result = Rep(lease_time, case, rep, holder.member, os.getloadavg())
        with httpx.Client() as http:
            before = {
                m.member: evaluations_by_service(m.metrics(http)).get(SERVICE, 0.0) for m in others
            }
            t0 = time.time()
            fake.update(version=f"2.0.{index}", error_ratio=0.5)
            if case == "kill":
                holder.kill()
                result.killed_after = time.time() - t0
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                now = time.time()
                if case == "kill" and result.first_eval_by_other is None:
                    for member in others:
                        seen = evaluations_by_service(member.metrics(http)).get(SERVICE, 0.0)
                        if seen > before[member.member]:
                            result.first_eval_by_other = now - t0
                            result.new_holder = member.member
                            break
                done = rows(
                    database,
                    "SELECT finished_at FROM rollbacks WHERE service = %s AND state = 'succeeded'",
                    SERVICE,
                )
                if done and (case == "none" or result.first_eval_by_other is not None):
                    result.rollback_succeeded = float(done[0][0]) - t0
                    break
                time.sleep(POLL)
        read_database_times(database, result, t0)
        return result
    finally:
        for member in members:
            with contextlib.suppress(Exception):
                member.stop()
        with contextlib.suppress(Exception):
            pg.drop_database(database.name)


def read_database_times(database: Database, result: Rep, t0: float) -> None:
    breach = rows(
        database,
        "SELECT min(at) FROM events WHERE service = %s AND type = 'check.breach' AND at >= %s",
        SERVICE,
        t0,
    )
    if breach and breach[0][0] is not None:
        result.breach = float(breach[0][0]) - t0
    lease = rows(
        database,
        "SELECT holder, acquired_at, epoch FROM leases WHERE service = %s",
        SERVICE,
    )
    if result.case == "kill" and lease and str(lease[0][0]) != result.holder:
        result.lease_acquired = float(lease[0][1]) - t0
    [(count,)] = rows(database, "SELECT count(*) FROM rollbacks WHERE service = %s", SERVICE)
    result.rollbacks = int(count)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def line(r: Rep) -> str:
    load = " ".join(f"{x:.2f}" for x in r.load_before)
    return (
        f"L={r.lease_time:g}s {r.case:>4} #{r.rep}: holder {r.holder}"
        f" -> {r.new_holder or '-'}; first eval by other {_fmt(r.first_eval_by_other)} s,"
        f" lease taken {_fmt(r.lease_acquired)} s, breach {_fmt(r.breach)} s,"
        f" rollback succeeded {_fmt(r.rollback_succeeded)} s, rollbacks {r.rollbacks};"
        f" load {load}"
    )


@dataclass
class Summary:
    lease_time: float
    case: str
    what: str
    n: int
    median: float | None
    max: float | None
    values: list[float]


def summarise(reps: list[Rep]) -> list[Summary]:
    out: list[Summary] = []
    keys = sorted({(r.lease_time, r.case) for r in reps}, key=lambda k: (-k[0], k[1]))
    fields = ("first_eval_by_other", "lease_acquired", "breach", "rollback_succeeded")
    for lease_time, case in keys:
        group = [r for r in reps if (r.lease_time, r.case) == (lease_time, case)]
        for name in fields:
            if case == "none" and name in ("first_eval_by_other", "lease_acquired"):
                continue
            values = [v for r in group if (v := getattr(r, name)) is not None]
            out.append(
                Summary(
                    lease_time,
                    case,
                    name,
                    len(values),
                    round(statistics.median(values), 2) if values else None,
                    round(max(values), 2) if values else None,
                    [round(v, 2) for v in values],
                )
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--lease-times", type=float, nargs="+", default=[10.0, 3.0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per lease time, case")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per repetition")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    info = machine()
    print("machine:", json.dumps(info), flush=True)
    reps: list[Rep] = []
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(PostgresServer())
        fake = stack.enter_context(FakeService(SERVICE, "1.0.0"))
        prometheus = stack.enter_context(
            PrometheusServer(targets=[ScrapeTarget(fake.address)], scrape_interval="1s")
        )
        prometheus.wait_for(f'app_build_info{{service="{SERVICE}", version="1.0.0"}}')
        index = 0
        for rep in range(1, args.reps + 1):
            for lease_time in args.lease_times:
                for case in ("none", "kill"):
                    index += 1
                    result = one_rep(args, pg, prometheus, fake, lease_time, case, rep, index)
                    reps.append(result)
                    print(line(result), flush=True)
    summary = summarise(reps)
    print()
    for s in summary:
        print(
            f"L={s.lease_time:g}s {s.case:>4} {s.what:>20}: n={s.n} median {_fmt(s.median)} s,"
            f" max {_fmt(s.max)} s  {s.values}"
        )
    record = {
        "bench": "ha_failover",
        "machine": info,
        "daemons": args.daemons,
        "reps": [asdict(r) for r in reps],
        "summary": [asdict(s) for s in summary],
    }
    text = json.dumps(record)
    print(text)
    if args.json_out:
        with args.json_out.open("a") as out:
            out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
