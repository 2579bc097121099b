"""Local HTTP servers on 127.0.0.1 that misbehave on purpose, for client tests.

* :class:`RecordingServer` records every request and answers what a ``responder`` says:
  an error status, a plain-text 503 as Prometheus sends while it starts, garbage, or
  nothing at all (the connection is closed without an answer).
* :class:`HungServer` listens but never accepts: connections complete (the kernel's
  backlog does that) and then wait forever for an answer.
* :func:`closed_port` holds a port bound but not listening: connecting is refused.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Recorded:
    """One request as it arrived."""

    method: str
    path: str
    """Without the query string."""
    query: dict[str, list[str]]
    headers: dict[str, str]
    """Header names lower-cased."""
    body: bytes

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"


CLOSE = None
"""A responder's answer meaning: close the connection without answering."""

Responder = Callable[[Recorded, int], Reply | None]
"""Given the request and its number (1-based), what to answer (None: hang up)."""

STARTING = Reply(503, b"Service Unavailable", "text/plain; charset=utf-8")
"""What every Prometheus API route answers before its database is ready."""


def json_reply(status: int, body: Any) -> Reply:
    return Reply(status, json.dumps(body).encode())


def success(result: Any, result_type: str = "vector", **extra: Any) -> Reply:
    """A Prometheus success envelope around ``result``."""
    body = {"status": "success", "data": {"resultType": result_type, "result": result}}
    return json_reply(200, {**body, **extra})


def error(status: int, error_type: str, message: str) -> Reply:
    """A Prometheus error envelope, e.g. ``error(400, "bad_data", "parse error")``."""
    return json_reply(status, {"status": "error", "errorType": error_type, "error": message})


def always(reply: Reply | None) -> Responder:
    return lambda _request, _n: reply


def in_turn(*replies: Reply | None) -> Responder:
    """Answer with each reply in turn; the last one repeats."""
    return lambda _request, n: replies[min(n, len(replies)) - 1]


class RecordingServer:
    """A threaded HTTP/1.0 server answering by ``responder``, recording every request."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

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
                reply = server._record(recorded)
                if reply is None:
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def _record(self, request: Recorded) -> Reply | None:
        with self._lock:
            self._requests.append(request)
            number = len(self._requests)
        return self.responder(request, number)

    @property
    def port(self) -> int:
        port: int = self._httpd.server_address[1]
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class HungServer:
    """Listens and never accepts: a request is sent and no answer ever comes."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    """The URL of a port held bound but not listening: every connection is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
