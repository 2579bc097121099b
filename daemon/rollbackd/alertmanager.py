"""Reading Alertmanager's own API: which alerts are active now (``[alertmanager] url``).

Baking an alert-only service needs evidence that its mapped alerts were *not* active, and
the webhook cannot give that: Alertmanager sends nothing while nothing fires, which looks
the same as Alertmanager being down. So each service poll reads
``GET /api/v2/alerts?active=true&silenced=true&inhibited=true`` -- silenced and inhibited
alerts included, since a silence hides an alert from people, not from the service's health
-- and matches each alert against the service's ``[[alert]]`` mappings with the webhook's
own matcher code (``alerts.compile_routes``).

A read never raises for an ordinary failure: it says why it could not read, and the engine
counts that poll as a gap. Services polled within ``REUSE_FOR`` seconds of each other share
one read, and reads in flight at once share one request.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from rollbackd.config.loader import LoadedConfig
from rollbackd.config.secrets import SecretError, read_secret
from rollbackd.config.settings import AlertmanagerSection
from rollbackd.core.samples import Verdict

if TYPE_CHECKING:
    from rollbackd.runtime.alert_intake import AlertRoute

REUSE_FOR = 1.0
"""Seconds: a read serves every service polled this close to it (one poll round)."""
_SNIPPET = 200
"""Characters of an unexpected answer quoted in the reason."""

ALERTS_PATH = "/api/v2/alerts"
ALERTS_PARAMS = {"active": "true", "silenced": "true", "inhibited": "true"}


@dataclass(frozen=True)
class AlertsRead:
    """One read of Alertmanager: the label sets of the alerts it holds as not resolved, or
    why it could not be read."""

    at: float
    alerts: tuple[Mapping[str, str], ...] = ()
    error: str | None = None


class AnswerError(ValueError):
    """Alertmanager's answer is not the list of alerts its API documents."""


def parse_alerts(document: Any) -> tuple[Mapping[str, str], ...]:
    """The label sets of ``GET /api/v2/alerts``' answer (a list of gettableAlert)."""
    if not isinstance(document, list):
        raise AnswerError(f"expected a list of alerts, got {type(document).__name__}")
    found: list[Mapping[str, str]] = []
    for index, alert in enumerate(document):
        labels = alert.get("labels") if isinstance(alert, dict) else None
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise AnswerError(f"alert {index} has no labels of strings")
        found.append(dict(labels))
    return tuple(found)


@dataclass(frozen=True)
class AlertReading:
    """One service's alerts as bake evidence: OK (Alertmanager answered, none of its mapped
    alerts active), BREACH (some are: ``active`` names them), ERROR (not read)."""

    verdict: Verdict
    reason: str
    active: tuple[str, ...] = ()


def reading_for(read: AlertsRead, routes: Sequence[AlertRoute]) -> AlertReading:
    if read.error is not None:
        return AlertReading(Verdict.ERROR, read.error)
    active = sorted(
        {route.alertname for alert in read.alerts for route in routes if route.matches(alert)}
    )
    if active:
        return AlertReading(
            Verdict.BREACH, f"alert {', '.join(active)} active in Alertmanager", tuple(active)
        )
    return AlertReading(Verdict.OK, "no mapped alert active in Alertmanager")


