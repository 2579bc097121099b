"""Real local peers for notifier tests, and the events they are fed.

* The HTTP peers come from :mod:`support.hostile_http` (a recording server answering by a
  responder; a server that never answers). :class:`Stall` is a responder that holds each
  request until released, so a test can count attempts that time out.
* :class:`SmtpSink` is aiosmtpd's real SMTP server on 127.0.0.1, recording every message,
  answering DATA as scripted, optionally requiring a login.
* :func:`pipeline_event` builds events shaped exactly as ``rollbackd.runtime.pipeline`` publishes
  them, the trigger made by ``Trigger.from_firing`` from a real measurement.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from prometheus_client import CollectorRegistry

from rollbackd.checks.base import Action, Comparison, Threshold
from rollbackd.checks.judge import Baseline, Measurement
from rollbackd.config.settings import LogFormat
from rollbackd.core.model import Event, JSONValue
from rollbackd.core.samples import Verdict
from rollbackd.logs import configure
from rollbackd.notify.base import NotifierSpec
from rollbackd.notify.dispatcher import RetryPolicy
from rollbackd.notify.grafana import GrafanaNotifier
from rollbackd.notify.pagerduty import PagerDutyNotifier
from rollbackd.notify.slack import SlackNotifier
from rollbackd.notify.webhook import WebhookNotifier
from rollbackd.runtime.engine import Firing
from rollbackd.runtime.pipeline import Trigger
from support.hostile_http import CLOSE as CLOSE
from support.hostile_http import HungServer as HungServer
from support.hostile_http import Recorded as Recorded
from support.hostile_http import RecordingServer as RecordingServer
from support.hostile_http import Reply as Reply
from support.hostile_http import always as always
from support.hostile_http import in_turn as in_turn
from support.hostile_http import json_reply as json_reply

FAST = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05, deadline=60.0, attempt_timeout=10.0)
"""Retries without waiting on wall time; the attempt timeout only bounds a broken test."""

OK = Reply(200, b"ok", "text/plain")


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], *, timeout: float = 15.0, what: str = ""
) -> None:
    """Poll ``condition`` until true, failing after ``timeout`` seconds (bounded polling,
    never a sleep standing in for synchronisation)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or condition}")
        await asyncio.sleep(0.01)


def json_body(request: Recorded) -> Any:
    return json.loads(request.body)


def secret_file(directory: Path, name: str, value: str) -> str:
    path = directory / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class HeaderServer:
    """Like :class:`RecordingServer`, for answers that need headers (``Retry-After``)."""

    def __init__(self, answers: list[Answer]) -> None:
        self.requests: list[Recorded] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                server.requests.append(
                    Recorded(
                        method="POST",
                        path=self.path,
                        query={},
                        headers={k.lower(): v for k, v in self.headers.items()},
                        body=self.rfile.read(length),
                    )
                )
                answer = answers[min(len(server.requests), len(answers)) - 1]
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class Stall:
    """A responder that holds every request until :meth:`release` (or ``limit`` seconds),
    then answers ``reply``: the server counts attempts that the client gave up on. Use
    ``CLOSE`` when the client will have gone by then, so the server writes to no one."""

    def __init__(self, reply: Reply | None = OK, limit: float = 60.0) -> None:
        self._released = threading.Event()
        self._reply = reply
        self._limit = limit

    def __call__(self, request: Recorded, number: int) -> Reply | None:
        self._released.wait(self._limit)
        return self._reply

    def release(self) -> None:
        self._released.set()


