"""The HTTP API (SPEC §5) and the Alertmanager receiver, served inside the daemon's process.

``create_app`` builds the FastAPI application from the daemon's parts, so tests can run it
in-process; ``ApiServer`` serves it with uvicorn as a task of the daemon's event loop.

In front of every route sits one small ASGI gate (``_Gate``), because two checks must come
before FastAPI reads anything:

* the bearer token, on every route but ``/healthz``, ``/readyz``, ``/metrics`` and the
  OpenAPI document (deny by default: an unknown path without a token is a 401 too), compared
  in constant time. In a FastAPI dependency it would come too late: FastAPI reads and
  parses the body before dependencies run, so a caller without the token would get the
  daemon to read its body and would be answered 400/422 instead of 401;
* the body limit, ``[server].max_body`` (``webhook_max_body`` for Alertmanager's webhook,
  which gets a whole alert group in one delivery): a declared length over it is refused at
  once with 413, and a streamed body is counted as it arrives and refused once it passes
  the limit. Only a caller with the token gets as far as sending a body.

Every answer but /metrics is JSON, errors included: ``{"detail": "..."}``, or for a 422
FastAPI's list of errors, each naming its field by ``loc``. A failing state store is a 503,
never a 500: for the webhook that makes Alertmanager retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Protocol

import uvicorn
from fastapi import Body, FastAPI, HTTPException, Query, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rollbackd import __version__
from rollbackd.api.models import (
    NAME_PATTERN,
    AlertmanagerWebhook,
    AlertOut,
    AlertsOut,
    AlertsQuery,
    AutomationOut,
    AutomationRequest,
    BakeOut,
    CheckOut,
    DecisionRequest,
    ErrorOut,
    GuardOut,
    HealthOut,
    HistoryOut,
    HistoryQuery,
    ReadyCheckOut,
    ReadyOut,
    ReleaseOut,
    ReleaseRequest,
    RollbackOut,
    RollbackRequest,
    ServiceOut,
    StatusOut,
    StepOut,
    SubmissionOut,
    TriggerOut,
    WebhookAlertOut,
    WebhookOut,
)
from rollbackd.cli.client import read_api_token
from rollbackd.config.loader import LoadedConfig, Service
from rollbackd.config.secrets import SecretError
from rollbackd.core.model import Rollback, RollbackState, ServiceState, StoredAlert, VersionRecord
from rollbackd.runtime.alert_intake import AlertReceiver, Delivery, IncomingAlert
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.logs import get_logger
from rollbackd.runtime.metrics import Metrics
from rollbackd.runtime.pipeline import Pipeline, Submission, Trigger, UnknownService
from rollbackd.store.errors import ConflictError, StoreError
from rollbackd.store.sqlite import Store

log = get_logger("rollbackd.api.app")

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
"""The only routes answered without the token: probes, metrics and the API's description."""
WEBHOOK_PATH = "/api/v1/alertmanager"
"""Alertmanager's webhook. Its 413 names the fix: Alertmanager does not retry a 4xx, so an
oversized delivery (one large alert group) would otherwise be lost without a word here."""
ADDRESS_FILE = "api.address"
"""Written into state_dir once the API listens: ``host:port``, for clients when the
configured port is 0 (tests, demos) and for people asking where the daemon listens."""
TRIGGERS_SHOWN = 100
"""Joined triggers shown per rollback; the rest are counted (``triggers_total``) and kept."""
MAX_ID = 2**63 - 1
"""SQLite's largest integer: a larger id would overflow the driver, not just miss."""
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
PROMETHEUS_READY_TTL = 5.0
"""Seconds a /readyz probe of Prometheus is reused: load balancers probe often."""

Handler = Callable[..., Any]

RollbackId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="a rollback's id")]
ScopeName = Annotated[
    str,
    PathParam(
        pattern=rf"^(\*|{NAME_PATTERN[1:-1]})$",
        description="a service, or * for every service",
        examples=["checkout"],
    ),
]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no bearer token, or a wrong one"},
    503: {"model": ErrorOut, "description": "the state store failed"},
}
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    400: {"model": ErrorOut, "description": "the body is not JSON text (not UTF-8)"},
    413: {
        "model": ErrorOut,
        "description": "the request body is over [server].max_body (webhook_max_body)",
    },
}


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


# -- the gate: token and body limit ---------------------------------------------------------


