"""The http executor against a real local server: bodies, headers, tokens, expected statuses,
which requests are retried and which never are, and timeouts against a server that hangs."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from rollbackd.config.loader import load_rule_file
from rollbackd.executors.base import RollbackContext
from rollbackd.executors.http import HttpExecutor, HttpRun, redact_url
from support.hostile_http import (
    CLOSE,
    HungServer,
    Recorded,
    Reply,
    Responder,
    always,
    closed_port,
    in_turn,
)

RULES = Path(__file__).resolve().parents[1] / "rules"
TOKEN = "tok-9f8e7d6c5b4a"
REASON = 'error rate 5.2% > 1% on "checkout"\nsecond line \\ with {braces} and </tags>'
OK = Reply(200, b'{"ok": true}')
ANSWER_OK = always(OK)


class Server:
    """A threaded HTTP/1.1 server taking every method, recording each request."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                recorded = Recorded(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query, keep_blank_values=True),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length) if length else b"",
                )
                with outer._lock:
                    outer._requests.append(recorded)
                    number = len(outer._requests)
                reply = outer.responder(recorded, number)
                if reply is None:
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[Server] = []

    def start(responder: Responder = ANSWER_OK) -> Server:
        server = Server(responder)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def context(**changes: Any) -> RollbackContext:
    values: dict[str, Any] = {
        "service": "billing",
        "from_version": "1.5.0",
        "to_version": "1.4.2",
        "reason": REASON,
        "rollback_id": "rb-7",
    }
    values.update(changes)
    return RollbackContext(**values)


def spec(url: str, **changes: Any) -> HttpExecutor:
    return HttpExecutor.model_validate({"type": "http", "url": url, **changes})


def fast(spec: HttpExecutor) -> HttpRun:
    """The spec's runner with retries a few milliseconds apart rather than seconds."""
    return HttpRun(spec, backoff=0.01)


async def test_json_body_placeholders_escaped_into_valid_json(serve: Any) -> None:
    server = serve()
    body = '{"service": "{service}", "version": "{to_version}", "reason": "{reason}"}'
    result = await spec(f"{server.url}/rollback", body=body).runner().run(context())
    assert result.ok, result
    (request,) = server.requests
    assert json.loads(request.body) == {"service": "billing", "version": "1.4.2", "reason": REASON}
    assert request.headers["content-type"] == "application/json"


async def test_workflow_platform_rule_sends_exactly_the_expected_request(
    serve: Any, tmp_path: Path
) -> None:
    server = serve(always(Reply(202, b'{"run_id": 881}')))
    token_file = tmp_path / "ci-token"
    token_file.write_text(TOKEN + "\n")
    rules, problems = load_rule_file(RULES / "workflow-api.toml")
    assert rules is not None, problems
    (rollback,) = rules.rollback
    assert isinstance(rollback, HttpExecutor)
    rollback = rollback.model_copy(
        update={
            "url": f"{server.url}/api/workflows/rollback",
            "bearer_token_file": str(token_file),
        }
    )

    result = await rollback.runner().run(context())

    assert result.ok, result
    assert result.summary == "HTTP 202"
    assert result.stdout_tail == '{"run_id": 881}'
    assert result.command == ("POST", f"{server.url}/api/workflows/rollback")
    (request,) = server.requests
    assert request.method == "POST"
    assert request.path == "/api/workflows/rollback"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert json.loads(request.body) == {
        "workflow_id": "wf-billing-deploy",
        "target_version": "1.4.2",
        "reason": REASON,
        "force": False,
    }


async def test_headers_with_placeholders_arrive(serve: Any) -> None:
    server = serve()
    headers = {"X-Service": "{service}", "X-Reason": "{reason}", "X-Static": "abc"}
    result = await spec(server.url, method="GET", headers=headers).runner().run(context())
    assert result.ok, result
    (request,) = server.requests
    assert request.headers["x-service"] == "billing"
    assert request.headers["x-static"] == "abc"
    # A line break would end the header; it arrives as a space instead.
    assert request.headers["x-reason"] == REASON.replace("\n", " ")


async def test_placeholders_are_quoted_inside_the_url(serve: Any) -> None:
    server = serve()
    url = server.url + "/services/{service}/rollback?reason={reason}&to={to_version}"
    reason = "a/b?c=d&e#f g"
    result = await spec(url, method="GET").runner().run(context(reason=reason))
    assert result.ok, result
    (request,) = server.requests
    assert request.path == "/services/billing/rollback"
    assert request.query == {"reason": [reason], "to": ["1.4.2"]}


async def test_plain_text_body_substituted_verbatim(serve: Any) -> None:
    server = serve()
    runner = spec(
        server.url, body="rollback {service} to {to_version}: {reason}", headers={}
    ).runner()
    result = await runner.run(context(reason='say "hi"'))
    assert result.ok, result
    (request,) = server.requests
    assert request.body == b'rollback billing to 1.4.2: say "hi"'


async def test_bearer_token_from_file_arrives_and_is_never_reported(
    serve: Any, tmp_path: Path
) -> None:
    def echo(request: Recorded, _n: int) -> Reply:
        # A server that echoes the request back, Authorization included.
        return Reply(500, json.dumps({"seen": request.headers}).encode())

    server = serve(echo)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    result = await spec(server.url, bearer_token_file=str(token_file)).runner().run(context())
    assert not result.ok
    (request,) = server.requests
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    reported = " ".join([result.summary, result.stdout_tail, result.stderr_tail, *result.command])
    assert TOKEN not in reported
    assert "[redacted]" in result.stdout_tail


