"""Alertmanager webhook bodies as Alertmanager sends them (``version`` 4), for tests and
benchmarks that post deliveries to ``/api/v1/alertmanager`` themselves."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

WEBHOOK = "/api/v1/alertmanager"
JSON = {"Content-Type": "application/json"}
NO_END = "0001-01-01T00:00:00Z"
"""Go's zero time: Alertmanager's "no end" for a firing alert."""


@dataclass(frozen=True)
class FiringAlert:
    labels: Mapping[str, str]
    fingerprint: str
    """Hex, as Alertmanager's are (the API refuses anything else)."""
    starts_at: str = "2026-12-01T10:00:00Z"
    annotations: Mapping[str, str] = field(default_factory=dict)


def delivery(alertname: str, alerts: Sequence[FiringAlert], *, group_key: str = "") -> str:
    """One firing delivery of ``alerts``, grouped by ``alertname``."""
    return json.dumps(
        {
            "version": "4",
            "groupKey": group_key or f'{{}}:{{alertname="{alertname}"}}',
            "truncatedAlerts": 0,
            "status": "firing",
            "receiver": "rollbackd",
            "groupLabels": {"alertname": alertname},
            "commonLabels": {"alertname": alertname},
            "commonAnnotations": {},
            "externalURL": "http://alertmanager.invalid",
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": alertname, **alert.labels},
                    "annotations": dict(alert.annotations),
                    "startsAt": alert.starts_at,
                    "endsAt": NO_END,
                    "generatorURL": "",
                    "fingerprint": alert.fingerprint,
                }
                for alert in alerts
            ],
        }
    )
