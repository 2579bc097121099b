"""Verification: after an executor succeeded, prove the service is healthy again.

Two things must hold: ``version_query`` (if any) reads the target version within
``[verify] version_timeout``, and for ``[verify] window`` none of the service's rollback
checks fires under its own rule, judged afresh (states from before the rollback would
carry the bad release's breaches). A check that could only answer errors for the whole
window proves nothing: that is a failure too ("could not verify").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from rollbackd.checks.base import Action
from rollbackd.checks.state import CheckState, Errored, Judged, Policy, Transition, step_check
from rollbackd.engine import Engine
from rollbackd.loader import Service
from rollbackd.samples import Verdict


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    reason: str
    reached_version: bool = True
    """False when version_query never read the target: the rollback did not take effect."""


Sleep = Callable[[float], Awaitable[None]]


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

    async def verify(self, service: Service, to_version: str | None) -> VerifyResult:
        rules = service.rules
        checks = [c for c in rules.check if c.action is Action.ROLLBACK]
        step = min((c.interval.total_seconds() for c in rules.check), default=5.0)
        if rules.service.version_query and to_version is not None:
            deadline = self.clock() + rules.verify.version_timeout.total_seconds()
            while True:
                await self.engine.observe_service(service, self.clock())
                current = self.engine.versions.current(service.name)
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
        states = {c.name: CheckState() for c in checks}
        answered = dict.fromkeys(states, False)
        end = self.clock() + rules.verify.window.total_seconds()
        while True:
            now = self.clock()
            await self.engine.observe_service(service, now)
            for check in checks:
                measurements = await self.engine.evaluate(service, check, now)
                errored = [m for m in measurements if m.verdict is Verdict.ERROR and not m.labels]
                outcome: Errored | Judged = (
                    Errored(errored[0].reason)
                    if errored
                    else Judged({m.labels: m.verdict for m in measurements})
                )
                if not errored:
                    answered[check.name] = True
                states[check.name], changes = step_check(
                    states[check.name],
                    outcome,
                    datetime.fromtimestamp(now, tz=UTC),
                    Policy.from_check(check),
                )
                if any(c.transition is Transition.FIRED for c in changes):
                    reason = next(
                        (m.reason for m in measurements if m.verdict is Verdict.BREACH),
                        measurements[0].reason,
                    )
                    return VerifyResult(False, f"check {check.name} fired again: {reason}")
            if now >= end:
                break
            await self.sleep(min(step, max(end - self.clock(), 0.0)))
        blind = [name for name, ok in answered.items() if not ok]
        if blind:
            return VerifyResult(
                False, f"could not verify: queries of {', '.join(blind)} failed the whole window"
            )
        held = f"checks held for {rules.verify.window.total_seconds():g}s"
        version = f"version reads {to_version}; " if rules.service.version_query else ""
        return VerifyResult(True, version + held)