async def test_bearer_token_from_environment(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI_TOKEN", TOKEN)
    server = serve()
    result = await spec(server.url, bearer_token_env="CI_TOKEN").runner().run(context())
    assert result.ok, result
    assert server.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


async def test_missing_token_fails_without_sending(serve: Any, tmp_path: Path) -> None:
    server = serve()
    missing = tmp_path / "no-token"
    result = await spec(server.url, bearer_token_file=str(missing)).runner().run(context())
    assert not result.ok
    assert str(missing) in result.summary
    assert "nothing was sent" in result.summary
    assert server.requests == []


@pytest.mark.parametrize(
    ("status", "expect", "ok"),
    [
        (200, [], True),
        (204, [], True),
        (302, [], False),
        (404, [], False),
        (200, [202], False),
        (202, [200, 201, 202], True),
        (409, [200, 409], True),
    ],
)
async def test_expect_status(serve: Any, status: int, expect: list[int], ok: bool) -> None:
    server = serve(always(Reply(status, b"")))
    runner = spec(server.url, method="PUT", expect_status=expect).runner()
    result = await runner.run(context())
    assert result.ok is ok
    assert result.summary.startswith(f"HTTP {status}")
    if expect and not ok:
        assert result.summary == f"HTTP {status}; expected {', '.join(map(str, expect))}"


async def test_put_500_retried_up_to_retries(serve: Any) -> None:
    server = serve(always(Reply(500, b"boom")))
    result = await fast(spec(server.url, method="PUT", retries=2)).run(context())
    assert not result.ok
    assert len(server.requests) == 3
    assert result.summary == "HTTP 500 after 3 attempts"
    assert result.stdout_tail == "boom"


async def test_put_succeeds_on_a_retry(serve: Any) -> None:
    server = serve(in_turn(Reply(503, b""), Reply(429, b""), OK))
    result = await fast(spec(server.url, method="PUT", retries=2)).run(context())
    assert result.ok, result
    assert len(server.requests) == 3
    assert result.summary == "HTTP 200 after 3 attempts"


async def test_post_never_retried(serve: Any) -> None:
    server = serve(always(Reply(500, b"")))
    result = await fast(spec(server.url, method="POST", retries=2)).run(context())
    assert not result.ok
    assert len(server.requests) == 1
    assert result.summary == "HTTP 500"


async def test_post_not_retried_after_the_connection_drops(serve: Any) -> None:
    # The request arrived; the deployment may have started. Sending it again could start
    # a second one.
    server = serve(always(CLOSE))
    result = await fast(spec(server.url, method="POST", retries=3)).run(context())
    assert not result.ok
    assert len(server.requests) == 1
    assert result.summary.startswith("request failed")


async def test_post_marked_idempotent_is_retried(serve: Any) -> None:
    server = serve(in_turn(CLOSE, OK))
    runner = fast(spec(server.url, method="POST", retries=2, idempotent=True))
    result = await runner.run(context())
    assert result.ok, result
    assert len(server.requests) == 2


async def test_client_error_not_retried(serve: Any) -> None:
    server = serve(always(Reply(404, b"no such workflow")))
    result = await fast(spec(server.url, method="PUT", retries=3)).run(context())
    assert not result.ok
    assert len(server.requests) == 1
    assert result.summary == "HTTP 404"
    assert result.stdout_tail == "no such workflow"


async def test_connection_refused_reported() -> None:
    with closed_port() as url:
        result = await fast(spec(url, method="GET", retries=2)).run(context())
    assert not result.ok
    assert result.summary.startswith("request failed: ConnectError")
    assert result.summary.endswith("after 3 attempts")


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_hung_server_times_out(method: str) -> None:
    with HungServer() as hung:
        runner = fast(spec(hung.url, method=method, retries=2, timeout="300ms"))
        result = await runner.run(context())
    assert not result.ok
    assert result.timed_out
    assert result.summary.startswith("timed out after 300ms")


async def test_large_response_keeps_a_bounded_tail(serve: Any) -> None:
    body = b"x" * 200_000 + b"END"
    server = serve(always(Reply(200, body, "text/plain")))
    result = await spec(server.url, method="GET").runner().run(context())
    assert result.ok
    assert len(result.stdout_tail) <= 16384
    assert result.stdout_tail.endswith("xEND")


async def test_unsafe_version_refused_and_nothing_sent(serve: Any) -> None:
    server = serve()
    runner = spec(server.url + "/deploy/{to_version}").runner()
    result = await runner.run(context(to_version="../../admin"))
    assert not result.ok
    assert "nothing was sent" in result.summary
    assert server.requests == []


def test_redact_url() -> None:
    redacted = redact_url("https://deploy:hunter2@ci.example.com/x?api_token=abc123&env=prod")
    assert "hunter2" not in redacted
    assert "abc123" not in redacted
    assert redacted.startswith("https://deploy:[redacted]@ci.example.com/x?")
    assert "env=prod" in redacted
    plain = "https://ci.example.com/api/workflows/rollback?service=billing"
    assert redact_url(plain) == plain


def test_runner_and_describe() -> None:
    runner = spec("https://user:pw@ci.example.com/hook", method="PUT").runner()
    assert isinstance(runner, HttpRun)
    assert runner.describe() == "http PUT https://user:[redacted]@ci.example.com/hook"


async def test_expected_5xx_is_not_retried(serve: Any) -> None:
    server = serve(always(Reply(503, b"")))
    runner = fast(spec(server.url, method="PUT", retries=2, expect_status=[503]))
    result = await runner.run(context())
    assert result.ok
    assert len(server.requests) == 1
