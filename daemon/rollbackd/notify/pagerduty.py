"""``pagerduty``: Events API v2, triggered on failures and resolved on recovery."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from rollbackd.notify.base import NotifierSpec

PAGE_EVENTS = ["rollback.failed", "verify.failed", "service.frozen", "prometheus.unreachable"]


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
