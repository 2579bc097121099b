"""What every route works with, and the dependency that hands it to them.

``create_app`` builds one ``ApiContext`` and keeps it on ``app.state``; routes take it
with ``Depends(context)`` (the ``Api`` annotation) instead of closing over the app's
parts, so each router is a plain module.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from rollbackd.runtime.alert_intake import AlertReceiver
from rollbackd.runtime.control import Control

PROMETHEUS_READY_TTL = 5.0
"""Seconds a /readyz probe of Prometheus is reused: load balancers probe often."""


class ReadyCache:
    """The last answer of Prometheus's readiness probe, for ``PROMETHEUS_READY_TTL``."""

    def __init__(self, probe: Callable[[], Awaitable[bool]] | None) -> None:
        self._probe = probe
        self._at = -PROMETHEUS_READY_TTL
        self._value = False

    async def get(self) -> bool:
        """Whether Prometheus is ready; True when there is no probe."""
        if self._probe is None:
            return True
        now = time.monotonic()
        if now - self._at >= PROMETHEUS_READY_TTL:
            self._value = await self._probe()
            self._at = now
        return self._value


@dataclass(frozen=True)
class ApiContext:
    """The parts of the daemon the routes use."""

    control: Control
    receiver: AlertReceiver
    registry: CollectorRegistry
    """Served on /metrics."""
    prometheus: ReadyCache
    clock: Callable[[], float]


def context(request: Request) -> ApiContext:
    return cast(ApiContext, request.app.state.context)


Api = Annotated[ApiContext, Depends(context)]
"""A route's parameter for the context: it takes no input and adds nothing to the
OpenAPI document."""
