"""Store loop lag: how late the event loop wakes while the state store writes to a slow disk.

What it does, for each mode given with ``--modes``:

1. opens a fresh SQLite ``Store`` in a temporary directory, records a release and a running
   rollback, and wraps the store's ``_commit`` so that every commit first sleeps
   ``--commit-delay`` seconds (200 ms: a disk that takes that long to fsync, a loaded
   network volume, a dying SSD);
2. runs, on one asyncio loop, a lag probe (a task that sleeps ``--tick`` seconds in a loop
   and records how late it wakes) beside a workload that resembles the daemon's: three
   coroutines, each every ``--period`` seconds, one saving a check state, one appending an
   audit event, one moving the rollback's state, each followed by reads on the loop (the
   service state, the check states, the latest rollbacks and events, as the API and the
   engine read them);
3. after ``--duration`` seconds stops the workload, waits for the writes asked for, and
   prints a markdown table: the loop lag's p50, p99 and max, the writes and reads done per
   second, and the reads' own p99 latency.

Modes:

* ``before``: every store method called directly on the loop, as the daemon did before
  issue 14: each commit blocks the loop for the whole delay;
* ``after``: writes through ``StoreWriter`` (one writer thread), reads direct on the loop;
* ``after-shared-lock`` (not run by default): as ``after``, but each read first takes the
  write lock, as the store's single connection did before issue 14, to show why reads got
  connections of their own: a read on the loop then waits out the commit in flight.

A benchmark, not a test: nothing asserts a time. The machine may be shared and noisy:
compare figures taken in one run, not across days.

Run from the repository root::

    .venv/bin/python bench/store_loop_lag.py
    .venv/bin/python bench/store_loop_lag.py --modes before after after-shared-lock
    .venv/bin/python bench/store_loop_lag.py --duration 20 --commit-delay 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rollbackd.core.model import Event, RollbackDraft, RollbackState, VersionSource
from rollbackd.store.sqlite import Store
from rollbackd.store.writer import StoreWriter, writer_for

MODES = ("before", "after", "after-shared-lock")
SERVICE = "checkout"


@dataclass
class Samples:
    lag: list[float] = field(default_factory=list)
    """Seconds the probe woke late, one per tick."""
    read: list[float] = field(default_factory=list)
    """Seconds each batch of reads took on the loop."""
    writes: int = 0


@dataclass(frozen=True)
class Result:
    mode: str
    seconds: float
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    writes_per_s: float
    reads_per_s: float
    read_p99_ms: float


def percentile(values: list[float], q: float) -> float:
    """Nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# -- the store under test ------------------------------------------------------------------


def open_store(directory: Path, commit_delay: float, shared_lock: bool) -> Store:
    store = Store(directory / "state.db")
    store.record_version_change(SERVICE, None, "1.0", 1000.0, VersionSource.START)
    store.record_version_change(SERVICE, "1.0", "1.1", 2000.0, VersionSource.DISCOVERED)
    store.create_rollback(
        RollbackDraft(
            service=SERVICE,
            from_version="1.1",
            release_id=2,
            to_version="1.0",
            state=RollbackState.RUNNING,
            source="check",
            automatic=True,
            reason="bench",
            mode="auto",
            trigger={},
            guards=[],
            at=2001.0,
        )
    )
    commit = store._commit

    def slow_commit(conn: sqlite3.Connection) -> None:
        time.sleep(commit_delay)  # the disk's fsync, slowed down
        commit(conn)

    # An instance attribute, so only this store is slowed; set after the seeding above.
    store._commit = slow_commit  # type: ignore[method-assign]
    if shared_lock:
        read = store._read

        @contextlib.contextmanager
        def read_under_write_lock() -> Iterator[sqlite3.Connection]:
            with store._write_lock, read() as conn:
                yield conn

        store._read = read_under_write_lock  # type: ignore[method-assign]
    return store


# -- the workload ----------------------------------------------------------------------------


def reads(store: Store) -> None:
    store.service_state(SERVICE)
    store.check_states()
    store.rollbacks(service=SERVICE, limit=10)
    store.events(service=SERVICE, limit=20)


READS_PER_BATCH = 4