@contextmanager
def json_logs() -> Iterator[None]:
    """The daemon's JSON logging at debug level, to the current ``sys.stderr`` (which
    capsys/capfd capture); the previous logging setup is restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    structlog_config = structlog.get_config()
    configure(LogFormat.JSON, "debug")
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**structlog_config)


@dataclass
class _Handler:
    replies: list[str]
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    attempts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.attempts += 1
            reply = self.replies[min(self.attempts, len(self.replies)) - 1]
            if reply.startswith("250"):
                content = envelope.content
                raw = content if isinstance(content, bytes) else str(content).encode()
                parsed = message_from_bytes(raw, policy=policy.default)
                assert isinstance(parsed, EmailMessage)
                self.messages.append(parsed)
                self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
        return reply


class SmtpSink:
    """aiosmtpd on a free port of 127.0.0.1. ``replies`` answer each DATA in turn, the last
    repeating ("250 OK" accepts; "451 ..." is transient; "554 ..." is final). With
    ``login`` (user, password) the server requires AUTH, over plain text."""

    def __init__(
        self, replies: tuple[str, ...] = ("250 OK",), login: tuple[str, str] | None = None
    ) -> None:
        self.handler = _Handler(list(replies))
        self.logins: list[tuple[str, bool]] = []
        kwargs: dict[str, Any] = {}
        if login is not None:
            kwargs = {
                "authenticator": self._authenticator(login),
                "auth_required": True,
                "auth_require_tls": False,
            }
        self.port = _free_port()
        self._controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port, ready_timeout=10, **kwargs
        )

    def _authenticator(self, login: tuple[str, str]) -> Callable[..., AuthResult]:
        def check(
            server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, data: Any
        ) -> AuthResult:
            ok = (
                isinstance(data, LoginPassword)
                and data.login.decode() == login[0]
                and data.password.decode() == login[1]
            )
            self.logins.append((data.login.decode() if isinstance(data, LoginPassword) else "", ok))
            return AuthResult(success=ok, handled=False)

        return check

    @property
    def messages(self) -> list[EmailMessage]:
        with self.handler.lock:
            return list(self.handler.messages)

    @property
    def envelopes(self) -> list[tuple[str, list[str]]]:
        with self.handler.lock:
            return list(self.handler.envelopes)

    @property
    def attempts(self) -> int:
        with self.handler.lock:
            return self.handler.attempts

    def __enter__(self) -> Self:
        self._controller.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._controller.stop()


def _free_port() -> int:
    # aiosmtpd's Controller cannot take port 0 (it connects to its own port to start), so a
    # port is picked by binding one and letting it go.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


QUERY = (
    'sum(rate(http_requests_total{service="checkout",code=~"5.."}[1m]))'
    ' / sum(rate(http_requests_total{service="checkout"}[1m]))'
)


def firing_trigger(at: float = 1_700_000_000.0) -> Trigger:
    """The trigger the pipeline makes from a real error-rate firing."""
    measurement = Measurement(
        check="error_rate",
        labels=(("version", "2.0.0"),),
        verdict=Verdict.BREACH,
        value=0.125,
        threshold=Threshold(Comparison.ABOVE, 0.05),
        baseline=Baseline(0.01, "last known good 1.0.0"),
        traffic=20.0,
        query=QUERY,
        reason="error ratio 12.5% > 5% & p99 <ok>; 20 req/s",
    )
    firing = Firing(
        service="checkout",
        check="error_rate",
        action=Action.ROLLBACK,
        measurement=measurement,
        version="2.0.0",
        breach_started=at - 30,
        at=at,
    )
    return Trigger.from_firing(firing)


GUARDS: list[JSONValue] = [
    {"guard": "paused", "passed": True, "reason": "automation is on"},
    {"guard": "cooldown", "passed": True, "reason": "no rollback in the last 15m"},
    {"guard": "mode", "passed": True, "reason": "mode auto: execute"},
]


def pipeline_event(
    kind: str = "rollback.succeeded",
    *,
    service: str = "checkout",
    rollback_id: int = 7,
    at: float = 1_700_000_100.0,
    event_id: int | None = 42,
    **extra: JSONValue,
) -> Event:
    """An event as ``Pipeline._publish`` sends it, with guards as rollback.pending and
    rollback.refused carry them."""
    trigger = firing_trigger()
    data: dict[str, JSONValue] = {
        "rollback_id": rollback_id,
        "from_version": "2.0.0",
        "to_version": "1.0.0",
        "reason": trigger.reason,
        "source": trigger.source,
        "trigger": {
            "source": trigger.source,
            "reason": trigger.reason,
            "at": trigger.at,
            "breach_started": trigger.breach_started,
            "requested_by": None,
            **trigger.detail,
        },
        "guards": GUARDS,
        **extra,
    }
    return Event(type=kind, at=at, service=service, rollback_id=rollback_id, data=data, id=event_id)


def plain_event(kind: str, service: str | None = "checkout", **data: JSONValue) -> Event:
    return Event(type=kind, at=1_700_000_200.0, service=service, data=data, id=43)


SLACK_PATH = "/services/T0001/B0002/XoXoSeCrEtPaTh"
ROUTING_KEY = "R0UT1NGKEY0123456789abcdef"
TOKEN = "glsa_GrafanaToken_0123456789"
SIGNING = "whsec-signing-secret-42"


def slack_spec(directory: Path, url: str, **extra: Any) -> SlackNotifier:
    """``url`` is the whole webhook URL, read from a secret file."""
    return SlackNotifier.model_validate(
        {"name": "ops", "type": "slack", "url_file": secret_file(directory, "slack", url), **extra}
    )


def webhook_spec(directory: Path, url: str, **extra: Any) -> WebhookNotifier:
    return WebhookNotifier.model_validate({"name": "hook", "type": "webhook", "url": url, **extra})


def pagerduty_spec(directory: Path, url: str, **extra: Any) -> PagerDutyNotifier:
    key = secret_file(directory, "pd", ROUTING_KEY)
    return PagerDutyNotifier.model_validate(
        {"name": "pager", "type": "pagerduty", "url": url, "routing_key_file": key, **extra}
    )


def grafana_spec(directory: Path, url: str, **extra: Any) -> GrafanaNotifier:
    token = secret_file(directory, "grafana", TOKEN)
    return GrafanaNotifier.model_validate(
        {"name": "dash", "type": "grafana", "url": url, "token_file": token, **extra}
    )


SPECS: dict[str, Callable[[Path, str], NotifierSpec]] = {
    "slack": lambda d, url: slack_spec(d, url + SLACK_PATH),
    "webhook": lambda d, url: webhook_spec(
        d, url + "/hook", signing_secret_file=secret_file(d, "signing", SIGNING)
    ),
    "pagerduty": pagerduty_spec,
    "grafana": grafana_spec,
}
"""Each HTTP notifier pointed at a server's base URL, every secret from a file."""
