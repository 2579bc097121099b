"""The events rollbackd emits (SPEC §6): audit records, notifications, logs."""

from __future__ import annotations

EVENT_TYPES = (
    "check.breach",
    "check.recovered",
    "rollback.pending",
    "rollback.started",
    "rollback.succeeded",
    "rollback.failed",
    "canary.aborted",
    "verify.failed",
    "service.frozen",
    "prometheus.unreachable",
    "prometheus.recovered",
    "config.reload_failed",
    "release.bad_version_deployed",
    "version.changed",
    "version.baked",
    "rollback.refused",
    "rollback.triggered",
    "rollback.rejected",
    "rollback.expired",
    "service.paused",
    "service.resumed",
)
