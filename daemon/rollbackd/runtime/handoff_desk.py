"""What a handed-off request says, what its answer says, and how the holder answers it.

A request only a service's holder may carry out (an approval, a rejection, a manual
rollback, a release) can reach any daemon. One that does not hold the service stores it
as a handoff (``runtime/relay.py``); the holder takes it and answers it here, by calling
its own pipeline and engine exactly as its API would, and writes the outcome down as
data; the asker turns that data back into the return value or the exception its own
caller expects (``Control``). Both sides are in this one module, so that the shapes of a
body and of an answer are written once.

Answers are ``{"ok": true, ...}`` or ``{"ok": false, "error": <Failure>, "message": ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from rollbackd.core.guards import Decision, GuardResult, Outcome
from rollbackd.core.model import Handoff, HandoffKind, JSONValue
from rollbackd.logs import get_logger
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.tenancy import NotHolder
from rollbackd.runtime.triggers import Submission, Trigger, UnknownService
from rollbackd.runtime.versions import VersionObservation
from rollbackd.store.errors import ConflictError, FencedError, StoreError

log = get_logger("rollbackd.relay")

Answer = Mapping[str, JSONValue]


class Failure(StrEnum):
    """Why the holder did not do what was asked, as the asker re-raises it."""

    NOT_FOUND = "not_found"
    """LookupError: no such rollback."""
    UNKNOWN_SERVICE = "unknown_service"
    CONFLICT = "conflict"
    """ConflictError: the API's 409, with the holder's reason."""
    INVALID = "invalid"
    """ValueError: the API's 422 (an invalid version)."""
    NOT_HOLDER = "not_holder"
    """The lease moved while the request waited: nothing done; ask again."""
    STORE = "store"
    """StoreError: the holder could not record it; nothing done."""


# -- the asker's side: bodies out, answers back ---------------------------------------------


def approve_body(rollback_id: int, who: str) -> dict[str, JSONValue]:
    return {"rollback_id": rollback_id, "who": who}


def reject_body(rollback_id: int, who: str, reason: str) -> dict[str, JSONValue]:
    return {"rollback_id": rollback_id, "who": who, "reason": reason}


def rollback_body(trigger: Trigger) -> dict[str, JSONValue]:
    """A person's rollback request (``source`` manual): what its trigger carries."""
    return {
        "reason": trigger.reason,
        "at": trigger.at,
        "to_version": trigger.to_version,
        "requested_by": trigger.requested_by,
    }


def release_body(version: str, meta: Mapping[str, str], at: float) -> dict[str, JSONValue]:
    return {"version": version, "meta": dict(meta), "at": at}


def raise_failure(answer: Answer) -> None:
    """Raise what the holder's refusal was, as the asker's caller expects it; nothing for
    an answer that is ``ok``."""
    if answer.get("ok") is True:
        return
    message = str(answer.get("message", "the holder gave no reason"))
    failure = answer.get("error")
    if failure == Failure.NOT_FOUND:
        raise LookupError(message)
    if failure == Failure.UNKNOWN_SERVICE:
        raise UnknownService(message)
    if failure == Failure.INVALID:
        raise ValueError(message)
    if failure == Failure.STORE:
        raise StoreError(f"the holder could not record it: {message}")
    if failure == Failure.NOT_HOLDER:
        raise ConflictError(f"the service changed hands meanwhile, nothing done: {message}")
    raise ConflictError(message)


def answered_rollback_id(answer: Answer) -> int:
    raise_failure(answer)
    value = answer.get("rollback_id")
    if not isinstance(value, int):
        raise StoreError(f"the holder's answer names no rollback: {dict(answer)}")
    return value


def answered_submission(answer: Answer) -> tuple[Submission, int | None]:
    """The holder's ``Submission`` without its rollback, and that rollback's id (the asker
    reads it from the store)."""
    raise_failure(answer)
    guards = answer.get("guards")
    decision = None
    if isinstance(guards, list):
        decision = Decision(
            Outcome(str(answer.get("decision"))),
            tuple(
                GuardResult(str(g["guard"]), bool(g["passed"]), str(g["reason"]))
                for g in guards
                if isinstance(g, dict)
            ),
        )
    rollback_id = answer.get("rollback_id")
    submission = Submission(
        str(answer.get("outcome")), None, decision, str(answer.get("reason", ""))
    )
    return submission, rollback_id if isinstance(rollback_id, int) else None


