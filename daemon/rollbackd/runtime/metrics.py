"""The daemon's own Prometheus metrics, ``rollbackd_*``, on a registry of their own so
several engines (tests) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

from rollbackd.core.check_state import Phase
from rollbackd.core.samples import Verdict


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.evaluations = Counter(
            "rollbackd_check_evaluations_total",
            "Check evaluations, by verdict of the worst series.",
            ["service", "check", "verdict"],
            registry=r,
        )
        # By check type, not per check: a histogram is 14 series, and at 6,000 checks one
        # per check was 84,000 series, a third of the daemon's memory and most of the
        # /metrics page (docs/benchmarks.md). Each check's own time is the gauge below.
        self.evaluation_duration = Histogram(
            "rollbackd_check_evaluation_duration_seconds",
            "Time to query Prometheus and judge one check (its batch's query included), by "
            "check type.",
            ["type"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.last_evaluation_duration = Gauge(
            "rollbackd_check_last_evaluation_duration_seconds",
            "Time the check's last evaluation took to query Prometheus and judge.",
            ["service", "check"],
            registry=r,
        )
        self.check_state = Enum(
            "rollbackd_check_state",
            "The check's state: ok, pending or firing.",
            ["service", "check"],
            states=[p.value for p in Phase],
            registry=r,
        )
        self.check_blind = Gauge(
            "rollbackd_check_blind",
            "1 while the check cannot see its metric because its queries keep failing.",
            ["service", "check"],
            registry=r,
        )
        self.overruns = Counter(
            "rollbackd_check_overruns_total",
            "Evaluations skipped because the previous one of the same check still ran.",
            ["service", "check"],
            registry=r,
        )
        self.missed = Counter(
            "rollbackd_check_missed_total",
            "Evaluations that started too late and were dropped (the loop was blocked).",
            ["service", "check"],
            registry=r,
        )
        self.start_delay = Histogram(
            "rollbackd_job_start_delay_seconds",
            "How late scheduled jobs start against their schedule: the event loop or the "
            "scheduler was busy. kind: check, batch (several checks, one query each role) or "
            "service (version and canary).",
            ["kind"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
            registry=r,
        )
        self.queries = Counter(
            "rollbackd_prometheus_queries_total",
            "Queries sent to Prometheus, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.prometheus_up = Gauge(
            "rollbackd_prometheus_up",
            "1 when the last query to Prometheus succeeded.",
            registry=r,
        )
        self.version_info = Gauge(
            "rollbackd_service_version_info",
            "The version each service runs, as rollbackd sees it.",
            ["service", "version"],
            registry=r,
        )
        self.version_changes = Counter(
            "rollbackd_version_changes_total",
            "Version changes seen per service.",
            ["service"],
            registry=r,
        )

        self.config_reload_ok = Gauge(
            "rollbackd_config_last_reload_successful",
            "1 when the last config reload (or the start) succeeded, 0 when it was refused.",
            registry=r,
        )
        self.config_reload_time = Gauge(
            "rollbackd_config_last_reload_success_timestamp_seconds",
            "When the config was last loaded successfully.",
            registry=r,
        )
        self.rollbacks_in_flight = Gauge(
            "rollbackd_rollbacks_in_flight",
            "Rollbacks running or verifying now.",
            registry=r,
        )
        self.leases_held = Gauge(
            "rollbackd_leases_held",
            "Services whose lease this daemon holds and acts on now (PostgreSQL store).",
            registry=r,
        )
        self.lease_takeovers = Counter(
            "rollbackd_lease_takeovers_total",
            "Leases this daemon acquired from an earlier tenure (another daemon's, or its own "
            "before a restart): epoch above 1.",
            registry=r,
        )

    def verdict_counted(self, service: str, check: str, verdict: Verdict) -> None:
        self.evaluations.labels(service, check, verdict.value).inc()