async def _send_json(
    send: Send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = ErrorOut(detail=detail).model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Gate:
    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str,
        max_body: int,
        webhook_max_body: int,
        metrics: ApiMetrics,
        routes: Callable[[], Sequence[BaseRoute]],
    ) -> None:
        self.app = app
        self._token = token.encode()
        self._max_body = max_body
        self._webhook_max_body = webhook_max_body
        self._metrics = metrics
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        route = self._route(scope)
        status = 0

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, counted)
        finally:
            if status:  # nothing is counted for a client that left before an answer
                method = str(scope["method"])
                # Any token is a method to HTTP: unknown ones must not grow the label set.
                method = method if method in _METHODS else "other"
                self._metrics.requests.labels(route, method, str(status)).inc()
                self._metrics.duration.labels(route, method).observe(time.monotonic() - started)

    def _route(self, scope: Scope) -> str:
        """The route template, so that ids in paths never become label values."""
        for route in self._routes():
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return str(getattr(route, "path", "other"))
        return "other"

    def _allowed(self, scope: Scope) -> set[str] | None:
        """The methods the path allows when the request's is not one of them, else None.
        Starlette's own 405 names the methods of the first route of the path only, and
        GET and POST /api/v1/rollbacks are two routes."""
        allowed: set[str] = set()
        for route in self._routes():
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return None
            if match is Match.PARTIAL:
                allowed |= set(getattr(route, "methods", None) or ())
        return allowed or None

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] not in PUBLIC_PATHS:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _send_json(
                    send, 401, refusal, [(b"www-authenticate", b'Bearer realm="rollbackd"')]
                )
                return
        allowed = self._allowed(scope)
        if allowed is not None:
            await _send_json(
                send,
                405,
                "Method Not Allowed",
                [(b"allow", ", ".join(sorted(allowed)).encode())],
            )
            return
        limit = self._webhook_max_body if scope["path"] == WEBHOOK_PATH else self._max_body
        declared = [v for k, v in scope["headers"] if k == b"content-length"]
        if declared:
            try:
                length = int(declared[0])
            except ValueError:
                await _send_json(send, 400, "Content-Length is not a number")
                return
            if length > limit:
                await self._too_large(scope, send, length)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(scope, send, size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _refusal(self, scope: Scope) -> str | None:
        """Why the request is refused, or None when it carries the token."""
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if not values:
            return "this route needs a bearer token: 'Authorization: Bearer <token>'"
        scheme, _, credentials = values[0].partition(b" ")
        # compare_digest on the whole value: no early exit on the first differing byte.
        if (
            len(values) != 1
            or scheme.lower() != b"bearer"
            or not hmac.compare_digest(credentials.strip(), self._token)
        ):
            return "the bearer token was refused"
        return None

    async def _too_large(self, scope: Scope, send: Send, size: int) -> None:
        if scope["path"] != WEBHOOK_PATH:
            detail = f"the request body is larger than {self._max_body} bytes ([server].max_body)"
            await _send_json(send, 413, detail, [(b"connection", b"close")])
            return
        # A large alert group is one large delivery, refused whole; Alertmanager does not
        # retry a 413 and re-sends the same oversized group every group_interval.
        detail = (
            f"the request body is larger than {self._webhook_max_body} bytes "
            "([server].webhook_max_body); Alertmanager does not retry a 413: set max_alerts "
            "in the webhook_config (e.g. 100) so every delivery fits"
        )
        log.warning(
            "alertmanager delivery refused, over [server].webhook_max_body: these alerts are "
            "lost; set max_alerts in Alertmanager's webhook_config (e.g. 100)",
            webhook_max_body=self._webhook_max_body,
            size_at_least=size,
        )
        await _send_json(send, 413, detail, [(b"connection", b"close")])


# -- the application ------------------------------------------------------------------------


class _ReadyCache:
    def __init__(self, probe: Callable[[], Awaitable[bool]] | None) -> None:
        self._probe = probe
        self._at = -PROMETHEUS_READY_TTL
        self._value = False

    async def get(self) -> bool:
        if self._probe is None:
            return True
        now = time.monotonic()
        if now - self._at >= PROMETHEUS_READY_TTL:
            self._value = await self._probe()
            self._at = now
        return self._value


def _rollback_out(store: Store, rollback: Rollback) -> RollbackOut:
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
            for s in store.steps(rollback.id)
        ],
        triggers=[
            TriggerOut(id=t.id, at=t.at, source=t.source, detail=dict(t.detail))
            for t in store.triggers(rollback.id, limit=TRIGGERS_SHOWN)
        ],
        triggers_total=store.count_triggers(rollback.id),
    )


