"""The one place that talks to Prometheus: instant and range queries over its HTTP API,
with explicit timeouts, bounded retries of transient failures, and typed answers.

It wraps prometheus-api-client's ``PrometheusConnect`` (0.7.2), whose defaults do not
suit a daemon, so each is set here:

* ``timeout`` defaults to none at all: a hung Prometheus would hang the check forever.
  Every request here carries a timeout (``prometheus.timeout``, cut to what is left of the
  call's deadline), and Prometheus' own ``timeout`` parameter so that it cancels a slow
  query itself.
* Its urllib3 ``Retry`` (3 retries, 0/2/4 s backoff on 408/429/5xx and connection errors)
  adds ~6 s before a ``RetryError`` or a ``ConnectionError``, and a read timeout comes out
  as a ``ConnectionError`` rather than a ``Timeout``. It is turned off
  (``Retry(total=0, read=False, ...)``, as plain requests does); retries are done here,
  with tenacity, inside the caller's deadline, and only for transient failures.
* ``custom_query`` returns only ``data.result``: the result type is told by the shape of
  the answer; warnings and the status and ``errorType`` of a failed request are read from
  the response, which a session hook keeps.
* One ``requests.Session`` per ``PrometheusConnect``, and a session is not thread-safe:
  each thread gets its own connection.

Exceptions::

    PrometheusError
    ├── QueryError              Prometheus rejected the query (400 bad_data, 422
    │                           execution, other 4xx such as 401/403/404), or the
    │                           answer is of a kind checks cannot use. A configuration
    │                           error: never retried.
    └── PrometheusUnavailable   No usable answer: connection refused or reset, timeout,
                                5xx (503 while Prometheus starts), 429, a body that is
                                not the expected JSON. Raised once retries within the
                                deadline are exhausted; ``reason`` is a metric label.

Messages never contain the bearer token or the basic-auth password.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import logging
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
import urllib3.exceptions
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
from rollbackd.core.samples import QueryResult, RangeResult, ResultType, Sample, Series, labels_of

__all__ = [
    "PrometheusClient",
    "PrometheusError",
    "PrometheusUnavailable",
    "QueryError",
    "UnavailableReason",
]

_LOG = logging.getLogger(__name__)

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


# --- exceptions -------------------------------------------------------------------------


class UnavailableReason(StrEnum):
    """Why Prometheus gave no usable answer; a low-cardinality metric label."""

    CONNECT = "connect"
    """Connection refused, reset or closed without an answer; TLS failures."""
    TIMEOUT = "timeout"
    """No answer within the timeout, 408, or Prometheus' own query timeout (503 timeout)."""
    HTTP_5XX = "http_5xx"
    """A 5xx status, e.g. 503 "Service Unavailable" while Prometheus replays its WAL."""
    THROTTLED = "throttled"
    """429 Too Many Requests (from a proxy or a Prometheus-compatible backend)."""
    BAD_RESPONSE = "bad_response"
    """An answer that is not the expected JSON."""


