"""Verification: after an executor succeeded, prove the service is healthy again.

Two things must hold: ``version_query`` (if any) reads the target version within
``[verify] version_timeout``, and for ``[verify] window`` none of the service's rollback
checks fires under its own rule, judged afresh (states from before the rollback would
carry the bad release's breaches).

Only what happened after the switch (the executor finishing) is judged: every range window
of every check is shortened to the whole seconds elapsed since then (:func:`window_cap`).
A whole-service check's ``rate(...[1m])`` would otherwise still hold the bad release's
requests and fail every correct rollback for a minute. A ``query`` check's own PromQL is
run as written (see ``QueryCheck.queries``).

Quiet is not health. Early on a shortened window holds fewer than two samples (no data:
a gap, even for a check with ``on_no_data = "breach"``), and a service may get no traffic
at all: a check verifies only once an evaluation after the switch was judged OK with data.
When the window ends without that, judging goes on for up to ``[verify] version_timeout``
longer; a check still without such an evaluation then fails verification ("could not
verify"), as does one whose queries failed the whole time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from rollbackd.checks.base import Action, CheckSpec
from rollbackd.checks.judge import Measurement
from rollbackd.config.loader import Service
from rollbackd.core.check_state import (
    CheckState,
    Errored,
    Judged,
    OnMissing,
    Policy,
    Transition,
    step_check,
)
from rollbackd.core.samples import Verdict
from rollbackd.runtime.engine import Engine

MIN_WINDOW = timedelta(seconds=1)
"""The shortest range window verification queries: PromQL ranges are written in whole
seconds here, and a shorter one could not hold two samples of any usual scrape interval."""


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    reason: str
    reached_version: bool = True
    """False when version_query never read the target: the rollback did not take effect."""


Sleep = Callable[[float], Awaitable[None]]


def window_cap(since: float, now: float) -> timedelta:
    """The longest range window, evaluated at ``now``, that holds only samples taken at or
    after ``since`` (the switch): the whole seconds elapsed, rounded DOWN, at least
    :data:`MIN_WINDOW`. Rounding up would reach back up to a second before the switch,
    where the last scrape of the bad release usually is, and the rate between it and the
    first scrape after the switch counts the bad release's last requests."""
    return max(timedelta(seconds=math.floor(max(now - since, 0.0))), MIN_WINDOW)


@dataclass
class _Evidence:
    """What verification has seen of one check since the switch."""

    answered: bool = False
    """At least one evaluation whose queries did not fail."""
    healthy: bool = False
    """At least one evaluation judged OK, with data (traffic at or above ``min_rate``)."""
    last: str = ""
    """The reason of the latest evaluation, for the failure message."""

    def saw(self, measurements: list[Measurement], errored: bool) -> None:
        self.answered |= not errored
        self.healthy |= any(m.verdict is Verdict.OK for m in measurements)
        if measurements:
            self.last = measurements[0].reason


