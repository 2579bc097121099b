"""The API's own metrics: requests by route template, their duration, alerts received."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from rollbackd.core.model import StoredAlert


class ApiMetrics:
    """The API's own metrics, on the daemon's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "rollbackd_http_requests_total",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "rollbackd_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.alerts = Counter(
            "rollbackd_alerts_received_total",
            "Alerts received from Alertmanager, by status, whether they matched a service's "
            "[[alert]], and whether they were re-sends of an alert already recorded.",
            ["status", "matched", "duplicate"],
            registry=registry,
        )

    def alert_counted(self, alert: StoredAlert, new: bool) -> None:
        self.alerts.labels(
            alert.status,
            str(alert.matched_service is not None).lower(),
            str(not new).lower(),
        ).inc()
