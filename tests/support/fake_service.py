"""A fake service for Prometheus to scrape: request counters, a latency histogram and its
build info, with the version, error ratio, latency and traffic settable while it runs.

In a test::

    with FakeService("checkout", "1.0.0", error_ratio=0.01) as svc:
        ...  # scrape svc.address
        svc.version = "2.0.0"

As a separate process (only the standard library is needed)::

    python tests/support/fake_service.py --port 0 --port-file /tmp/port \\
        --service checkout --version 1.0.0 --error-ratio 0.01

and switch it from outside (a deploy command, say)::

    curl -X POST -d '{"version": "2.0.0", "error_ratio": 0.3}' http://127.0.0.1:PORT/control

Counters advance by ``rps x seconds elapsed`` each time they are read (a scrape) and just
before any setting changes, so each interval's requests are counted with the settings in
force then. Requests are split into ``code="500"`` (``error_ratio`` of them) and
``code="200"``; every request takes ``latency_seconds``. Counters are kept per version: an
old version's series stay exposed, no longer increasing (a rate over them falls to zero).
``app_build_info`` shows the current version only.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, math.inf)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SETTINGS = ("version", "error_ratio", "latency_seconds", "rps")


@dataclass
class _Counters:
    ok: float = 0.0
    errors: float = 0.0
    buckets: list[float] = field(default_factory=lambda: [0.0] * len(BUCKETS))
    count: float = 0.0
    total_seconds: float = 0.0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _check_settings(changes: dict[str, Any]) -> dict[str, Any]:
    """Validated settings; raises ValueError naming the first bad one."""
    unknown = sorted(set(changes) - set(_SETTINGS))
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}; known: {', '.join(_SETTINGS)}")
    checked: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "version":
            if not isinstance(value, str) or not value:
                raise ValueError("version must be a non-empty string")
            checked[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ValueError(f"{key} must be a number")
        if value < 0 or (key == "error_ratio" and value > 1) or math.isinf(value):
            raise ValueError(f"{key} out of range: {value}")
        checked[key] = float(value)
    return checked


class FakeService:
    """An exporter on 127.0.0.1, served from a background thread."""

    def __init__(
        self,
        service: str = "checkout",
        version: str = "1.0.0",
        *,
        error_ratio: float = 0.0,
        latency_seconds: float = 0.03,
        rps: float = 10.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.service = service
        self._host = host
        self._requested_port = port
        self._lock = threading.Lock()
        settings = _check_settings(
            {
                "version": version,
                "error_ratio": error_ratio,
                "latency_seconds": latency_seconds,
                "rps": rps,
            }
        )
        self._version: str = settings["version"]
        self._error_ratio: float = settings["error_ratio"]
        self._latency: float = settings["latency_seconds"]
        self._rps: float = settings["rps"]
        self._counters: dict[str, _Counters] = {self._version: _Counters()}
        self._last = time.monotonic()
        self._scrapes = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the fake service is already running")
        server = ThreadingHTTPServer((self._host, self._requested_port), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        with self._lock:
            self._last = time.monotonic()
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-service-{self.service}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)

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

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the fake service is not running")
        port: int = self._server.server_address[1]
        return port

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: the scrape target."""
        return f"{self._host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    # --- settings ----------------------------------------------------------------------

    def _advance(self) -> None:
        """Count the requests served since the last advance (the lock is held)."""
        now = time.monotonic()
        requests = self._rps * max(0.0, now - self._last)
        self._last = now
        counters = self._counters.setdefault(self._version, _Counters())
        errors = requests * self._error_ratio
        counters.errors += errors
        counters.ok += requests - errors
        for index, bound in enumerate(BUCKETS):
            if self._latency <= bound:
                counters.buckets[index] += requests
        counters.count += requests
        counters.total_seconds += requests * self._latency

    def update(self, **changes: Any) -> dict[str, Any]:
        """Change several settings at once (``version``, ``error_ratio``,
        ``latency_seconds``, ``rps``); returns the new state. Raises ValueError."""
        checked = _check_settings(changes)
        with self._lock:
            self._advance()
            self._version = checked.get("version", self._version)
            self._error_ratio = checked.get("error_ratio", self._error_ratio)
            self._latency = checked.get("latency_seconds", self._latency)
            self._rps = checked.get("rps", self._rps)
            self._counters.setdefault(self._version, _Counters())
            return self._state()

    def state(self) -> dict[str, Any]:
        with self._lock:
            return self._state()

    def _state(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "version": self._version,
            "error_ratio": self._error_ratio,
            "latency_seconds": self._latency,
            "rps": self._rps,
            "versions": list(self._counters),
            "scrapes": self._scrapes,
        }

    @property
    def version(self) -> str:
        with self._lock:
            return self._version

    @version.setter
    def version(self, value: str) -> None:
        self.update(version=value)

    @property
    def error_ratio(self) -> float:
        with self._lock:
            return self._error_ratio

    @error_ratio.setter
    def error_ratio(self, value: float) -> None:
        self.update(error_ratio=value)

    @property
    def latency_seconds(self) -> float:
        with self._lock:
            return self._latency

    @latency_seconds.setter
    def latency_seconds(self, value: float) -> None:
        self.update(latency_seconds=value)

    @property
    def rps(self) -> float:
        with self._lock:
            return self._rps

    @rps.setter
    def rps(self, value: float) -> None:
        self.update(rps=value)

    @property
    def scrapes(self) -> int:
        """How many times /metrics was read."""
        with self._lock:
            return self._scrapes

    # --- exposition --------------------------------------------------------------------

    def render(self) -> str:
        """The /metrics page (advancing the counters to now)."""
        with self._lock:
            self._advance()
            self._scrapes += 1
            counters = {
                v: _Counters(c.ok, c.errors, list(c.buckets), c.count, c.total_seconds)
                for v, c in self._counters.items()
            }
            current = self._version
        service = self.service
        lines = [
            "# HELP http_requests_total Requests served, by version and status code.",
            "# TYPE http_requests_total counter",
        ]
        for version, c in counters.items():
            for code, value in (("200", c.ok), ("500", c.errors)):
                labels = _labels(service=service, version=version, code=code)
                lines.append(f"http_requests_total{labels} {value!r}")
        lines += [
            "# HELP http_request_duration_seconds Request latency.",
            "# TYPE http_request_duration_seconds histogram",
        ]
        for version, c in counters.items():
            for bound, value in zip(BUCKETS, c.buckets, strict=True):
                labels = _labels(service=service, version=version, le=_le(bound))
                lines.append(f"http_request_duration_seconds_bucket{labels} {value!r}")
            labels = _labels(service=service, version=version)
            lines.append(f"http_request_duration_seconds_sum{labels} {c.total_seconds!r}")
            lines.append(f"http_request_duration_seconds_count{labels} {c.count!r}")
        lines += [
            "# HELP app_build_info The running build.",
            "# TYPE app_build_info gauge",
            f"app_build_info{_labels(service=service, version=current)} 1",
        ]
        return "\n".join(lines) + "\n"


