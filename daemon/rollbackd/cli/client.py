"""The operator commands' way to the running daemon: where it listens, its token, and its
HTTP API, with one clear message for each way that can fail.

The daemon is found through the same config file it runs with (``[server].listen``, and the
token from ``token_file`` / ``token_env``), or through ``--url`` and ``--token-file``. When
the configured port is 0 (tests, demos), the address the daemon bound is read from
``<state_dir>/api.address``, which the daemon writes once it listens.

Kept free of FastAPI and the daemon's modules, so a command starts fast.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from rollbackd.config.secrets import SecretError, read_api_token, read_secret
from rollbackd.config.settings import Config

ADDRESS_FILE = "api.address"
"""As ``server.ADDRESS_FILE``."""
_ERRNO = re.compile(r"^\[Errno -?\d+\]\s*")


class ClientError(Exception):
    """A command could not get its answer; the message says why, in one line."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Target:
    url: str
    token: str


def _client_host(host: str) -> str:
    """Where to connect for a listen host: a wildcard address is reached on loopback."""
    if host in ("", "0.0.0.0"):  # noqa: S104 (a comparison, not a bind)
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _url(host: str, port: int | str) -> str:
    host = _client_host(host.strip("[]"))
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _load(config_path: Path) -> Config:
    try:
        data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ClientError(f"cannot read {config_path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ClientError(f"{config_path}: {exc}") from None
    try:
        # Only the sections a client needs: a problem elsewhere is the daemon's to report.
        return Config(server=data.get("server", {}), daemon=data.get("daemon", {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ClientError(f"{config_path}: {where}: {first['msg']}") from None


def find_daemon(
    config_path: Path | None,
    *,
    url: str | None = None,
    token_file: str | None = None,
    default_config: Path,
) -> Target:
    """The daemon's URL and token, from ``--url`` / ``--token-file`` when given, else from
    the config (``config_path``, or ``default_config``)."""
    config: Config | None = None
    path = config_path or default_config
    if config_path is not None or url is None or token_file is None:
        if config_path is None and not path.exists():
            missing = "--url and --token-file" if url is None else "--token-file"
            raise ClientError(f"no config at {path}: give -c CONFIG, or {missing}")
        config = _load(path)
    if url is None:
        assert config is not None
        url = _configured_url(config, path)
    if token_file is not None:
        try:
            token = read_secret(token_file, None, "API token")
        except SecretError as exc:
            raise ClientError(str(exc)) from None
    else:
        assert config is not None
        try:
            token = read_api_token(config.server)
        except SecretError as exc:
            raise ClientError(f"{exc} (from {path}; or give --token-file)") from None
    return Target(url=url.rstrip("/"), token=token)


def _configured_url(config: Config, path: Path) -> str:
    listen = config.server.listen
    host, _, port = listen.rpartition(":")
    if int(port) != 0:
        return _url(host, port)
    state_dir = Path(config.daemon.state_dir)
    if not state_dir.is_absolute():
        state_dir = path.resolve().parent / state_dir
    address_file = state_dir / ADDRESS_FILE
    try:
        address = address_file.read_text(encoding="utf-8").strip()
    except OSError:
        raise ClientError(
            f"[server].listen is {listen!r} (a port chosen at start) and {address_file} "
            "cannot be read: is rollbackd running? Or give --url"
        ) from None
    bound_host, _, bound_port = address.rpartition(":")
    return _url(bound_host, bound_port)


def _detail(body: Any) -> str:
    """The server's message: ``detail`` as a string, or a 422's list of field errors."""
    detail = body.get("detail") if isinstance(body, Mapping) else None
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for error in detail:
            if not isinstance(error, Mapping):
                continue
            loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
            field = ".".join(loc)
            parts.append(f"{field}: {error.get('msg', '')}" if field else str(error.get("msg")))
        return "; ".join(parts)
    return str(body)


class DaemonClient:
    """The daemon's HTTP API, one method per route; each returns the decoded JSON answer
    or raises ClientError."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
            # A proxy from the environment has no business between an operator and a
            # daemon on loopback, and would see the token.
            trust_env=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> Any:
        try:
            response = self._http.request(method, path, json=json, params=params)
        except httpx.TimeoutException:
            raise ClientError(
                f"rollbackd at {self.url} did not answer within {self.timeout:g}s"
            ) from None
        except httpx.ConnectError as exc:
            why = _ERRNO.sub("", str(exc)).strip() or "cannot connect"
            why = why[:1].lower() + why[1:]
            raise ClientError(
                f"cannot reach rollbackd at {self.url}: {why} — is it running?"
            ) from None
        except httpx.HTTPError as exc:
            raise ClientError(f"talking to rollbackd at {self.url} failed: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        status = response.status_code
        if status == 401:
            raise ClientError(
                f"rollbackd at {self.url} refused the token: check [server].token_file "
                "(or --token-file)",
                status,
            )
        if body is None:
            raise ClientError(
                f"{self.url} answered {status} without rollbackd's JSON: is that rollbackd?",
                status,
            )
        if status >= 500:
            raise ClientError(f"rollbackd at {self.url} failed ({status}): {_detail(body)}", status)
        if status >= 400:
            raise ClientError(_detail(body), status)
        return body

    # -- the routes -----------------------------------------------------------------------

    def status(self) -> Any:
        return self._call("GET", "/api/v1/status")

    def history(self, service: str | None = None, limit: int = 50, state: str | None = None) -> Any:
        params: dict[str, str | int] = {"limit": limit}
        if service is not None:
            params["service"] = service
        if state is not None:
            params["state"] = state
        return self._call("GET", "/api/v1/rollbacks", params=params)

    def rollback(
        self, service: str, reason: str, *, to_version: str | None = None, by: str | None = None
    ) -> Any:
        body: dict[str, Any] = {"service": service, "reason": reason}
        if to_version is not None:
            body["to_version"] = to_version
        if by:
            body["requested_by"] = by
        return self._call("POST", "/api/v1/rollbacks", json=body)

    def approve(self, rollback_id: int, by: str | None = None) -> Any:
        return self._call("POST", f"/api/v1/rollbacks/{rollback_id}/approve", json=_by({}, by))

    def reject(self, rollback_id: int, by: str | None = None, reason: str = "") -> Any:
        return self._call(
            "POST", f"/api/v1/rollbacks/{rollback_id}/reject", json=_by({"reason": reason}, by)
        )

    def pause(self, scope: str, by: str | None = None) -> Any:
        return self._call("POST", f"/api/v1/services/{_segment(scope)}/pause", json=_by({}, by))

    def resume(self, scope: str, by: str | None = None) -> Any:
        return self._call("POST", f"/api/v1/services/{_segment(scope)}/resume", json=_by({}, by))

    def release(self, service: str, version: str, meta: Mapping[str, str] | None = None) -> Any:
        return self._call(
            "POST",
            "/api/v1/releases",
            json={"service": service, "version": version, "meta": dict(meta or {})},
        )


def _by(body: dict[str, Any], by: str | None) -> dict[str, Any]:
    if by:
        body["by"] = by
    return body


def _segment(name: str) -> str:
    # Quoted whole, slashes included: a name must never reach another route.
    return quote(name, safe="*")
