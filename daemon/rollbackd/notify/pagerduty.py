"""``pagerduty``: Events API v2, triggered on failures and resolved on recovery.

Pages, and what resolves them (one incident per problem, via a deterministic dedup_key):

=========================================================  ==============================
trigger                                                    resolved by
=========================================================  ==============================
``rollback.failed``, ``verify.failed``, ``service.frozen``  ``rollback.succeeded`` of the
  → ``rollbackd/<service>/rollback``                          same service
``prometheus.unreachable`` → ``rollbackd/prometheus``       ``prometheus.recovered``
=========================================================  ==============================

The three rollback pages share one key because they are one problem — the service needs a
person — and usually arrive together (a failed rollback freezes the service): PagerDuty
folds them into one alert instead of paging twice. There is no "thaw" event; a person's
later rollback that succeeds is what says the service is handled. Prometheus reachability is
daemon-wide (the engine reports the first blind check and the last one to see again, which
may be different services), so its key names no service.

Other events routed here are not sent: PagerDuty is for what needs a person now.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import Field

from rollbackd.config.secrets import read_secret
from rollbackd.notify.base import BuildContext, HttpSender, NotifierSpec, Redactor, Sender
from rollbackd.notify.content import Cause, Message

PAGE_EVENTS = ["rollback.failed", "verify.failed", "service.frozen", "prometheus.unreachable"]
RESOLVE_EVENTS = ["rollback.succeeded", "prometheus.recovered"]


class PagerDutyNotifier(NotifierSpec):
    type: Literal["pagerduty"]
    events: list[str] = Field(
        default_factory=lambda: [*PAGE_EVENTS, "rollback.succeeded", "prometheus.recovered"],
        min_length=1,
    )
    routing_key_file: str | None = None
    routing_key_env: str | None = None
    url: str = Field(default="https://events.pagerduty.com/v2/enqueue", pattern=r"^https?://")
    severity: Literal["critical", "error", "warning", "info"] = "critical"

    secret_keys: ClassVar[tuple[str, ...]] = ("routing_key",)
    key_hints: ClassVar[dict[str, str]] = {
        "routing_key": "the routing key is a secret: set 'routing_key_file' or 'routing_key_env'"
    }

    def build(self, context: BuildContext) -> Sender:
        key = read_secret(
            self.routing_key_file, self.routing_key_env, f"notify {self.name}: routing key"
        )
        redact = Redactor()
        redact.add(key)
        redact.add_url(self.url, whole=False)
        return PagerDutySender(self, key, redact, context)


_SUMMARY_MAX = 1024
"""PagerDuty rejects a longer summary with 400."""


def dedup_key(event_type: str, service: str | None) -> str:
    if event_type.startswith("prometheus."):
        return "rollbackd/prometheus"
    return f"rollbackd/{service or '-'}/rollback"


class PagerDutySender(HttpSender):
    type = "pagerduty"

    def __init__(
        self, spec: PagerDutyNotifier, routing_key: str, redact: Redactor, context: BuildContext
    ) -> None:
        super().__init__(spec.name, redact, context)
        self._url = spec.url
        self._key = routing_key
        self._severity = spec.severity
        self._client_url = context.public_url

    def accepts(self, event_type: str) -> bool:
        return event_type in PAGE_EVENTS or event_type in RESOLVE_EVENTS

    async def send(self, message: Message) -> None:
        body = pagerduty_event(
            message, self._key, severity=self._severity, client_url=self._client_url
        )
        await self.post(self._url, json.dumps(body, ensure_ascii=False).encode("utf-8"))


def pagerduty_event(
    message: Message, routing_key: str, *, severity: str, client_url: str | None = None
) -> dict[str, Any]:
    key = dedup_key(message.type, message.service)
    if message.type in RESOLVE_EVENTS:
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": key}
    title = message.title
    summary = title if len(title) <= _SUMMARY_MAX else title[: _SUMMARY_MAX - 1] + "…"
    details: dict[str, Any] = {label: value for label, value in message.facts}
    details.update(
        {
            "service": message.service,
            "from_version": message.from_version,
            "to_version": message.to_version,
            "rollback_id": message.rollback_id,
            "causes": [_cause(c) for c in message.causes],
            "guards": [g.line() for g in message.guards],
            "event": message.type,
        }
    )
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": key,
        "client": "rollbackd",
        "payload": {
            "summary": summary,
            "source": message.service or "rollbackd",
            "severity": severity,
            "timestamp": message.time,
            "component": message.service or "rollbackd",
            "group": "rollbackd",
            "class": message.type,
            "custom_details": {k: v for k, v in details.items() if v not in (None, [], "")},
        },
    }
    links = [
        {"href": href, "text": text}
        for href, text in ((message.graph_url, "Prometheus graph"), (message.link, "rollbackd"))
        if href
    ]
    if links:
        event["links"] = links
    if client_url:
        event["client_url"] = client_url
    return event


def _cause(cause: Cause) -> str:
    return cause.line() + (f" — query: {cause.query}" if cause.query else "")