def _handler_for(service: FakeService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fake-service/1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: tests read the state, not an access log

        def _send(self, status: int, body: str, content_type: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body) + "\n", "application/json")

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, service.render(), CONTENT_TYPE)
            elif path == "/control":
                self._json(200, service.state())
            elif path in ("/health", "/-/healthy"):
                self._send(200, "ok\n", "text/plain")
            else:
                self._json(404, {"error": f"no such path: {path}"})

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != "/control":
                self._json(404, {"error": f"no such path: {self.path}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            try:
                changes = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("expected a JSON object")
                state = service.update(**changes)
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                self._json(400, {"error": str(exc)})
                return
            self._json(200, state)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--port-file", type=Path, help="write the port here once listening")
    parser.add_argument("--service", default="checkout")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--error-ratio", type=float, default=0.0)
    parser.add_argument("--latency-seconds", type=float, default=0.03)
    parser.add_argument("--rps", type=float, default=10.0)
    args = parser.parse_args(argv)

    service = FakeService(
        args.service,
        args.version,
        error_ratio=args.error_ratio,
        latency_seconds=args.latency_seconds,
        rps=args.rps,
        host=args.host,
        port=args.port,
    )
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start()
    try:
        if args.port_file is not None:
            partial = args.port_file.with_name(args.port_file.name + ".tmp")
            partial.write_text(f"{service.port}\n")
            partial.replace(args.port_file)  # readers never see a half-written file
        print(f"fake service {args.service} listening on {service.address}", flush=True)
        while not done.wait(0.5):
            pass
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
