"""The API's answers built from the daemon's typed data: pure mappings, no reads.

Whatever an answer shows beside a record (a rollback's steps and triggers) was read by the
``Control`` already (``RollbackDetail``), so these functions never touch the store.
"""

from __future__ import annotations

from rollbackd.api.models import (
    AlertOut,
    BakeOut,
    CheckOut,
    GuardOut,
    RollbackOut,
    StepOut,
    SubmissionOut,
    TriggerOut,
    WebhookAlertOut,
)
from rollbackd.checks import Check
from rollbackd.core.check_state import CheckState
from rollbackd.core.model import StoredAlert
from rollbackd.runtime.alert_intake import AlertResult
from rollbackd.runtime.bake_evidence import BakeStatus
from rollbackd.runtime.control import RollbackDetail
from rollbackd.runtime.triggers import Submission


def rollback_out(detail: RollbackDetail) -> RollbackOut:
    rollback = detail.rollback
    return RollbackOut(
        id=rollback.id,
        service=rollback.service,
        from_version=rollback.from_version,
        to_version=rollback.to_version,
        state=rollback.state.value,
        source=rollback.source,
        automatic=rollback.automatic,
        reason=rollback.reason,
        mode=rollback.mode,
        canary=rollback.canary,
        created_at=rollback.created_at,
        updated_at=rollback.updated_at,
        started_at=rollback.started_at,
        finished_at=rollback.finished_at,
        expires_at=rollback.expires_at,
        decided_by=rollback.decided_by,
        outcome=rollback.outcome,
        trigger=dict(rollback.trigger),
        guards=[dict(g) for g in rollback.guards],
        steps=[
            StepOut(
                id=s.id,
                kind=s.kind,
                executor=s.executor,
                started_at=s.started_at,
                finished_at=s.finished_at,
                ok=s.ok,
                summary=s.summary,
                stdout_tail=s.stdout_tail,
                stderr_tail=s.stderr_tail,
                command=list(s.command),
            )
            for s in detail.steps
        ],
        triggers=[
            TriggerOut(id=t.id, at=t.at, source=t.source, detail=dict(t.detail))
            for t in detail.triggers
        ],
        triggers_total=detail.triggers_total,
    )


def submission_out(submission: Submission, detail: RollbackDetail | None) -> SubmissionOut:
    """What the pipeline did with a manual request; ``detail`` is its rollback's, if any."""
    decision = submission.decision
    return SubmissionOut(
        outcome=submission.outcome,
        reason=submission.reason,
        rollback_id=submission.rollback.id if submission.rollback else None,
        rollback=rollback_out(detail) if detail else None,
        guards=[
            GuardOut(guard=g.guard, passed=g.passed, reason=g.reason)
            for g in (decision.guards if decision else ())
        ],
    )


def check_out(check: Check, state: CheckState, evidence: str | None = None) -> CheckOut:
    return CheckOut(
        name=check.name,
        type=check.type,
        action=check.action.value,
        phase=state.phase.value,
        blind=state.blind,
        firing_series=[dict(labels) for labels in state.firing_series()],
        evidence=evidence,
    )


def bake_out(status: BakeStatus) -> BakeOut:
    return BakeOut(state=status.state.value, summary=status.summary)


def alert_out(alert: StoredAlert) -> AlertOut:
    return AlertOut(
        id=alert.id,
        fingerprint=alert.fingerprint,
        status=alert.status,
        alertname=alert.alertname,
        starts_at=alert.starts_at,
        ends_at=alert.ends_at,
        labels=dict(alert.labels),
        annotations=dict(alert.annotations),
        receiver=alert.receiver,
        group_key=alert.group_key,
        received_at=alert.received_at,
        last_received_at=alert.last_received_at,
        deliveries=alert.deliveries,
        matched_service=alert.matched_service,
        handled_at=alert.handled_at,
        outcome=alert.outcome,
        rollback_id=alert.rollback_id,
    )


def webhook_alert_out(result: AlertResult) -> WebhookAlertOut:
    alert = result.alert
    return WebhookAlertOut(
        id=alert.id,
        fingerprint=alert.fingerprint,
        status=alert.status,
        alertname=alert.alertname,
        service=alert.matched_service,
        new=result.new,
        deliveries=alert.deliveries,
        outcome=alert.outcome,
        rollback_id=alert.rollback_id,
    )
