"""A real Prometheus server run as a subprocess, for tests.

Each :class:`PrometheusServer` has its own working directory holding its generated config
file (``prometheus.yml``, written as JSON, which YAML reads), its TSDB (``data/``) and its log
(``prometheus.log``). It listens on a free port of 127.0.0.1, with the lifecycle and admin
APIs on. Tests await scrapes with :meth:`PrometheusServer.wait_for` instead of sleeping.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import httpx

PROMETHEUS_BINARY = "prometheus"
PROMTOOL_BINARY = "promtool"

Result = list[dict[str, Any]]
"""The ``result`` list of a query answer: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""

_LOG_TAIL_LINES = 40
_RUNNING: weakref.WeakSet[PrometheusServer] = weakref.WeakSet()


class PrometheusError(RuntimeError):
    """Prometheus did not start, stopped, or answered with an error."""


class QueryError(PrometheusError):
    """A query answered ``status: error``; the message is Prometheus' own."""

    def __init__(self, expr: str, error_type: str, message: str) -> None:
        self.expr = expr
        self.error_type = error_type
        self.message = message
        super().__init__(f"{error_type}: {message} (query: {expr})")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prometheus_available() -> bool:
    return shutil.which(PROMETHEUS_BINARY) is not None


def promtool_available() -> bool:
    return shutil.which(PROMTOOL_BINARY) is not None


@dataclass(frozen=True)
class ScrapeTarget:
    """One static scrape target. Targets sharing a ``job`` share one scrape config."""

    address: str
    """``host:port``"""
    job: str = "fake"
    labels: Mapping[str, str] = field(default_factory=dict)
    """Extra labels Prometheus adds to every series scraped from this target."""


class PrometheusFactory(Protocol):
    """The ``prometheus_factory`` fixture: a new server in the test's tmp_path, stopped at
    teardown. ``backfill`` loads :mod:`support.dataset` first; ``start`` (the default)
    returns it running and ready."""

    def __call__(
        self,
        *,
        targets: Iterable[ScrapeTarget] = (),
        rule_files: Iterable[Path] = (),
        alertmanagers: Iterable[str] = (),
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        extra_args: Sequence[str] = (),
        backfill: bool = False,
        start: bool = True,
    ) -> PrometheusServer: ...


