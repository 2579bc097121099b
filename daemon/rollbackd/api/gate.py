"""The ASGI gate in front of every route: the bearer token and the body limit.

Two checks must come before FastAPI reads anything, so they are ASGI middleware rather
than FastAPI dependencies:

* the bearer token, on every route but ``/healthz``, ``/readyz``, ``/metrics`` and the
  OpenAPI document (deny by default: an unknown path without a token is a 401 too), compared
  in constant time. In a FastAPI dependency it would come too late: FastAPI reads and
  parses the body before dependencies run, so a caller without the token would get the
  daemon to read its body and would be answered 400/422 instead of 401;
* the body limit, ``[server].max_body`` (``webhook_max_body`` for Alertmanager's webhook,
  which gets a whole alert group in one delivery): a declared length over it is refused at
  once with 413, and a streamed body is counted as it arrives and refused once it passes
  the limit. Only a caller with the token gets as far as sending a body.

The gate also counts every answer by route template (``ApiMetrics``), and answers 405 with
every method the path allows.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rollbackd.api.api_metrics import ApiMetrics
from rollbackd.api.models import ErrorOut
from rollbackd.logs import get_logger

log = get_logger("rollbackd.server")

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
"""The only routes answered without the token: probes, metrics and the API's description."""
WEBHOOK_PATH = "/api/v1/alertmanager"
"""Alertmanager's webhook. Its 413 names the fix: Alertmanager does not retry a 4xx, so an
oversized delivery (one large alert group) would otherwise be lost without a word here."""
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


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


class Gate:
    """ASGI middleware in front of every route: the token, then the body limit (see the
    module's doc); it also counts every answer in ``ApiMetrics``, by route template."""

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
