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

from rollbackd.prometheus.client import PrometheusClient
from rollbackd.prometheus.errors import (
    PrometheusError,
    PrometheusUnavailable,
    QueryError,
    UnavailableReason,
)

__all__ = [
    "PrometheusClient",
    "PrometheusError",
    "PrometheusUnavailable",
    "QueryError",
    "UnavailableReason",
]