class AlertmanagerReader:
    def __init__(
        self,
        section: AlertmanagerSection,
        *,
        reuse_for: float = REUSE_FOR,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if section.url is None:
            raise ValueError("[alertmanager] url is not set")
        self.section = section
        self.url = section.url
        self.reuse_for = reuse_for
        self._transport = transport
        self._last: AlertsRead | None = None
        self._pending: tuple[float, asyncio.Future[AlertsRead]] | None = None

    async def read(self, now: float) -> AlertsRead:
        """The alerts as of about ``now``: the last read when it is this recent, else a new
        one (shared with every caller that asks while it runs)."""
        last = self._last
        if last is not None and abs(now - last.at) <= self.reuse_for:
            return last
        pending = self._pending
        if pending is None or abs(now - pending[0]) > self.reuse_for or pending[1].done():
            pending = (now, asyncio.ensure_future(self._fetch(now)))
            self._pending = pending
        # Shielded: one caller cancelled (a job stopped) must not cancel the others' read.
        result = await asyncio.shield(pending[1])
        if self._pending is pending:
            self._pending = None
        self._last = result
        return result

    async def _fetch(self, now: float) -> AlertsRead:
        headers = {"Accept": "application/json"}
        section = self.section
        if section.bearer_token_file or section.bearer_token_env:
            try:
                token = read_secret(
                    section.bearer_token_file,
                    section.bearer_token_env,
                    "alertmanager bearer token",
                )
            except SecretError as exc:
                return AlertsRead(now, error=str(exc))
            headers["Authorization"] = f"Bearer {token}"
        timeout = section.timeout.total_seconds()
        try:
            # One deadline for the whole read: httpx's timeout bounds each step only, and a
            # server that trickles its answer would hold the service's poll for ever.
            async with (
                asyncio.timeout(timeout),
                httpx.AsyncClient(timeout=timeout, transport=self._transport) as client,
            ):
                response = await client.get(
                    f"{self.url}{ALERTS_PATH}", params=ALERTS_PARAMS, headers=headers
                )
                body = response.content
        except TimeoutError:
            return AlertsRead(now, error=f"no answer within {_seconds(timeout)}")
        except httpx.HTTPError as exc:
            return AlertsRead(now, error=f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc))
        if response.status_code != 200:
            return AlertsRead(
                now, error=f"HTTP {response.status_code}: {_snippet(body.decode(errors='replace'))}"
            )
        try:
            alerts = parse_alerts(response.json())
        except ValueError as exc:  # AnswerError, or a body that is not JSON
            return AlertsRead(now, error=f"unexpected answer: {_snippet(str(exc))}")
        return AlertsRead(now, alerts)


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _SNIPPET else flat[: _SNIPPET - 3] + "..."


def _seconds(value: float) -> str:
    return f"{value:g}s" if math.isfinite(value) else "ever"


class AlertWatch:
    """Alertmanager as read for the config in force: its reader (None without ``url``) and
    each service's mapped alerts, compiled once per loaded config."""

    def __init__(self, loaded: LoadedConfig, previous: AlertWatch | None = None) -> None:
        # Imported here: alerts.py hands alerts to the pipeline, which imports the engine,
        # which imports this module.
        from rollbackd.runtime.alert_intake import compile_routes

        self.loaded = loaded
        section = loaded.config.alertmanager
        self.reader: AlertmanagerReader | None = None
        if (
            previous is not None
            and previous.reader is not None
            and previous.reader.section == section
        ):
            self.reader = previous.reader  # a reload that did not touch [alertmanager]
        elif section.url is not None:
            self.reader = AlertmanagerReader(section)
        self.routes: dict[str, tuple[AlertRoute, ...]] = {}
        for route in compile_routes(loaded):
            self.routes[route.service] = (*self.routes.get(route.service, ()), route)

    @staticmethod
    def for_config(loaded: LoadedConfig, current: AlertWatch | None) -> AlertWatch:
        if current is not None and current.loaded is loaded:
            return current
        return AlertWatch(loaded, current)

    async def reading(self, service: str, now: float) -> AlertReading | None:
        """The service's alerts as evidence; None when Alertmanager is not read or the
        service maps no alert."""
        routes = self.routes.get(service)
        if self.reader is None or not routes:
            return None
        return reading_for(await self.reader.read(now), routes)


__all__ = [
    "ALERTS_PARAMS",
    "ALERTS_PATH",
    "AlertReading",
    "AlertWatch",
    "AlertmanagerReader",
    "AlertsRead",
    "AnswerError",
    "parse_alerts",
    "reading_for",
]
