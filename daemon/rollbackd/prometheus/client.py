"""The Prometheus client: requests with timeouts, retries of transient failures only,
and failures mapped to the errors of ``errors.py``, with secrets scrubbed from them."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential_jitter,
)
from urllib3.util import Retry

from rollbackd.config.secrets import read_secret
from rollbackd.config.settings import PrometheusSection
from rollbackd.core.samples import QueryResult, RangeResult
from rollbackd.prometheus.answers import clip, error_fields, instant_result, range_series, snippet
from rollbackd.prometheus.errors import (
    PrometheusUnavailable,
    QueryError,
    UnavailableReason,
)
from rollbackd.prometheus.failures import cause_text, is_timeout

_LOG = logging.getLogger("rollbackd.prometheus")

_T = TypeVar("_T")

_MIN_TIMEOUT = 0.001
"""Seconds: the shortest request timeout sent (Prometheus reads 0 as "already expired")."""
_SERVER_SHARE = 0.9
"""Prometheus' own query timeout, as a share of the request's: it gives up (503 timeout, the
query cancelled) a little before the client would."""
_LEAST_ATTEMPT = 0.25
"""No attempt is started with less than this share of a request's timeout left before the
deadline: it would most likely time out and hide the real failure behind "timeout"."""
_SNIPPET = 200
"""Characters of an unexpected body quoted in a message."""

# Retries belong to tenacity here: urllib3 must neither retry nor turn statuses into
# RetryError. read=False re-raises a read timeout as itself (requests' ReadTimeout); with a
# number, urllib3 wraps it in MaxRetryError and requests reports a ConnectionError.
_NO_RETRY = Retry(
    total=0,
    connect=0,
    read=False,
    redirect=0,
    status=0,
    other=0,
    status_forcelist=(),
    respect_retry_after_header=False,
    raise_on_status=False,
)


# 0.1 s doubling up to 2 s, plus up to 0.2 s of jitter (the default jitter of 1 s would
# dwarf the first waits).
_BACKOFF = wait_exponential_jitter(multiplier=0.1, max=2, jitter=0.2)


class _Connection:
    """One thread's ``PrometheusConnect``, its session, and the last response seen."""

    def __init__(self, url: str, session: requests.Session) -> None:
        self.session = session
        self.last_response: requests.Response | None = None
        session.hooks["response"].append(self._keep)
        self.api = PrometheusConnect(url=url, session=session, retry=_NO_RETRY)

    def _keep(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.last_response = response


class PrometheusClient:
    """Queries one Prometheus. Safe to share between threads and with asyncio.

    Every call has a ``deadline`` (seconds, default ``prometheus.timeout``): transient
    failures are retried with jittered exponential backoff (0.1 s doubling up to 2 s) as
    long as the next attempt would start with at least a quarter of a request's timeout
    left, and each request's timeout is cut to what is left. :class:`QueryError` is
    raised at once.
    """

    def __init__(self, section: PrometheusSection) -> None:
        self._url = section.url
        self._display_url = _redact_url(section.url)
        self._timeout = section.timeout.total_seconds()
        self._headers = dict(section.headers)
        self._auth: tuple[str, str] | None = None
        secrets: list[str] = []
        parts = urlsplit(section.url)
        if parts.password:
            user, password = unquote(parts.username or ""), unquote(parts.password)
            secrets += [parts.password, password, _basic_credentials(user, password)]
        if section.bearer_token_file or section.bearer_token_env:
            if section.basic_auth is not None:
                raise ValueError("prometheus: set a bearer token or basic_auth, not both")
            token = read_secret(
                section.bearer_token_file, section.bearer_token_env, "prometheus bearer token"
            )
            self._headers["Authorization"] = f"Bearer {token}"
            secrets.append(token)
        elif section.basic_auth is not None:
            password = read_secret(
                section.basic_auth.password_file,
                section.basic_auth.password_env,
                "prometheus basic_auth password",
            )
            self._auth = (section.basic_auth.username, password)
            secrets += [password, _basic_credentials(section.basic_auth.username, password)]
        # Longest first: a secret containing another is replaced whole.
        self._secrets = tuple(sorted({x for x in secrets if x}, key=len, reverse=True))
        self._verify: bool | str = True
        if section.insecure_skip_verify:
            self._verify = False
        elif section.tls_ca_file:
            self._verify = section.tls_ca_file
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()

    @property
    def url(self) -> str:
        """Prometheus' URL, without any password in it."""
        return self._display_url

    @property
    def timeout(self) -> float:
        """The per-request timeout and default deadline, in seconds."""
        return self._timeout

    def close(self) -> None:
        """Close every thread's session (a later call opens new connections)."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.session.close()

    def _connection(self) -> _Connection:
        connection: _Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            session = requests.Session()
            session.headers.update(self._headers)
            session.auth = self._auth
            session.verify = self._verify
            connection = _Connection(self._url, session)
            self._local.connection = connection
            with self._lock:
                self._connections.add(connection)
        return connection

    # --- queries ------------------------------------------------------------------------

    def query(
        self, expr: str, *, at: float | None = None, deadline: float | None = None
    ) -> QueryResult:
        """An instant query at ``at`` (Unix seconds; default: Prometheus' now)."""

        def attempt(connection: _Connection, timeout: float) -> QueryResult:
            params = {"timeout": _server_timeout(timeout)}
            if at is not None:
                params["time"] = _seconds(at)
            data = self._request(
                connection,
                expr,
                timeout,
                lambda: connection.api.custom_query(
                    expr,
                    params=params,
                    timeout=timeout,  # type: ignore[arg-type]  # annotated int, a float works
                ),
            )
            return instant_result(expr, data, connection.last_response, self._bad_shape)

        return self._with_retries(attempt, expr, deadline)

    def query_range(
        self,
        expr: str,
        start: float,
        end: float,
        step: float,
        *,
        deadline: float | None = None,
    ) -> RangeResult:
        """A range query from ``start`` to ``end`` (Unix seconds) every ``step`` seconds."""

        def attempt(connection: _Connection, timeout: float) -> RangeResult:
            # custom_query_range rounds start and end to whole seconds; the params given
            # here replace its own.
            params = {
                "start": _seconds(start),
                "end": _seconds(end),
                "step": _seconds(step),
                "timeout": _server_timeout(timeout),
            }
            data = self._request(
                connection,
                expr,
                timeout,
                lambda: connection.api.custom_query_range(
                    expr,
                    start_time=datetime.fromtimestamp(start, tz=UTC),
                    end_time=datetime.fromtimestamp(end, tz=UTC),
                    step=params["step"],
                    params=params,
                    timeout=timeout,  # type: ignore[arg-type]
                ),
            )
            return RangeResult(expr=expr, series=range_series(expr, data, self._bad_shape))

        return self._with_retries(attempt, expr, deadline)

    async def aquery(
        self, expr: str, *, at: float | None = None, deadline: float | None = None
    ) -> QueryResult:
        """:meth:`query` in a worker thread (contextvars are copied). Cancelling the
        awaiting task does not stop the request: it ends within the deadline."""
        return await asyncio.to_thread(self.query, expr, at=at, deadline=deadline)

    async def aquery_range(
        self,
        expr: str,
        start: float,
        end: float,
        step: float,
        *,
        deadline: float | None = None,
    ) -> RangeResult:
        """:meth:`query_range` in a worker thread."""
        return await asyncio.to_thread(self.query_range, expr, start, end, step, deadline=deadline)

    def ready(self, *, timeout: float | None = None) -> bool:
        """Whether ``/-/ready`` answers 200 (False on any failure, never raises)."""
        try:
            response = self._connection().session.get(
                f"{self._url}/-/ready", timeout=self._timeout if timeout is None else timeout
            )
        except (requests.RequestException, ValueError):
            return False
        return response.status_code == 200

    async def aready(self, *, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.ready, timeout=timeout)

    def build_info(self) -> dict[str, str] | None:
        """``/api/v1/status/buildinfo``'s ``data`` (version, revision, ...), or None."""
        try:
            response = self._connection().session.get(
                f"{self._url}/api/v1/status/buildinfo", timeout=self._timeout
            )
            if response.status_code != 200:
                return None
            data = response.json().get("data")
        except (requests.RequestException, ValueError, AttributeError):
            return None
        if not isinstance(data, dict):
            return None
        return {str(k): str(v) for k, v in data.items()}

    # --- retries and errors -------------------------------------------------------------

    def _with_retries(
        self,
        attempt: Callable[[_Connection, float], _T],
        expr: str,
        deadline: float | None,
    ) -> _T:
        budget = self._timeout if deadline is None else deadline
        if budget <= 0:
            raise ValueError(f"deadline must be positive, got {budget}")
        start = time.monotonic()
        attempts = 0

        def once() -> _T:
            nonlocal attempts
            attempts += 1
            left = budget - (time.monotonic() - start)
            timeout = max(min(self._timeout, left), _MIN_TIMEOUT)
            return attempt(self._connection(), timeout)

        retrying = Retrying(
            retry=retry_if_exception_type(PrometheusUnavailable),
            wait=_BACKOFF,
            stop=stop_before_delay(budget - _LEAST_ATTEMPT * min(self._timeout, budget)),
            reraise=True,
            before_sleep=_log_retry,
        )
        try:
            return retrying(once)
        except PrometheusUnavailable as exc:
            exc.attempts = attempts
            raise

    def _request(
        self, connection: _Connection, expr: str, timeout: float, call: Callable[[], Any]
    ) -> Any:
        connection.last_response = None
        try:
            return call()
        except PrometheusApiClientException as exc:
            raise self._status_error(connection.last_response, expr) from exc
        except requests.exceptions.JSONDecodeError as exc:  # before RequestException
            raise self._unavailable(
                UnavailableReason.BAD_RESPONSE,
                "answered 200 with a body that is not JSON: " + snippet(connection.last_response),
                expr,
                status=200,
            ) from exc
        except (
            requests.exceptions.InvalidURL,
            requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidHeader,
        ) as exc:
            raise QueryError(
                self._scrub(f"{self._display_url}: invalid request: {type(exc).__name__}"),
                status=None,
                error_type="config",
                expr=expr,
            ) from exc
        except requests.RequestException as exc:
            raise self._transport_error(exc, expr, timeout) from exc
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            # The body was JSON, but not {"data": {"result": ...}}.
            raise self._unavailable(
                UnavailableReason.BAD_RESPONSE,
                f"answered JSON without data.result: {snippet(connection.last_response)}",
                expr,
                status=200,
            ) from exc

    def _status_error(
        self, response: requests.Response | None, expr: str
    ) -> QueryError | PrometheusUnavailable:
        if response is None:  # pragma: no cover - the hook always sees the response
            return self._unavailable(
                UnavailableReason.BAD_RESPONSE, "answered an error status", expr
            )
        status = response.status_code
        error_type, error = error_fields(response)
        detail = error if error is not None else snippet(response)
        if status in (400, 422):
            error_type = error_type or f"http_{status}"
            return QueryError(
                self._scrub(f"Prometheus rejected the query ({status} {error_type}): {detail}"),
                status=status,
                error_type=error_type,
                expr=expr,
            )
        if status >= 500 or status in (408, 429):
            if status == 408 or error_type == "timeout":
                reason = UnavailableReason.TIMEOUT
            elif status == 429:
                reason = UnavailableReason.THROTTLED
            else:
                reason = UnavailableReason.HTTP_5XX
            return self._unavailable(reason, f"answered {status}: {detail}", expr, status=status)
        if 400 <= status < 500:
            hint = {
                401: "check the bearer token or basic_auth",
                403: "check the bearer token or basic_auth",
                404: "check prometheus.url (a path prefix?)",
            }.get(status, "the request was refused")
            return QueryError(
                self._scrub(f"{self._display_url} answered {status} ({hint}): {detail}"),
                status=status,
                error_type=error_type or f"http_{status}",
                expr=expr,
            )
        return self._unavailable(
            UnavailableReason.BAD_RESPONSE,
            f"answered an unexpected status {status}: {detail}",
            expr,
            status=status,
        )

    def _transport_error(
        self, exc: requests.RequestException, expr: str, timeout: float
    ) -> PrometheusUnavailable:
        if is_timeout(exc):
            return self._unavailable(
                UnavailableReason.TIMEOUT, f"no answer within {timeout:.3g}s", expr
            )
        if isinstance(exc, requests.exceptions.SSLError):
            return self._unavailable(
                UnavailableReason.CONNECT, f"TLS failed: {cause_text(exc)}", expr
            )
        if isinstance(exc, requests.exceptions.ContentDecodingError):
            return self._unavailable(
                UnavailableReason.BAD_RESPONSE, f"undecodable body: {cause_text(exc)}", expr
            )
        if isinstance(exc, requests.exceptions.TooManyRedirects):
            return self._unavailable(UnavailableReason.BAD_RESPONSE, "too many redirects", expr)
        # ConnectionError, ChunkedEncodingError (connection lost mid-body), and the rest.
        return self._unavailable(
            UnavailableReason.CONNECT, f"cannot connect: {cause_text(exc)}", expr
        )

    def _unavailable(
        self,
        reason: UnavailableReason,
        what: str,
        expr: str,
        *,
        status: int | None = None,
    ) -> PrometheusUnavailable:
        return PrometheusUnavailable(
            self._scrub(f"Prometheus at {self._display_url} unavailable ({reason}): {what}"),
            reason=reason,
            status=status,
            expr=expr,
        )

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text

    def _bad_shape(self, expr: str, what: str, data: Any) -> PrometheusUnavailable:
        return self._unavailable(
            UnavailableReason.BAD_RESPONSE, f"{what}: {clip(repr(data))}", expr, status=200
        )


def _server_timeout(timeout: float) -> str:
    return _seconds(max(timeout * _SERVER_SHARE, _MIN_TIMEOUT))


def _seconds(value: float) -> str:
    """Seconds as Prometheus reads them (a float; its timestamps have ms resolution)."""
    return f"{value:.3f}"


def _basic_credentials(username: str, password: str) -> str:
    """What an ``Authorization: Basic`` header carries: as secret as the password."""
    text = f"{username}:{password}"
    try:
        raw = text.encode("latin-1")  # as requests encodes it
    except UnicodeEncodeError:
        raw = text.encode("utf-8")
    return base64.b64encode(raw).decode("ascii")


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _log_retry(state: RetryCallState) -> None:
    outcome = state.outcome
    error = outcome.exception() if outcome is not None else None
    _LOG.debug(
        "prometheus attempt %d failed, retrying in %.2fs: %s",
        state.attempt_number,
        state.upcoming_sleep,
        error,
    )