def answered_observation(answer: Answer) -> VersionObservation:
    raise_failure(answer)
    previous = answer.get("previous")
    current = answer.get("current")
    first_seen = answer.get("first_seen")
    return VersionObservation(
        current=current if isinstance(current, str) else None,
        changed=answer.get("changed") is True,
        previous=previous if isinstance(previous, str) else None,
        first_seen=float(first_seen) if isinstance(first_seen, (int, float)) else None,
        detected_at_start=False,
        rejected=(),
        bad=answer.get("bad") is True,
    )


# -- the holder's side ----------------------------------------------------------------------


def _failed(failure: Failure, exc: BaseException) -> Answer:
    return {"ok": False, "error": failure.value, "message": str(exc)}


class HandoffDesk:
    """Answers handed-off requests on the holder, through its own pipeline."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def answer(self, handoff: Handoff) -> Answer:
        """Carry the request out and say how it went; never raises for what the request
        asked (a refusal, a store failure): that is the answer."""
        try:
            return await self._carry_out(handoff)
        except (NotHolder, FencedError) as exc:
            return _failed(Failure.NOT_HOLDER, exc)
        except UnknownService as exc:
            return _failed(Failure.UNKNOWN_SERVICE, exc)
        except LookupError as exc:
            return _failed(Failure.NOT_FOUND, exc)
        except ConflictError as exc:
            return _failed(Failure.CONFLICT, exc)
        except ValueError as exc:
            return _failed(Failure.INVALID, exc)
        except StoreError as exc:
            return _failed(Failure.STORE, exc)

    async def _carry_out(self, handoff: Handoff) -> Answer:
        body = handoff.body
        pipeline = self._pipeline
        if handoff.kind is HandoffKind.APPROVE:
            done = await pipeline.approve(_int(body, "rollback_id"), _str(body, "who"))
            return {"ok": True, "rollback_id": done.id}
        if handoff.kind is HandoffKind.REJECT:
            done = await pipeline.reject(
                _int(body, "rollback_id"), _str(body, "who"), _str(body, "reason")
            )
            return {"ok": True, "rollback_id": done.id}
        if handoff.kind is HandoffKind.ROLLBACK:
            return await self._rollback(handoff)
        return await self._release(handoff)

    async def _rollback(self, handoff: Handoff) -> Answer:
        body = handoff.body
        to_version = body.get("to_version")
        requested_by = body.get("requested_by")
        trigger = Trigger(
            service=handoff.service,
            source="manual",
            reason=_str(body, "reason"),
            at=float(_number(body, "at")),
            automatic=False,
            to_version=to_version if isinstance(to_version, str) else None,
            requested_by=requested_by if isinstance(requested_by, str) else None,
        )
        submission = await self._pipeline.submit(trigger)
        if submission.outcome == "not_holder":
            raise NotHolder(handoff.service)
        if submission.outcome == "unrecorded":
            raise StoreError(submission.reason)
        decision = submission.decision
        return {
            "ok": True,
            "outcome": submission.outcome,
            "reason": submission.reason,
            "rollback_id": submission.rollback.id if submission.rollback else None,
            "decision": decision.outcome.value if decision else None,
            "guards": [dict(g.as_json()) for g in decision.guards] if decision else None,
        }

    async def _release(self, handoff: Handoff) -> Answer:
        body = handoff.body
        meta = body.get("meta")
        given = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
        seen = await self._pipeline.engine.record_release(
            handoff.service,
            _str(body, "version"),
            float(_number(body, "at")),
            given,
            known_good=given.get("known_good") == "true",
        )
        return {
            "ok": True,
            "current": seen.current,
            "changed": seen.changed,
            "previous": seen.previous,
            "first_seen": seen.first_seen,
            "bad": seen.bad,
        }


def _str(body: Mapping[str, JSONValue], key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"handoff field {key!r} is not text: {value!r}")
    return value


def _int(body: Mapping[str, JSONValue], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"handoff field {key!r} is not a whole number: {value!r}")
    return value


def _number(body: Mapping[str, JSONValue], key: str) -> float:
    value = body.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"handoff field {key!r} is not a number: {value!r}")
    return float(value)
