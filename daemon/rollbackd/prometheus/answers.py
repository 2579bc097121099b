"""Prometheus' JSON answers made typed: instant vectors and scalars, range matrices,
and what the response envelope says besides (warnings, result type, error fields)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import requests

from rollbackd.core.samples import QueryResult, ResultType, Sample, Series, labels_of
from rollbackd.prometheus.errors import PrometheusUnavailable, QueryError

SNIPPET = 200
"""Characters of an unexpected body quoted in a message."""

BadShape = Callable[[str, str, Any], PrometheusUnavailable]
"""Builds the error for an answer of the wrong shape: (expr, what, the data)."""


def instant_result(
    expr: str, data: Any, response: requests.Response | None, bad_shape: BadShape
) -> QueryResult:
    warnings = warnings_of(response)
    if not isinstance(data, list):
        raise bad_shape(expr, "data.result is not a list", data)
    if not data and result_type(response) == "matrix":
        # Refused when empty too, not only once the series exist.
        raise range_vector_error(expr)
    if len(data) == 2 and not isinstance(data[0], dict):
        # A scalar [ts, "v"] (or a string [ts, "text"], which checks cannot use).
        point = _point(data)
        if point is None:
            if result_type(response) == "string":
                raise QueryError(
                    f"the query gives a string, not a number: {clip(repr(data))}",
                    status=200,
                    error_type="unsupported_result",
                    expr=expr,
                )
            raise bad_shape(expr, "malformed scalar", data)
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
            raise bad_shape(expr, "malformed vector", data)
        if "values" in item or "histograms" in item:
            raise range_vector_error(expr)
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
            raise bad_shape(expr, "malformed vector sample", item)
        ts, value = point
        samples.append(Sample(labels=labels, value=value, timestamp=ts))
    return QueryResult(
        expr=expr, result_type=ResultType.VECTOR, samples=tuple(samples), warnings=warnings
    )


def range_series(expr: str, data: Any, bad_shape: BadShape) -> tuple[Series, ...]:
    if not isinstance(data, list):
        raise bad_shape(expr, "data.result is not a list", data)
    series = []
    for item in data:
        if not isinstance(item, dict):
            raise bad_shape(expr, "malformed matrix", data)
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
            raise bad_shape(expr, "malformed matrix series", item)
        points = []
        for raw in values:
            point = _point(raw)
            if point is None:
                raise bad_shape(expr, "malformed matrix point", raw)
            points.append(point)
        series.append(Series(labels=labels, samples=tuple(points)))
    return tuple(series)


def range_vector_error(expr: str) -> QueryError:
    return QueryError(
        "the query gives a range vector (matrix); an instant query needs an instant vector: "
        "wrap it in rate(), avg_over_time(), ...",
        status=200,
        error_type="unsupported_result",
        expr=expr,
    )


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


def error_fields(response: requests.Response) -> tuple[str, str | None]:
    """Prometheus' ``errorType`` and ``error`` from an error body ("" and None if absent)."""
    body = _envelope(response)
    error = body.get("error")
    return str(body.get("errorType") or ""), (clip(str(error)) if error is not None else None)


def result_type(response: requests.Response | None) -> str | None:
    data = _envelope(response).get("data")
    return str(data.get("resultType")) if isinstance(data, dict) else None


def warnings_of(response: requests.Response | None) -> tuple[str, ...]:
    if response is None or b'"warnings"' not in response.content:
        return ()
    warnings = _envelope(response).get("warnings")
    return tuple(str(w) for w in warnings) if isinstance(warnings, list) else ()


def clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET else text[: SNIPPET - 3] + "..."


def snippet(response: requests.Response | None) -> str:
    if response is None:
        return "(no body)"
    text = response.content[: SNIPPET * 4].decode("utf-8", errors="replace")
    return clip(text) if text.strip() else "(empty body)"
