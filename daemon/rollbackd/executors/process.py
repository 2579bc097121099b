"""Run one program for an executor: no shell, bounded output, and a hard stop at the timeout.

Every executor that runs a program (``command``, ``symlink``'s restart, ``kubectl``, ``helm``,
``git``) goes through :func:`run_process`, so the rules live in one place:

* the program runs directly from its argv (``create_subprocess_exec``), never through a shell,
  so placeholder values such as a reason holding ``; rm -rf /`` stay one literal argument;
* it leads its own process group (``start_new_session=True``), so a timeout or a cancellation
  stops everything it started, not just the first process;
* stdin is ``/dev/null`` (a program that prompts gets EOF rather than waiting forever);
* only the last ``tail_bytes`` of stdout and of stderr are kept, however much is written;
* ``env`` is used as given. Callers pass a minimal environment, not the daemon's own, which
  may hold secrets such as API tokens: the ``command`` executor passes
  :func:`base_environment` (``PATH``, ``HOME``, ``LANG``) plus the ``ROLLBACKD_*`` variables of
  :meth:`RollbackContext.environment` (``ROLLBACKD_FENCING_TOKEN`` among them) plus the
  spec's ``env``.

A program that cannot be started is an ordinary failure, reported in
:attr:`ProcessResult.error`; :func:`run_process` does not raise for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from rollbackd.core.durations import format_duration
from rollbackd.executors.base import StepResult

DEFAULT_TAIL_BYTES = 16384
"""How much of each of stdout and stderr is kept for the audit record."""

BASE_ENVIRONMENT_KEYS = ("PATH", "HOME", "LANG")
"""The daemon's variables a program inherits; everything else must be passed on purpose."""

_FALLBACK_PATH = "/usr/local/bin:/usr/bin:/bin"

DEFAULT_PIPE_GRACE = 2.0
"""After the program exits, how long to wait for its pipes to close. A background process it
left behind on purpose (``nohup app &`` in a restart script) may hold them open for ever; it is
not ours to kill, so we stop reading instead."""

_REAP_WAIT = 5.0
"""After SIGKILL, how long to wait for the exit to be noticed. SIGKILL cannot be ignored, but a
process stuck in uninterruptible I/O only dies when that I/O ends; we do not wait for that."""


_GROUP_POLL = 0.05


def base_environment() -> dict[str, str]:
    """``PATH``, ``HOME`` and ``LANG`` from the daemon's environment, for a child to build on.

    ``PATH`` falls back to a standard one so that ``argv[0]`` without a slash is still found.
    """
    env = {key: os.environ[key] for key in BASE_ENVIRONMENT_KEYS if key in os.environ}
    env.setdefault("PATH", _FALLBACK_PATH)
    return env


def format_seconds(seconds: float) -> str:
    """``5s``, ``1m30s``, ``500ms``: a timeout as it is written in a rule file."""
    return format_duration(timedelta(seconds=seconds))


@dataclass(frozen=True)
class ProcessResult:
    """What happened to one program run."""

    returncode: int | None
    """The exit status; negative for a signal (``-9``); ``None`` if it never ran or its exit was
    never seen (killed but stuck in the kernel)."""
    stdout_tail: str
    stderr_tail: str
    timed_out: bool
    duration: float
    """Seconds from start to finish, including the kill when it timed out."""
    argv: tuple[str, ...]
    error: str | None = None
    """Why the program could not be started (``cannot run /x: No such file or directory``)."""
    timeout: float = 0.0
    """The timeout it ran under, for :meth:`summary`."""

    @property
    def ok(self) -> bool:
        """Started, finished within the timeout, and exited 0."""
        return self.error is None and not self.timed_out and self.returncode == 0

    def summary(self) -> str:
        """One line for a :class:`StepResult`: ``exit 0``, ``exit 3``, ``killed by SIGKILL``,
        ``timed out after 5s; process group killed``, ``cannot run /x: ...``."""
        if self.error is not None:
            return self.error
        if self.timed_out:
            return f"timed out after {format_seconds(self.timeout)}; process group killed"
        if self.returncode is None:
            return "exit status unknown"
        if self.returncode < 0:
            return f"killed by {_signal_name(-self.returncode)}"
        return f"exit {self.returncode}"

    def step_result(self, *, ok: bool | None = None, summary: str | None = None) -> StepResult:
        """This run as an executor's :class:`StepResult` (``ok`` and ``summary`` overridable,
        for an executor that adds to the one line or judges success differently)."""
        return StepResult(
            ok=self.ok if ok is None else ok,
            summary=self.summary() if summary is None else summary,
            stdout_tail=self.stdout_tail,
            stderr_tail=self.stderr_tail,
            duration=self.duration,
            timed_out=self.timed_out,
            command=self.argv,
        )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class _TailProtocol(asyncio.SubprocessProtocol):
    """Keeps the last ``tail_bytes`` of stdout and stderr and notices exit and pipe close.

    The event loop hands over output as it arrives, and a too-long buffer is trimmed at once,
    so a program writing gigabytes costs ``2 * tail_bytes`` of memory. A protocol rather than
    ``Process.wait()``: the exit must be seen even while a leftover grandchild holds a pipe
    open, and ``wait()`` may wait for the pipes as well.
    """

    def __init__(self, tail_bytes: int) -> None:
        loop = asyncio.get_running_loop()
        self._tail_bytes = tail_bytes
        self.buffers = {1: bytearray(), 2: bytearray()}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        buffer = self.buffers.get(fd)
        if buffer is None:
            return
        if self._tail_bytes <= 0:
            return
        if len(data) >= self._tail_bytes:
            buffer[:] = data[-self._tail_bytes :]
            return
        buffer += data
        if len(buffer) > self._tail_bytes:
            del buffer[: len(buffer) - self._tail_bytes]

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def tail(self, fd: int) -> str:
        # The cut may fall inside a multi-byte character; "replace" keeps the rest readable.
        return bytes(self.buffers[fd]).decode("utf-8", errors="replace")


