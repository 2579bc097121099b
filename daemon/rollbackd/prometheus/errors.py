"""What talking to Prometheus can raise (see the package's docstring for the tree)."""

from __future__ import annotations

from enum import StrEnum


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