class Verifier:
    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.sleep = sleep

    async def verify(
        self, service: Service, to_version: str | None, *, since: float | None = None
    ) -> VerifyResult:
        """``since``: when the switch happened (the executor finished); ``None`` is now.
        Only samples from then on are judged."""
        rules = service.rules
        called = self.clock()
        # A switch in the future (a clock step) would keep the first evaluation waiting.
        switched = called if since is None else min(since, called)
        checks = [c for c in rules.check if c.action is Action.ROLLBACK]
        step = min((c.interval.total_seconds() for c in rules.check), default=5.0)
        if rules.service.version_query and to_version is not None:
            deadline = called + rules.verify.version_timeout.total_seconds()
            while True:
                current = await self.engine.read_running_version(service, self.clock())
                if current == to_version:
                    break
                if self.clock() >= deadline:
                    return VerifyResult(
                        False,
                        f"version reads {current!r}, not {to_version!r}, after "
                        f"{rules.verify.version_timeout.total_seconds():g}s",
                        reached_version=False,
                    )
                await self.sleep(step)
        # The shortest window still reaches back before the switch until a second has passed.
        first = switched + MIN_WINDOW.total_seconds()
        if checks and self.clock() < first:
            await self.sleep(first - self.clock())
        return await self._judge(service, to_version, checks, switched, step)

    async def _judge(
        self,
        service: Service,
        to_version: str | None,
        checks: Sequence[CheckSpec],
        switched: float,
        step: float,
    ) -> VerifyResult:
        rules = service.rules
        window = rules.verify.window.total_seconds()
        longer = rules.verify.version_timeout.total_seconds()
        states = {c.name: CheckState() for c in checks}
        seen = {c.name: _Evidence() for c in checks}
        started = self.clock()
        end = started + window
        extended = False
        while True:
            now = self.clock()
            cap = window_cap(switched, now)
            running = await self._running(service, to_version, now)
            for check in checks:
                measurements = await self.engine.evaluate(
                    service, check, now, window_cap=cap, version=running
                )
                errored = [m for m in measurements if m.verdict is Verdict.ERROR and not m.labels]
                seen[check.name].saw(measurements, bool(errored))
                outcome: Errored | Judged = (
                    Errored(errored[0].reason)
                    if errored
                    else Judged({m.labels: m.verdict for m in measurements})
                )
                states[check.name], changes = step_check(
                    states[check.name],
                    outcome,
                    datetime.fromtimestamp(now, tz=UTC),
                    _policy(check, cap),
                )
                if any(c.transition is Transition.FIRED for c in changes):
                    reason = next(
                        (m.reason for m in measurements if m.verdict is Verdict.BREACH),
                        measurements[0].reason,
                    )
                    return VerifyResult(False, f"check {check.name} fired again: {reason}")
            proven = all(e.healthy for e in seen.values())
            if now >= end and (proven or now >= end + longer):
                break
            extended = now >= end
            until = end + longer if extended else end
            await self.sleep(min(step, max(until - self.clock(), 0.0)))
        judged = now - started
        if not proven:
            return VerifyResult(False, _unproven(seen, judged))
        result = _held(service, to_version, window)
        if extended:
            late = f"data after the switch came {judged - window:.0f}s after the window"
            return VerifyResult(True, f"{result.reason} ({late})")
        return result

    async def _running(self, service: Service, to_version: str | None, now: float) -> str | None:
        """The version judged as running: the one version_query answers now (read, not
        recorded: the daemon's own polls record it), else the target, else the version
        the daemon tracks."""
        running = await self.engine.read_running_version(service, now)
        if running is None:
            running = to_version if service.rules.service.version_query else None
        return running or self.engine.versions.current(service.name)


def _policy(check: CheckSpec, cap: timedelta) -> Policy:
    """The check's own rule, except that no data counts as a gap while its window is
    clipped, even with ``on_no_data = "breach"``: a window shortened to the first seconds
    after the switch may hold fewer than two samples however healthy the service is."""
    policy = check.policy()
    window = check.rate_window()
    if window is not None and cap < window:
        return replace(policy, on_no_data=OnMissing.IGNORE)
    return policy


def _held(service: Service, to_version: str | None, window: float) -> VerifyResult:
    version = f"version reads {to_version}; " if service.rules.service.version_query else ""
    return VerifyResult(True, f"{version}checks held for {window:g}s")


def _unproven(seen: dict[str, _Evidence], judged: float) -> str:
    blind = [name for name, e in seen.items() if not e.answered]
    quiet = [(name, e.last) for name, e in seen.items() if e.answered and not e.healthy]
    parts = []
    if blind:
        parts.append(f"queries of {', '.join(blind)} failed the whole window")
    parts.extend(
        f"{name} had no data after the switch in {judged:.0f}s of judging (last: {last})"
        for name, last in quiet
    )
    return "could not verify: " + "; ".join(parts)
