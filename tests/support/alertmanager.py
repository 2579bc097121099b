"""A real Alertmanager (Debian's ``prometheus-alertmanager``, 0.25) run as a subprocess, for
tests: one route to one webhook receiver, with short timings so re-sends come quickly, and
clustering off (a test's Alertmanager must not go looking for peers).

The config is written as JSON, which YAML reads. Alerts are posted through Alertmanager's
own API (``POST /api/v2/alerts``), as Prometheus posts them.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from support.prometheus import free_port, poll

ALERTMANAGER_BINARY = "prometheus-alertmanager"


def alertmanager_available() -> bool:
    return shutil.which(ALERTMANAGER_BINARY) is not None


class AlertmanagerServer:
    def __init__(
        self,
        workdir: Path,
        *,
        webhook_url: str,
        credentials_file: Path,
        group_by: Sequence[str] = ("alertname",),
        group_wait: str = "1s",
        group_interval: str = "2s",
        repeat_interval: str = "3s",
        max_alerts: int = 0,
    ) -> None:
        """``max_alerts``: the webhook_config's cap on alerts per delivery (0: no cap,
        Alertmanager's default); the rest of the group is counted in ``truncatedAlerts``."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / "alertmanager.yml"
        self.log_file = workdir / "alertmanager.log"
        self.port = free_port()
        self.config: dict[str, Any] = {
            "route": {
                "receiver": "rollbackd",
                "group_by": list(group_by),
                "group_wait": group_wait,
                "group_interval": group_interval,
                "repeat_interval": repeat_interval,
            },
            "receivers": [
                {
                    "name": "rollbackd",
                    "webhook_configs": [
                        {
                            "url": webhook_url,
                            "send_resolved": True,
                            "http_config": {
                                "authorization": {
                                    "type": "Bearer",
                                    "credentials_file": str(credentials_file),
                                }
                            },
                        }
                    ],
                }
            ],
        }
        if max_alerts:
            self.config["receivers"][0]["webhook_configs"][0]["max_alerts"] = max_alerts
        self._process: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            ALERTMANAGER_BINARY,
            f"--config.file={self.config_file}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",
            "--log.level=debug",
        ]

    def start(self, timeout: float = 30.0) -> None:
        self.config_file.write_text(json.dumps(self.config, indent=2))
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

        def ready() -> bool:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"alertmanager exited:\n{self.log_tail()}")
            try:
                return self._client.get("/-/ready").status_code == 200
            except httpx.HTTPError:
                return False

        poll(ready, timeout=timeout, what="alertmanager to be ready")

    def post_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        """Alerts as Prometheus posts them: ``labels``, ``annotations``, optional times."""
        response = self._client.post("/api/v2/alerts", json=list(alerts))
        response.raise_for_status()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._client.close()