def poll(
    condition: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Call ``condition`` until it is true, at most ``timeout`` seconds; raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def sample_value(sample: Mapping[str, Any]) -> float:
    """The float value of one instant-vector sample of a query answer."""
    return float(sample["value"][1])


def by_label(result: Result, label: str) -> dict[str, float]:
    """``{label value: sample value}`` for an instant-vector answer."""
    return {s["metric"].get(label, ""): sample_value(s) for s in result}


class PrometheusServer:
    """A ``prometheus`` subprocess with its own config, storage and port.

    Use it as a context manager (started and ready inside, stopped and its own temp dir
    removed after), or call :meth:`start`, :meth:`wait_ready` and :meth:`stop`.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        targets: Iterable[ScrapeTarget] = (),
        rule_files: Iterable[Path] = (),
        alertmanagers: Iterable[str] = (),
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        retention: str = "3650d",
        extra_args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="prometheus-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.workdir / "data"
        self.storage_dir.mkdir(exist_ok=True)
        self.config_file = self.workdir / "prometheus.yml"
        self.log_file = self.workdir / "prometheus.log"
        self.targets: list[ScrapeTarget] = list(targets)
        self.rule_files: list[Path] = list(rule_files)
        self.alertmanagers: list[str] = list(alertmanagers)
        """``host:port`` of Alertmanagers that alerting rules notify."""
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.retention = retention
        self.extra_args = list(extra_args)
        self.port = port if port is not None else free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(base_url=self.url, timeout=10.0)

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as a scrape target or ``--web.listen-address``."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self) -> dict[str, Any]:
        """The configuration :meth:`write_config` writes, built from the attributes."""
        jobs: dict[str, list[dict[str, Any]]] = {}
        for target in self.targets:
            static: dict[str, Any] = {"targets": [target.address]}
            if target.labels:
                static["labels"] = dict(target.labels)
            jobs.setdefault(target.job, []).append(static)
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "scrape_configs": [
                {"job_name": job, "static_configs": statics} for job, statics in jobs.items()
            ],
        }
        if self.rule_files:
            config["rule_files"] = [str(Path(p).resolve()) for p in self.rule_files]
        if self.alertmanagers:
            config["alerting"] = {
                "alertmanagers": [{"static_configs": [{"targets": list(self.alertmanagers)}]}]
            }
        return config

    def write_config(self) -> None:
        text = json.dumps(self.config(), indent=2) + "\n"
        partial = self.config_file.with_suffix(".tmp")
        partial.write_text(text)
        partial.replace(self.config_file)

    def command(self) -> list[str]:
        return [
            PROMETHEUS_BINARY,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.storage_dir}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address={self.address}",
            "--web.enable-lifecycle",
            "--web.enable-admin-api",
            *self.extra_args,
        ]

    def start(self) -> None:
        """Write the config and start the process (without waiting for it to be ready)."""
        if self.running:
            raise PrometheusError("Prometheus is already running")
        if shutil.which(PROMETHEUS_BINARY) is None:
            raise PrometheusError(f"the {PROMETHEUS_BINARY!r} binary is not on PATH")
        self.write_config()
        with self.log_file.open("ab") as log:
            log.write(f"--- starting: {' '.join(self.command())}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C of pytest does not reach it; stop() does
            )
        _RUNNING.add(self)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``/-/ready`` until it answers 200; raise with the log's tail on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            process = self._process
            if process is None:
                raise PrometheusError("Prometheus was not started")
            code = process.poll()
            if code is not None:
                raise PrometheusError(
                    f"Prometheus exited with status {code} before it was ready; "
                    f"log tail:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if self._client.get("/-/ready", timeout=1.0).status_code == 200:
                    return
            if time.monotonic() >= deadline:
                raise PrometheusError(
                    f"Prometheus was not ready after {timeout:g}s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Storage is kept."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._process = None
        _RUNNING.discard(self)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as Prometheus can tell (the WAL is replayed on restart)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=10)
        self._process = None
        _RUNNING.discard(self)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop, start on the same port with the same storage, and wait until ready."""
        self.stop()
        self.start()
        self.wait_ready(timeout)

    def reload(self) -> None:
        """Rewrite the config from the attributes and have Prometheus reload it."""
        self.write_config()
        response = self._client.post("/-/reload")
        if response.status_code != 200:
            raise PrometheusError(
                f"reload failed ({response.status_code}): {response.text.strip()}"
            )

    def close(self) -> None:
        """Stop, close the HTTP client, and remove the working directory if it was ours."""
        try:
            self.stop()
        finally:
            self._client.close()
            if self._owns_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- HTTP API ----------------------------------------------------------------------

    def _api(self, path: str, expr: str, params: dict[str, str]) -> dict[str, Any]:
        response = self._client.get(path, params=params)
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            raise PrometheusError(
                f"{path} answered {response.status_code} without JSON: {response.text[:500]}"
            ) from None
        if body.get("status") != "success":
            raise QueryError(expr, str(body.get("errorType")), str(body.get("error")))
        data: dict[str, Any] = body["data"]
        return data

    def query(self, expr: str, time: float | None = None) -> dict[str, Any]:
        """An instant query; the answer's ``data`` (``resultType`` and ``result``)."""
        params = {"query": expr}
        if time is not None:
            params["time"] = f"{time:.3f}"
        return self._api("/api/v1/query", expr, params)

    def query_range(self, expr: str, start: float, end: float, step: float) -> dict[str, Any]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        return self._api("/api/v1/query_range", expr, params)

    def vector(self, expr: str, time: float | None = None) -> Result:
        """The ``result`` list of an instant query that must answer an instant vector."""
        data = self.query(expr, time)
        if data["resultType"] != "vector":
            raise PrometheusError(f"expected a vector from {expr!r}, got {data['resultType']}")
        result: Result = data["result"]
        return result

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[Result], bool] = bool,
        timeout: float = 15.0,
        interval: float = 0.1,
    ) -> Result:
        """Poll an instant query (at "now") until ``predicate(result)`` holds; return that
        result. The default predicate waits for a non-empty answer. A PromQL error is raised
        at once; on timeout, TimeoutError shows the last answer."""
        deadline = time.monotonic() + timeout
        last: Result | str = "(no answer)"
        while True:
            try:
                result = self.vector(expr)
            except httpx.TransportError as exc:
                last = f"transport error: {exc}"
            else:
                if predicate(result):
                    return result
                last = result
            if not self.running:
                raise PrometheusError(f"Prometheus is not running; log tail:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"timed out after {timeout:g}s waiting on {expr!r}; last answer: {last}"
                )
            time.sleep(interval)

    def targets_health(self) -> dict[str, str]:
        """``{scrape URL: health}`` of the active targets ("up", "down", "unknown")."""
        response = self._client.get("/api/v1/targets", params={"state": "active"})
        response.raise_for_status()
        active = response.json()["data"]["activeTargets"]
        return {t["scrapeUrl"]: t["health"] for t in active}

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PrometheusServer {self.url} {state} in {self.workdir}>"


def create_blocks(openmetrics_file: Path, storage_dir: Path) -> None:
    """Backfill: turn an OpenMetrics file into TSDB blocks in ``storage_dir`` (before the
    server starts; Prometheus >= 2.39 accepts blocks overlapping each other and the head)."""
    if shutil.which(PROMTOOL_BINARY) is None:
        raise PrometheusError(f"the {PROMTOOL_BINARY!r} binary is not on PATH")
    storage_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            PROMTOOL_BINARY,
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            str(openmetrics_file),
            str(storage_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise PrometheusError(
            f"promtool create-blocks-from openmetrics failed ({done.returncode}):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )


@atexit.register
def _stop_leftovers() -> None:
    """Last resort: no Prometheus outlives the Python process that started it."""
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.kill()