def _alert_out(alert: StoredAlert) -> AlertOut:
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


def _bake_out(
    engine: Engine,
    service: Service,
    state: ServiceState | None,
    record: VersionRecord | None,
    now: float,
) -> BakeOut:
    version = state.current_version if state else None
    found = engine.bake_status(
        service,
        version,
        record.baked_at if record else None,
        (record.bad_reason or "rolled back") if record and record.bad else None,
        state.healthy_since if state else None,
        now,
    )
    return BakeOut(state=found.state.value, summary=found.summary)


def _who(body: DecisionRequest | AutomationRequest | None) -> str:
    return body.by if body is not None and body.by else "api"


def create_app(
    *,
    pipeline: Pipeline,
    registry: CollectorRegistry,
    token: str,
    max_body: int,
    webhook_max_body: int | None = None,
    prometheus_ready: Callable[[], Awaitable[bool]] | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The API over the daemon's parts. ``prometheus_ready`` is /readyz's probe of
    Prometheus (None: not probed); ``webhook_max_body`` defaults to ``max_body``."""
    if not token:
        raise ValueError("the API token must not be empty")
    engine = pipeline.engine
    store = pipeline.store
    metrics = ApiMetrics(registry)
    receiver = AlertReceiver(pipeline, clock=clock, counted=metrics.alert_counted)
    prometheus = _ReadyCache(prometheus_ready)

    app = FastAPI(
        title="rollbackd",
        version=__version__,
        description="Rolls bad releases back. Every /api route needs the bearer token of "
        "[server].token_file; /healthz, /readyz, /metrics and this document do not.",
        docs_url=None,  # the interactive docs load scripts from a CDN; the daemon serves none
        redoc_url=None,
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's shape, less the rejected input: it can be large, and it is the
        # caller's own anyway.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e["type"]}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(ConflictError)
    async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(StoreError)
    async def _store_failed(request: Request, exc: StoreError) -> JSONResponse:
        log.error("state store failed while answering", path=request.url.path, error=str(exc))
        return JSONResponse({"detail": f"state store unavailable: {exc}"}, status_code=503)

    @app.get("/healthz", response_model=HealthOut, tags=["probes"])
    async def healthz() -> HealthOut:
        """Alive: the daemon's event loop answers."""
        return HealthOut()

    @app.get(
        "/readyz",
        response_model=ReadyOut,
        tags=["probes"],
        responses={503: {"model": ReadyOut, "description": "a part is not ready"}},
    )
    async def readyz(response: Response) -> ReadyOut:
        """Config loaded, state store writable, Prometheus reached."""
        loaded = engine.loaded
        writable = await asyncio.to_thread(store.writable, 1.0)
        reached = await prometheus.get()
        checks = {
            "config": ReadyCheckOut(
                ok=True, detail=f"{len(loaded.services)} service(s) from {loaded.path}"
            ),
            "store": ReadyCheckOut(
                ok=writable,
                detail=f"{store.path} is writable"
                if writable
                else f"cannot write {store.path}"
                + (f": {store.write_failure}" if store.write_failure else ""),
            ),
            "prometheus": ReadyCheckOut(
                ok=reached,
                detail="ready" if reached else "Prometheus did not answer /-/ready with 200",
            ),
        }
        ready = all(c.ok for c in checks.values())
        if not ready:
            response.status_code = 503
        return ReadyOut(ready=ready, checks=checks)

    @app.get(
        "/metrics",
        tags=["probes"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        """The daemon's own metrics, in the Prometheus text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # Documents the scheme in the OpenAPI document; the check itself is the gate's, which
    # runs before any body is read.
    bearer = HTTPBearer(auto_error=False, description="[server].token_file")
    auth = [Security(bearer)]

    # Routes are registered flat on the app (no included router), so the gate can name
    # each request's route template for the metrics whatever FastAPI does with routers.
    def api_get(path: str, **options: Any) -> Callable[[Handler], Handler]:
        return app.get(f"/api/v1{path}", dependencies=auth, **options)

    def api_post(path: str, **options: Any) -> Callable[[Handler], Handler]:
        return app.post(f"/api/v1{path}", dependencies=auth, **options)

    def require_service(name: str) -> None:
        if name not in engine.loaded.services:
            known = ", ".join(sorted(engine.loaded.services)) or "none"
            raise HTTPException(404, f"unknown service {name!r}; services: {known}")

    @api_get("/status", response_model=StatusOut, responses=_ERRORS, tags=["state"])
    async def status() -> StatusOut:
        """Services (version, last known good, automation, checks) and rollbacks in flight."""
        loaded = engine.loaded
        names = list(loaded.services)

        def read() -> tuple[
            set[str], dict[str, Any], dict[str, str | None], list[RollbackOut], dict[str, Any]
        ]:
            scopes = store.paused()
            states = {n: store.service_state(n) for n in names}
            good = {n: engine.versions.last_known_good(n) for n in names}
            live = store.rollbacks(
                states=[RollbackState.PENDING, RollbackState.RUNNING, RollbackState.VERIFYING],
                limit=1000,
            )
            records = {
                n: store.version(n, s.current_version)
                for n, s in states.items()
                if s is not None and s.current_version is not None
            }
            return scopes, states, good, [_rollback_out(store, r) for r in live], records

        scopes, states, good, in_flight, records = await asyncio.to_thread(read)
        now = clock()
        services = []
        for name, service in loaded.services.items():
            state = states[name]
            checks = []
            for check in service.rules.check:
                check_state = engine.check_state(name, check.name)
                checks.append(
                    CheckOut(
                        name=check.name,
                        type=check.type,
                        action=check.action.value,
                        phase=check_state.phase.value,
                        blind=check_state.blind,
                        firing_series=[dict(labels) for labels in check_state.firing_series()],
                    )
                )
            services.append(
                ServiceOut(
                    name=name,
                    current_version=state.current_version if state else None,
                    current_since=state.current_since if state else None,
                    healthy_since=state.healthy_since if state else None,
                    last_known_good=good[name],
                    paused=name in scopes or "*" in scopes,
                    frozen=bool(state and state.frozen),
                    frozen_reason=state.frozen_reason if state else None,
                    canary_active=engine.canary_active(name),
                    checks=checks,
                    alerts=[str(r) for r in receiver.router.routes() if r.service == name],
                    bake=_bake_out(engine, service, state, records.get(name), now),
                )
            )
        return StatusOut(
            version=__version__,
            mode=loaded.config.daemon.mode.value,
            paused_all="*" in scopes,
            services=services,
            in_flight=in_flight,
        )

    @api_get("/rollbacks", response_model=HistoryOut, responses=_ERRORS, tags=["rollbacks"])
    async def history(query: Annotated[HistoryQuery, Query()]) -> HistoryOut:
        """Rollbacks, the latest first, each with its steps and the triggers it joined."""

        def read() -> list[RollbackOut]:
            found = store.rollbacks(
                service=query.service,
                states=None if query.state is None else [RollbackState(query.state)],
                limit=query.limit,
            )
            return [_rollback_out(store, r) for r in found]

        return HistoryOut(rollbacks=await asyncio.to_thread(read))

    @api_get(
        "/rollbacks/{rollback_id}",
        response_model=RollbackOut,
        responses={**_ERRORS, 404: {"model": ErrorOut, "description": "no such rollback"}},
        tags=["rollbacks"],
    )
    async def one_rollback(rollback_id: RollbackId) -> RollbackOut:
        def read() -> RollbackOut | None:
            found = store.rollback(rollback_id)
            return None if found is None else _rollback_out(store, found)

        answer = await asyncio.to_thread(read)
        if answer is None:
            raise HTTPException(404, f"no rollback {rollback_id}")
        return answer

    def submission_out(submission: Submission) -> SubmissionOut:
        rollback = submission.rollback
        decision = submission.decision
        return SubmissionOut(
            outcome=submission.outcome,
            reason=submission.reason,
            rollback_id=rollback.id if rollback else None,
            rollback=_rollback_out(store, rollback) if rollback else None,
            guards=[
                GuardOut(guard=g.guard, passed=g.passed, reason=g.reason)
                for g in (decision.guards if decision else ())
            ],
        )

    @api_post(
        "/rollbacks",
        status_code=202,
        response_model=SubmissionOut,
        responses={**_BODY_ERRORS, 404: {"model": ErrorOut, "description": "unknown service"}},
        tags=["rollbacks"],
    )
    async def request_rollback(body: RollbackRequest) -> SubmissionOut:
        """A manual rollback, through the same pipeline as every other: guards, executors,
        verification, audit. The answer says what the pipeline did (``outcome``); a refusal
        is an answer too, with the guard that refused."""
        require_service(body.service)
        trigger = Trigger(
            service=body.service,
            source="manual",
            reason=body.reason,
            at=clock(),
            automatic=False,
            to_version=body.to_version,
            requested_by=body.requested_by or "api",
        )
        try:
            submission = await pipeline.submit(trigger)
        except UnknownService as exc:  # removed by a reload meanwhile
            raise HTTPException(404, str(exc)) from None
        if submission.outcome == "unrecorded":
            raise StoreError(submission.reason)
        log.info(
            "manual rollback requested",
            service=body.service,
            by=trigger.requested_by,
            outcome=submission.outcome,
        )
        return submission_out(submission)

    decided: dict[int | str, dict[str, Any]] = {
        **_BODY_ERRORS,
        404: {"model": ErrorOut, "description": "no such rollback"},
        409: {"model": ErrorOut, "description": "the rollback is not waiting for approval"},
    }

    @api_post(
        "/rollbacks/{rollback_id}/approve",
        response_model=RollbackOut,
        responses=decided,
        tags=["rollbacks"],
    )
    async def approve(
        rollback_id: RollbackId, body: Annotated[DecisionRequest | None, Body()] = None
    ) -> RollbackOut:
        """Run a rollback that waits for approval."""
        try:
            rollback = await pipeline.approve(rollback_id, _who(body))
        except LookupError:
            raise HTTPException(404, f"no rollback {rollback_id}") from None
        return await asyncio.to_thread(_rollback_out, store, rollback)

    @api_post(
        "/rollbacks/{rollback_id}/reject",
        response_model=RollbackOut,
        responses=decided,
        tags=["rollbacks"],
    )
    async def reject(
        rollback_id: RollbackId, body: Annotated[DecisionRequest | None, Body()] = None
    ) -> RollbackOut:
        """Refuse a rollback that waits for approval; it never runs."""
        try:
            rollback = await pipeline.reject(
                rollback_id, _who(body), body.reason if body is not None else ""
            )
        except LookupError:
            raise HTTPException(404, f"no rollback {rollback_id}") from None
        return await asyncio.to_thread(_rollback_out, store, rollback)

    automation: dict[int | str, dict[str, Any]] = {
        **_BODY_ERRORS,
        404: {"model": ErrorOut, "description": "unknown service"},
    }

    @api_post(
        "/services/{name}/pause",
        response_model=AutomationOut,
        responses=automation,
        tags=["automation"],
    )
    async def pause(
        name: ScopeName, body: Annotated[AutomationRequest | None, Body()] = None
    ) -> AutomationOut:
        """Stop automatic rollbacks of a service, or of all (``*``). Checks keep running and
        reporting; people can still roll back by hand."""
        if name != "*":
            require_service(name)
        who = _who(body)
        now = clock()
        await asyncio.to_thread(store.set_pause, name, True, now, who)
        engine.bus.publish(
            "service.paused", now, None if name == "*" else name, data={"scope": name, "by": who}
        )
        scopes = await asyncio.to_thread(store.paused)
        return AutomationOut(scope=name, paused=True, thawed=False, paused_scopes=sorted(scopes))

    @api_post(
        "/services/{name}/resume",
        response_model=AutomationOut,
        responses=automation,
        tags=["automation"],
    )
    async def resume(
        name: ScopeName, body: Annotated[AutomationRequest | None, Body()] = None
    ) -> AutomationOut:
        """Restart automatic rollbacks. For one service this also thaws it when it was
        frozen (by a failed rollback, or max_rollbacks): a person has looked."""
        if name != "*":
            require_service(name)
        who = _who(body)
        now = clock()

        def write() -> tuple[str | None, set[str]]:
            store.set_pause(name, False, now, who)
            state = None if name == "*" else store.service_state(name)
            was_frozen = None
            if state is not None and state.frozen:
                was_frozen = state.frozen_reason or "no reason recorded"
                store.set_frozen(name, False)
            return was_frozen, store.paused()

        was_frozen, scopes = await asyncio.to_thread(write)
        data: dict[str, Any] = {"scope": name, "by": who}
        if was_frozen is not None:
            data["thawed"] = was_frozen
        engine.bus.publish("service.resumed", now, None if name == "*" else name, data=data)
        return AutomationOut(
            scope=name,
            paused=name in scopes or "*" in scopes,
            thawed=was_frozen is not None,
            paused_scopes=sorted(scopes),
        )

    @api_post(
        "/releases",
        response_model=ReleaseOut,
        responses={
            **_BODY_ERRORS,
            404: {"model": ErrorOut, "description": "unknown service"},
            409: {
                "model": ErrorOut,
                "description": "the service discovers its version from version_query",
            },
        },
        tags=["releases"],
    )
    async def release(body: ReleaseRequest) -> ReleaseOut:
        """Record a release (from CI), for a service whose version is not discovered from
        metrics."""
        require_service(body.service)
        service = engine.loaded.services[body.service]
        if service.rules.service.version_query:
            raise HTTPException(
                409,
                f"service {body.service!r} reads its version from version_query; a release "
                "recorded here would flap against it. Record releases only for services "
                "without one",
            )
        now = clock()
        try:
            seen = await asyncio.to_thread(
                engine.versions.record_release, body.service, body.version, now, dict(body.meta)
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        if seen.changed:
            engine.metrics.version_changes.labels(body.service).inc()
            if seen.previous is not None:
                with contextlib.suppress(KeyError):
                    engine.metrics.version_info.remove(body.service, seen.previous)
            engine.metrics.version_info.labels(body.service, body.version).set(1)
            engine.bus.publish(
                "version.changed",
                now,
                body.service,
                data={
                    "from_version": seen.previous,
                    "to_version": body.version,
                    "source": "api",
                    "meta": dict(body.meta),
                },
            )
            if seen.bad:
                engine.bus.publish(
                    "release.bad_version_deployed",
                    now,
                    body.service,
                    data={"version": body.version, "source": "api"},
                )
        vouched = body.meta.get("known_good") == "true" and seen.current == body.version
        if vouched and await asyncio.to_thread(store.mark_baked, body.service, body.version, now):
            # CI vouches for it; an alert-only service without Alertmanager to read has no
            # other way to a last known good. A version marked bad is not marked.
            engine.bus.publish(
                "version.baked",
                now,
                body.service,
                data={"version": body.version, "source": "api", "known_good": True},
            )
        return ReleaseOut(
            service=body.service,
            version=body.version,
            changed=seen.changed,
            previous=seen.previous,
            bad=seen.bad,
        )

    @api_get("/alerts", response_model=AlertsOut, responses=_ERRORS, tags=["alerts"])
    async def alerts(query: Annotated[AlertsQuery, Query()]) -> AlertsOut:
        """Alerts received from Alertmanager, the latest first; ``service`` filters on the
        service they matched."""
        found = await asyncio.to_thread(store.alerts, query.service, None, query.limit)
        return AlertsOut(alerts=[_alert_out(a) for a in found])

    @api_post(
        "/alertmanager",
        response_model=WebhookOut,
        responses={
            **_BODY_ERRORS,
            503: {"model": ErrorOut, "description": "not stored; Alertmanager retries"},
        },
        tags=["alerts"],
    )
    async def alertmanager(payload: AlertmanagerWebhook) -> WebhookOut | JSONResponse:
        """Alertmanager's webhook (payload version 4). Answers 200 only once every alert of
        the delivery is stored; a matched firing alert enters the rollback pipeline."""
        delivery = Delivery(
            receiver=payload.receiver,
            group_key=payload.groupKey,
            alerts=[
                IncomingAlert(
                    fingerprint=a.fingerprint,
                    status=a.status,
                    starts_at=a.startsAt,
                    ends_at=a.endsAt,
                    labels=a.labels,
                    annotations=a.annotations,
                    generator_url=a.generatorURL,
                )
                for a in payload.alerts
            ],
        )
        try:
            results = await receiver.receive(delivery)
        except StoreError as exc:
            log.error("alerts not stored: Alertmanager will retry", error=str(exc))
            return JSONResponse({"detail": f"alerts not stored, retry: {exc}"}, status_code=503)
        fresh = sum(1 for r in results if r.new)
        # truncatedAlerts: alerts of the group Alertmanager left out (its max_alerts); they
        # are never seen here, and one firing alert of a service is enough to roll it back.
        log.info(
            "alertmanager delivery",
            receiver=payload.receiver,
            alerts=len(results),
            new=fresh,
            truncated=payload.truncatedAlerts,
        )
        return WebhookOut(
            received=len(results),
            new=fresh,
            alerts=[
                WebhookAlertOut(
                    id=r.alert.id,
                    fingerprint=r.alert.fingerprint,
                    status=r.alert.status,
                    alertname=r.alert.alertname,
                    service=r.alert.matched_service,
                    new=r.new,
                    deliveries=r.alert.deliveries,
                    outcome=r.alert.outcome,
                    rollback_id=r.alert.rollback_id,
                )
                for r in results
            ],
        )

    app.add_middleware(
        _Gate,
        token=token,
        max_body=max_body,
        webhook_max_body=max_body if webhook_max_body is None else webhook_max_body,
        metrics=metrics,
        routes=lambda: app.router.routes,
    )
    return app


# -- serving it inside the daemon -----------------------------------------------------------


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9095"`` or ``"[::1]:9095"`` -> host and port."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would take SIGINT and SIGTERM for itself; they are the daemon's, which
        # stops the server through ApiServer.stop().
        yield


class ApiServer:
    """Serves an ASGI app on ``listen`` as a task of the running loop."""

    def __init__(
        self,
        app: ASGIApp,
        listen: str,
        *,
        address_file: Path | None = None,
        on_exit: Callable[[], None] | None = None,
        graceful: int = 5,
    ) -> None:
        self.app = app
        self.listen = listen
        self.address_file = address_file
        self.on_exit = on_exit
        self.graceful = graceful
        self._socket: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.host = ""
        self.port = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _bind(self) -> socket.socket:
        host, port = split_listen(self.listen)
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            # Listening now, not when uvicorn gets to it: clients that connect as soon as
            # the address is known wait in the backlog instead of being refused.
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def start(self) -> None:
        """Bind (raises OSError: address in use, not allowed) and start serving."""
        try:
            self._socket = self._bind()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self.listen}: {exc.strerror}") from exc
        bound = self._socket.getsockname()
        self.host, self.port = str(bound[0]), int(bound[1])
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,  # the daemon's logging (structlog) already handles uvicorn's
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=self.graceful,
            timeout_keep_alive=5,
            limit_concurrency=256,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(
            self._server.serve(sockets=[self._socket]), name="rollbackd-api"
        )
        self._task.add_done_callback(self._exited)
        if self.address_file is not None:
            _write_atomically(self.address_file, f"{self.host}:{self.port}\n")
        log.info("api listening", url=self.url)

    def _exited(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        error = None if task.cancelled() else task.exception()
        log.error("the API server stopped by itself: stopping the daemon", error=repr(error))
        if self.on_exit is not None:
            self.on_exit()

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.graceful + 5)
            except TimeoutError:
                self._task.cancel()
            except Exception as exc:  # the server's own failure, already logged
                log.warning("the API server ended with an error", error=repr(exc))
        if self._socket is not None:
            self._socket.close()
        if self.address_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.address_file.unlink()


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        Path(temporary).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(temporary).unlink()
        raise


class DaemonParts(Protocol):
    """What ``start_api`` needs of the daemon."""

    loaded: LoadedConfig
    metrics: Metrics
    pipeline: Pipeline
    store: Store

    def stop(self) -> None: ...


class ApiStartError(Exception):
    """The API cannot be served: no token, or the address cannot be bound."""


async def start_api(daemon: DaemonParts) -> ApiServer:
    """Read the token, build the app and serve it on ``[server].listen``."""
    server = daemon.loaded.config.server
    try:
        token = read_api_token(server)
    except SecretError as exc:
        raise ApiStartError(f"[server] {exc}") from None
    client = daemon.pipeline.engine.client

    async def prometheus_ready() -> bool:
        return await client.aready(timeout=2.0)

    app = create_app(
        pipeline=daemon.pipeline,
        registry=daemon.metrics.registry,
        token=token,
        max_body=server.max_body,
        webhook_max_body=server.webhook_max_body,
        prometheus_ready=prometheus_ready,
    )
    api = ApiServer(
        app,
        server.listen,
        address_file=daemon.store.path.parent / ADDRESS_FILE,
        on_exit=daemon.stop,
    )
    try:
        await api.start()
    except OSError as exc:
        raise ApiStartError(str(exc.strerror or exc)) from None
    return api