class PrometheusError(Exception):
    """Base of every error this module raises."""

    def __init__(self, message: str, *, expr: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expr = expr
        """The query, when the error is about one."""

    def __str__(self) -> str:
        return self.message


class QueryError(PrometheusError):
    """Prometheus rejected the query, or the configuration is wrong. Never retried."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None,
        error_type: str,
        expr: str | None = None,
    ) -> None:
        super().__init__(message, expr=expr)
        self.status = status
        """The HTTP status (400, 422, 401, ...), or None when no request was answered."""
        self.error_type = error_type
        """Prometheus' ``errorType`` (``bad_data``, ``execution``), else a word of ours
        (``http_401``, ``unsupported_result``, ``config``)."""


class PrometheusUnavailable(PrometheusError):
    """No usable answer within the deadline. ``reason`` is a metric label."""

    def __init__(
        self,
        message: str,
        *,
        reason: UnavailableReason,
        status: int | None = None,
        expr: str | None = None,
    ) -> None:
        super().__init__(message, expr=expr)
        self.reason = reason
        self.status = status
        """The HTTP status of the last attempt, if it got one."""
        self.attempts = 1
        """How many requests were made before giving up."""

    def __str__(self) -> str:
        if self.attempts > 1:
            return f"{self.message} (gave up after {self.attempts} attempts)"
        return self.message


# --- the client -------------------------------------------------------------------------


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
            return self._instant_result(connection, expr, data)

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
            return RangeResult(expr=expr, series=self._range_series(expr, data))

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
                "answered 200 with a body that is not JSON: " + _snippet(connection.last_response),
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
                f"answered JSON without data.result: {_snippet(connection.last_response)}",
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
        error_type, error = _error_fields(response)
        detail = error if error is not None else _snippet(response)
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
        if _is_timeout(exc):
            return self._unavailable(
                UnavailableReason.TIMEOUT, f"no answer within {timeout:.3g}s", expr
            )
        if isinstance(exc, requests.exceptions.SSLError):
            return self._unavailable(
                UnavailableReason.CONNECT, f"TLS failed: {_cause_text(exc)}", expr
            )
        if isinstance(exc, requests.exceptions.ContentDecodingError):
            return self._unavailable(
                UnavailableReason.BAD_RESPONSE, f"undecodable body: {_cause_text(exc)}", expr
            )
        if isinstance(exc, requests.exceptions.TooManyRedirects):
            return self._unavailable(UnavailableReason.BAD_RESPONSE, "too many redirects", expr)
        # ConnectionError, ChunkedEncodingError (connection lost mid-body), and the rest.
        return self._unavailable(
            UnavailableReason.CONNECT, f"cannot connect: {_cause_text(exc)}", expr
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

    # --- answers ------------------------------------------------------------------------

    def _bad_shape(self, expr: str, what: str, data: Any) -> PrometheusUnavailable:
        return self._unavailable(
            UnavailableReason.BAD_RESPONSE, f"{what}: {_clip(repr(data))}", expr, status=200
        )

    def _instant_result(self, connection: _Connection, expr: str, data: Any) -> QueryResult:
        warnings = _warnings(connection.last_response)
        if not isinstance(data, list):
            raise self._bad_shape(expr, "data.result is not a list", data)
        if not data and _result_type(connection.last_response) == "matrix":
            # Refused when empty too, not only once the series exist.
            raise _range_vector_error(expr)
        if len(data) == 2 and not isinstance(data[0], dict):
            # A scalar [ts, "v"] (or a string [ts, "text"], which checks cannot use).
            point = _point(data)
            if point is None:
                if _result_type(connection.last_response) == "string":
                    raise QueryError(
                        f"the query gives a string, not a number: {_clip(repr(data))}",
                        status=200,
                        error_type="unsupported_result",
                        expr=expr,
                    )
                raise self._bad_shape(expr, "malformed scalar", data)
            ts, value = point
            return QueryResult(
                expr=expr,
                result_type=ResultType.SCALAR,
                samples=(Sample(labels=(), value=value, timestamp=ts),),
                warnings=warnings,
            )
        samples = []
        for item in data:
            if not isinstance(item, dict):
                raise self._bad_shape(expr, "malformed vector", data)
            if "values" in item or "histograms" in item:
                raise _range_vector_error(expr)
            if "histogram" in item:
                raise QueryError(
                    "the query gives native histogram samples; use histogram_quantile() "
                    "or histogram_count()/histogram_sum()",
                    status=200,
                    error_type="unsupported_result",
                    expr=expr,
                )
            labels = _labels(item.get("metric"))
            point = _point(item.get("value"))
            if labels is None or point is None:
                raise self._bad_shape(expr, "malformed vector sample", item)
            ts, value = point
            samples.append(Sample(labels=labels, value=value, timestamp=ts))
        return QueryResult(
            expr=expr, result_type=ResultType.VECTOR, samples=tuple(samples), warnings=warnings
        )

    def _range_series(self, expr: str, data: Any) -> tuple[Series, ...]:
        if not isinstance(data, list):
            raise self._bad_shape(expr, "data.result is not a list", data)
        series = []
        for item in data:
            if not isinstance(item, dict):
                raise self._bad_shape(expr, "malformed matrix", data)
            if "histograms" in item and "values" not in item:
                raise QueryError(
                    "the query gives native histogram samples; use histogram_quantile() "
                    "or histogram_count()/histogram_sum()",
                    status=200,
                    error_type="unsupported_result",
                    expr=expr,
                )
            labels = _labels(item.get("metric"))
            values = item.get("values")
            if labels is None or not isinstance(values, list):
                raise self._bad_shape(expr, "malformed matrix series", item)
            points = []
            for raw in values:
                point = _point(raw)
                if point is None:
                    raise self._bad_shape(expr, "malformed matrix point", raw)
                points.append(point)
            series.append(Series(labels=labels, samples=tuple(points)))
        return tuple(series)


# --- helpers ----------------------------------------------------------------------------


def _range_vector_error(expr: str) -> QueryError:
    return QueryError(
        "the query gives a range vector (matrix); an instant query needs an instant vector: "
        "wrap it in rate(), avg_over_time(), ...",
        status=200,
        error_type="unsupported_result",
        expr=expr,
    )


def _server_timeout(timeout: float) -> str:
    return _seconds(max(timeout * _SERVER_SHARE, _MIN_TIMEOUT))


def _seconds(value: float) -> str:
    """Seconds as Prometheus reads them (a float; its timestamps have ms resolution)."""
    return f"{value:.3f}"


def _point(raw: Any) -> tuple[float, float] | None:
    """``[ts, "value"]`` -> ``(ts, value)``; "NaN", "+Inf", "-Inf" become floats."""
    if not isinstance(raw, list) or len(raw) != 2:
        return None
    ts, text = raw
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not isinstance(text, str):
        return None
    try:
        return float(ts), float(text)
    except ValueError:
        return None


def _labels(raw: Any) -> tuple[tuple[str, str], ...] | None:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        return None
    return labels_of(raw)


def _envelope(response: requests.Response | None) -> dict[str, Any]:
    if response is None:
        return {}
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_fields(response: requests.Response) -> tuple[str, str | None]:
    """Prometheus' ``errorType`` and ``error`` from an error body ("" and None if absent)."""
    body = _envelope(response)
    error = body.get("error")
    return str(body.get("errorType") or ""), (_clip(str(error)) if error is not None else None)


def _result_type(response: requests.Response | None) -> str | None:
    data = _envelope(response).get("data")
    return str(data.get("resultType")) if isinstance(data, dict) else None


def _warnings(response: requests.Response | None) -> tuple[str, ...]:
    if response is None or b'"warnings"' not in response.content:
        return ()
    warnings = _envelope(response).get("warnings")
    return tuple(str(w) for w in warnings) if isinstance(warnings, list) else ()


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET else text[: _SNIPPET - 3] + "..."


def _snippet(response: requests.Response | None) -> str:
    if response is None:
        return "(no body)"
    text = response.content[: _SNIPPET * 4].decode("utf-8", errors="replace")
    return _clip(text) if text.strip() else "(empty body)"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps (causes, contexts, urllib3 reasons, args)."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        nested = [getattr(current, "reason", None), current.__cause__, current.__context__]
        nested.extend(current.args)
        todo.extend(n for n in nested if isinstance(n, BaseException))
    return seen


def _is_timeout(exc: BaseException) -> bool:
    for link in _chain(exc):
        if isinstance(link, urllib3.exceptions.NewConnectionError):
            continue  # a subclass of ConnectTimeoutError, for history's sake
        if isinstance(
            link,
            requests.exceptions.Timeout | urllib3.exceptions.TimeoutError | TimeoutError,
        ):
            return True
    return False


def _cause_text(exc: BaseException) -> str:
    """The innermost cause in words, without URLs: "Connection refused",
    "Remote end closed connection without response"."""
    for link in reversed(_chain(exc)):
        if isinstance(link, OSError) and link.strerror:
            return link.strerror
        if isinstance(link, http.client.HTTPException) and str(link):
            return str(link)
    return type(exc).__name__


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