class Workload:
    """The daemon-like coroutines of one mode: writes direct (``writer`` None) or through
    the store's writer."""

    def __init__(self, store: Store, writer: StoreWriter | None, samples: Samples) -> None:
        self.store = store
        self.writer = writer
        self.samples = samples
        self.rollback_id = store.rollbacks(limit=1)[0].id

    async def save_check_state(self, i: int) -> None:
        state = json.dumps({"format": 1, "phase": "pending", "i": i})
        if self.writer is None:
            self.store.save_check_state(SERVICE, f"check-{i % 3}", state, float(i))
        else:
            await self.writer.save_check_state(SERVICE, f"check-{i % 3}", state, float(i))

    async def add_event(self, i: int) -> None:
        event = Event(type="check.breach", at=float(i), service=SERVICE, data={"i": i})
        if self.writer is None:
            self.store.add_event(event)
        else:
            await self.writer.add_event(event)

    async def move_rollback(self, i: int) -> None:
        state = RollbackState.VERIFYING if i % 2 else RollbackState.RUNNING
        if self.writer is None:
            self.store.set_rollback_state(self.rollback_id, state, float(i))
        else:
            await self.writer.set_rollback_state(self.rollback_id, state, float(i))

    async def every(
        self, period: float, stop: asyncio.Event, write: Callable[[int], Awaitable[None]]
    ) -> None:
        """``write`` then the reads, every ``period`` (at once when late, as a check that
        overran its interval)."""
        loop = asyncio.get_running_loop()
        i = 0
        next_at = loop.time()
        while not stop.is_set():
            await write(i)
            self.samples.writes += 1
            started = time.perf_counter()
            reads(self.store)
            self.samples.read.append(time.perf_counter() - started)
            i += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - loop.time()))


async def probe(tick: float, stop: asyncio.Event, samples: Samples) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(tick)
        samples.lag.append(max(0.0, time.perf_counter() - started - tick))


async def run_mode(mode: str, args: argparse.Namespace, directory: Path) -> Result:
    store = open_store(directory, args.commit_delay, shared_lock=mode == "after-shared-lock")
    writer = None if mode == "before" else writer_for(store)
    samples = Samples()
    workload = Workload(store, writer, samples)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(probe(args.tick, stop, samples)),
        *(
            asyncio.create_task(workload.every(args.period, stop, write))
            for write in (workload.save_check_state, workload.add_event, workload.move_rollback)
        ),
    ]
    started = time.perf_counter()
    await asyncio.sleep(args.duration)
    stop.set()
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - started
    if writer is not None:
        writer.close()
    store.close()
    return Result(
        mode=mode,
        seconds=seconds,
        lag_p50_ms=1000 * percentile(samples.lag, 0.50),
        lag_p99_ms=1000 * percentile(samples.lag, 0.99),
        lag_max_ms=1000 * max(samples.lag, default=0.0),
        writes_per_s=samples.writes / seconds,
        reads_per_s=READS_PER_BATCH * len(samples.read) / seconds,
        read_p99_ms=1000 * percentile(samples.read, 0.99),
    )


def table(results: list[Result]) -> str:
    lines = [
        "| mode | loop lag p50 (ms) | p99 (ms) | max (ms) | writes/s | reads/s | read p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.mode} | {r.lag_p50_ms:.1f} | {r.lag_p99_ms:.1f} | {r.lag_max_ms:.1f} "
            f"| {r.writes_per_s:.1f} | {r.reads_per_s:.1f} | {r.read_p99_ms:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["before", "after"])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per mode")
    parser.add_argument(
        "--commit-delay", type=float, default=0.2, help="seconds each commit sleeps first"
    )
    parser.add_argument(
        "--period", type=float, default=0.05, help="seconds between each coroutine's writes"
    )
    parser.add_argument("--tick", type=float, default=0.01, help="the lag probe's sleep")
    args = parser.parse_args()

    results: list[Result] = []
    for mode in args.modes:
        print(f"{mode}: {args.duration:g}s", flush=True)
        with tempfile.TemporaryDirectory(prefix="rollbackd-bench-") as tmp:
            results.append(asyncio.run(run_mode(mode, args, Path(tmp))))
    print()
    print(
        f"commit delay {1000 * args.commit_delay:g} ms; every {1000 * args.period:g} ms each: "
        f"a check-state save, an event, a rollback state change, {READS_PER_BATCH} reads; "
        f"lag probe sleeps {1000 * args.tick:g} ms"
    )
    print()
    print(table(results))
    print()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
