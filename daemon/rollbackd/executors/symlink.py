"""``symlink``: atomically repoint ``current`` to ``versions/<to_version>``, then restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import Field

from rollbackd.executors.base import (
    Executor,
    ExecutorSpec,
    RollbackContext,
    StepResult,
    UnsafeValueError,
)
from rollbackd.executors.placeholders import substitute
from rollbackd.executors.process import base_environment, format_seconds, run_process


class SymlinkExecutor(ExecutorSpec):
    type: Literal["symlink"]
    link: str = Field(min_length=1, description="the `current` symlink, /srv/app/current")
    versions_dir: str = Field(min_length=1, description="holds one directory per version")
    restart: list[str] = Field(
        default_factory=list,
        description='argv run after the switch: ["systemctl", "restart", "app"]',
    )

    def templates(self) -> list[str]:
        return list(self.restart)

    def needs_target(self) -> bool:
        return True

    def runner(self) -> SymlinkRun:
        return SymlinkRun(self)


class SwitchRefused(Exception):
    """The link was not touched; the message says why."""


def _switch(link: Path, versions_dir: Path, version: str) -> tuple[Path, str | None]:
    """Point ``link`` at ``versions_dir/version``; return the target and the old target.

    The new link is made under a temporary name beside the old one and renamed over it, and
    rename(2) replaces atomically: at every moment ``link`` resolves to the old version or
    the new one, never to nothing.
    """
    try:
        root = versions_dir.resolve(strict=True)
    except OSError as exc:
        raise SwitchRefused(f"versions_dir {versions_dir}: {exc.strerror or exc}") from None
    # The version string was checked already; resolving and comparing also catches a
    # symlink inside versions_dir that leads out of it.
    target = (root / version).resolve()
    if target == root or not target.is_relative_to(root):
        raise SwitchRefused(f"{versions_dir / version} leads outside {versions_dir}")
    if not target.is_dir():
        raise SwitchRefused(f"{versions_dir / version} is not a directory")
    previous: str | None = None
    if link.is_symlink():
        previous = str(link.readlink())
    elif link.exists():
        raise SwitchRefused(f"{link} exists and is not a symlink; not replacing it")
    if not link.parent.is_dir():
        raise SwitchRefused(f"{link.parent} is not a directory")
    temporary = link.with_name(f".{link.name}.rollbackd-{uuid.uuid4().hex}")
    try:
        temporary.symlink_to(target, target_is_directory=True)
        temporary.replace(link)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise SwitchRefused(f"cannot repoint {link}: {exc.strerror or exc}") from None
    _sync_directory(link.parent)
    return target, previous


def _sync_directory(directory: Path) -> None:
    # Without it, a crash soon after could bring the old link back on reboot.
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


class SymlinkRun(Executor[SymlinkExecutor]):
    """Repoints the link, then runs ``restart`` (if any) in the time that is left.

    A restart that fails does not switch the link back: the old version was the bad one,
    and guessing what state a half-restarted service is in is the operator's call.
    """

    async def run(self, context: RollbackContext) -> StepResult:
        started = time.monotonic()
        spec = self.spec
        try:
            context.check()
        except UnsafeValueError as exc:
            return StepResult(ok=False, summary=f"refused: {exc}; nothing was changed")
        if not context.to_version:
            return StepResult(ok=False, summary="refused: no to_version; nothing was changed")
        link = Path(spec.link)
        try:
            target, previous = await asyncio.to_thread(
                _switch, link, Path(spec.versions_dir), context.to_version
            )
        except SwitchRefused as exc:
            return StepResult(
                ok=False,
                summary=f"refused: {exc}; nothing was changed",
                duration=time.monotonic() - started,
            )
        switched = f"{link} -> {target}"
        if previous is not None and previous != str(target):
            switched += f" (was {previous})"
        if not spec.restart:
            return StepResult(ok=True, summary=switched, duration=time.monotonic() - started)

        values = context.placeholders()
        argv = [substitute(arg, values) for arg in spec.restart]
        timeout = spec.timeout.total_seconds()
        remaining = timeout - (time.monotonic() - started)
        if remaining <= 0:
            return StepResult(
                ok=False,
                summary=f"{switched}; link stays switched; restart not run: "
                f"timed out after {format_seconds(timeout)}",
                duration=time.monotonic() - started,
                timed_out=True,
                command=tuple(argv),
            )
        result = await run_process(
            argv, env={**base_environment(), **context.environment()}, timeout=remaining
        )
        if result.ok:
            summary = f"{switched}; restart {result.summary()}"
        else:
            summary = f"{switched}; link stays switched; restart failed: {result.summary()}"
        return StepResult(
            ok=result.ok,
            summary=summary,
            stdout_tail=result.stdout_tail,
            stderr_tail=result.stderr_tail,
            duration=time.monotonic() - started,
            timed_out=result.timed_out,
            command=result.argv,
        )

    def describe(self) -> str:
        return f"symlink {self.spec.link}"