async def _within(future: asyncio.Future[Any], seconds: float) -> bool:
    """Whether ``future`` completes within ``seconds``; never cancels it."""
    if future.done():
        return True
    if seconds <= 0:
        return False
    try:
        await asyncio.wait_for(asyncio.shield(future), seconds)
    except TimeoutError:
        return False
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # The group outlives its leader while any member is alive, and Linux does not reuse a
    # pid that is still a process group id, so this cannot reach an unrelated group while
    # anything of ours is left to kill.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg also succeeds for zombies, which stay until their new parent reaps them; a
    # container's init may do that seldom or never, and a zombie needs no grace.
    proc = Path("/proc")
    try:
        entries = list(proc.iterdir())
    except OSError:
        return True
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after its last ")"
        # are fixed: state, ppid, pgrp, ...
        fields = stat[stat.rfind(")") + 1 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


async def _group_gone(pgid: int, seconds: float) -> bool:
    """Whether every process in the group exits within ``seconds``.

    There is no event for "group empty", so this polls; it only runs after a timeout.
    """
    deadline = time.monotonic() + seconds
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_GROUP_POLL)
    return True


def _start_error(exc: OSError | ValueError, argv: tuple[str, ...], cwd: str | None) -> str:
    if isinstance(exc, ValueError):
        # Popen refuses NUL bytes in arguments and environment values.
        return f"cannot run {argv[0]}: {exc}"
    if cwd is not None and exc.filename == cwd:
        return f"cannot run {argv[0]}: working directory {cwd}: {exc.strerror}"
    return f"cannot run {argv[0]}: {exc.strerror or exc}"


async def _stop_group(pgid: int, protocol: _TailProtocol, kill_grace: float) -> None:
    """SIGTERM to the whole group, then SIGKILL to what is left after ``kill_grace``."""
    _signal_group(pgid, signal.SIGTERM)
    grace_end = time.monotonic() + kill_grace
    # The leader may die on SIGTERM while a child that ignores it carries on, so the
    # grace is over only when the whole group is gone (all pipes closed first: cheap
    # to wait for, and the usual case).
    await _within(protocol.closed, kill_grace)
    if not await _group_gone(pgid, grace_end - time.monotonic()):
        _signal_group(pgid, signal.SIGKILL)
        # Signals are delivered asynchronously: wait, so that on return the whole
        # group is gone (or stuck in the kernel, which no signal can help).
        await _within(protocol.exited, _REAP_WAIT)
        await _group_gone(pgid, _REAP_WAIT)


async def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float,
    kill_grace: float = 5.0,
    tail_bytes: int = DEFAULT_TAIL_BYTES,
    pipe_grace: float = DEFAULT_PIPE_GRACE,
) -> ProcessResult:
    """Run ``argv`` without a shell and report how it ended; never raises for the program.

    ``env`` is the complete environment of the program (``None`` inherits the daemon's,
    which executors should not do: see :func:`base_environment`). At ``timeout`` seconds the
    whole process group gets SIGTERM, then SIGKILL ``kill_grace`` seconds later. Cancelling
    the awaiting task SIGKILLs the group at once and re-raises. When it finishes on its own,
    nothing is killed: output is read for at most ``pipe_grace`` more seconds, for whatever
    it left running in the background still holding its stdout or stderr.
    """
    args = tuple(argv)
    if not args:
        raise ValueError("run_process needs at least a program name")
    loop = asyncio.get_running_loop()
    started = time.monotonic()

    def finish(
        returncode: int | None,
        protocol: _TailProtocol | None,
        *,
        timed_out: bool = False,
        error: str | None = None,
    ) -> ProcessResult:
        return ProcessResult(
            returncode=returncode,
            stdout_tail=protocol.tail(1) if protocol else "",
            stderr_tail=protocol.tail(2) if protocol else "",
            timed_out=timed_out,
            duration=time.monotonic() - started,
            argv=args,
            error=error,
            timeout=timeout,
        )

    protocol = _TailProtocol(tail_bytes)
    try:
        transport, _ = await loop.subprocess_exec(
            lambda: protocol,
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        return finish(None, None, error=_start_error(exc, args, cwd))

    pgid = transport.get_pid()  # start_new_session: the leader's pid is the group id
    timed_out = False
    try:
        if not await _within(protocol.exited, timeout - (time.monotonic() - started)):
            timed_out = True
            await _stop_group(pgid, protocol, kill_grace)
        await _within(protocol.closed, pipe_grace)
        return finish(transport.get_returncode(), protocol, timed_out=timed_out)
    except asyncio.CancelledError:
        _signal_group(pgid, signal.SIGKILL)
        raise
    finally:
        # Stops reading whatever pipes are still open; the transport also kills the leader if
        # it somehow still runs.
        transport.close()
