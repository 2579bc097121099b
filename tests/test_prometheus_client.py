"""rollbackd.prometheus against real processes: the real Prometheus, and local HTTP servers
that misbehave on purpose (tests/support/hostile_http.py). Nothing is mocked."""

from __future__ import annotations

import asyncio
import base64
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rollbackd.config.settings import PrometheusSection
from rollbackd.core.samples import ResultType
from rollbackd.prometheus import (
    PrometheusClient,
    PrometheusError,
    PrometheusUnavailable,
    QueryError,
    UnavailableReason,
)
from support.hostile_http import (
    CLOSE,
    STARTING,
    HungServer,
    RecordingServer,
    Reply,
    always,
    closed_port,
    error,
    in_turn,
    json_reply,
    success,
)
from support.prometheus import PrometheusFactory, PrometheusServer, prometheus_available

AT = 1_700_000_000.25
"""A fixed evaluation time: Prometheus echoes it as the samples' timestamp."""

ONE = success([{"metric": {"job": "api"}, "value": [AT, "1"]}])
"""A valid answer: one vector sample."""

TOKEN = "s3cr3t-t0ken-that-must-not-leak"
PASSWORD = "hunter2-but-longer"


def client_for(url: str, timeout: str = "1s", **settings: Any) -> PrometheusClient:
    return PrometheusClient(PrometheusSection(url=url, timeout=timeout, **settings))


@pytest.fixture(scope="module")
def prometheus() -> Iterator[PrometheusServer]:
    """One real Prometheus for the read-only tests of this module (scrapes nothing)."""
    if not prometheus_available():
        pytest.skip("the 'prometheus' binary is not on PATH (Debian package: prometheus)")
    with PrometheusServer() as server:
        yield server


@pytest.fixture
def client(prometheus: PrometheusServer) -> Iterator[PrometheusClient]:
    client = client_for(prometheus.url, timeout="5s")
    yield client
    client.close()


def unavailable(client: PrometheusClient, expr: str = "up") -> PrometheusUnavailable:
    with pytest.raises(PrometheusUnavailable) as caught:
        client.query(expr)
    return caught.value


# --- answers of the real Prometheus ---------------------------------------------------


@pytest.mark.prometheus
def test_vector_with_labels(client: PrometheusClient) -> None:
    expr = (
        'label_replace(vector(1), "job", "api", "", "")'
        ' or label_replace(vector(2.5), "job", "web", "", "")'
    )
    result = client.query(expr, at=AT)
    assert result.result_type is ResultType.VECTOR
    assert result.expr == expr
    assert {s.labels: s.value for s in result.samples} == {
        (("job", "api"),): 1.0,
        (("job", "web"),): 2.5,
    }
    assert {s.timestamp for s in result.samples} == {AT}
    assert result.samples[0].label("job") in {"api", "web"}
    assert result.warnings == ()


@pytest.mark.prometheus
@pytest.mark.parametrize("expr", ["scalar(vector(1))", "1"])
def test_scalar(client: PrometheusClient, expr: str) -> None:
    result = client.query(expr, at=AT)
    assert result.result_type is ResultType.SCALAR
    [sample] = result.samples
    assert (sample.labels, sample.value, sample.timestamp) == ((), 1.0, AT)


@pytest.mark.prometheus
@pytest.mark.parametrize(
    ("expr", "result_type", "expected"),
    [
        ("0/0", ResultType.SCALAR, math.nan),
        ("vector(0) / 0", ResultType.VECTOR, math.nan),
        ("1/0", ResultType.SCALAR, math.inf),
        ("-1/0", ResultType.SCALAR, -math.inf),
        ("vector(1) / 0", ResultType.VECTOR, math.inf),
    ],
)
def test_nan_and_infinities(
    client: PrometheusClient, expr: str, result_type: ResultType, expected: float
) -> None:
    result = client.query(expr)
    assert result.result_type is result_type
    [sample] = result.samples
    if math.isnan(expected):
        assert sample.is_nan
    else:
        assert sample.value == expected


@pytest.mark.prometheus
@pytest.mark.parametrize(
    "expr",
    [
        "absent(vector(1))",
        "a_metric_that_does_not_exist",
        'sum(rate(nope_total{code=~"5.."}[5m])) / sum(rate(nope_total[5m]))',
    ],
)
def test_empty_answers(client: PrometheusClient, expr: str) -> None:
    result = client.query(expr)
    assert result.result_type is ResultType.VECTOR
    assert result.empty
    assert result.samples == ()


@pytest.mark.prometheus
def test_a_parse_error_is_a_query_error(client: PrometheusClient) -> None:
    with pytest.raises(QueryError) as caught:
        client.query("sum(")
    error = caught.value
    assert (error.status, error.error_type, error.expr) == (400, "bad_data", "sum(")
    assert "parse error" in str(error)


@pytest.mark.prometheus
def test_an_execution_error_is_a_query_error(client: PrometheusClient) -> None:
    # Many-to-many matching fails while evaluating, not while parsing: 422 execution.
    expr = (
        "vector(1) + on() ("
        'label_replace(vector(1), "a", "1", "", "") or label_replace(vector(1), "a", "2", "", "")'
        ")"
    )
    with pytest.raises(QueryError) as caught:
        client.query(expr)
    assert (caught.value.status, caught.value.error_type) == (422, "execution")
    assert "many-to-many" in str(caught.value)


@pytest.mark.prometheus
@pytest.mark.parametrize(
    ("expr", "words"),
    [('"text"', "string"), ("vector(1)[1m:10s]", "range vector"), ("nope[5m]", "range vector")],
)
def test_answers_checks_cannot_use_are_query_errors(
    client: PrometheusClient, expr: str, words: str
) -> None:
    with pytest.raises(QueryError) as caught:
        client.query(expr)
    assert caught.value.error_type == "unsupported_result"
    assert words in str(caught.value)


@pytest.mark.prometheus
def test_query_range_keeps_sub_second_times(client: PrometheusClient) -> None:
    # custom_query_range itself rounds start and end to whole seconds.
    result = client.query_range("vector(1)", AT, AT + 30, 15)
    [series] = result.series
    assert series.labels == ()
    assert series.samples == ((AT, 1.0), (AT + 15, 1.0), (AT + 30, 1.0))


@pytest.mark.prometheus
def test_query_range_of_nothing(client: PrometheusClient) -> None:
    assert client.query_range("nope", AT, AT + 60, 15).series == ()


@pytest.mark.prometheus
def test_async_queries(client: PrometheusClient) -> None:
    async def both() -> tuple[float, int]:
        instant, ranged = await asyncio.gather(
            client.aquery("vector(7)", at=AT), client.aquery_range("vector(7)", AT, AT + 60, 30)
        )
        return instant.samples[0].value, len(ranged.series[0].samples)

    assert asyncio.run(both()) == (7.0, 3)


@pytest.mark.prometheus
def test_ready_and_build_info(client: PrometheusClient) -> None:
    assert client.ready()
    info = client.build_info()
    assert info is not None
    assert info["version"].startswith("2.")


@pytest.mark.prometheus
def test_eight_threads_share_one_client(client: PrometheusClient) -> None:
    threads_n, queries_n = 8, 50
    connections: list[Any] = []
    failures: list[BaseException] = []
    values: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(threads_n)

    def work(n: int) -> None:
        try:
            start.wait()
            got = [client.query(f"vector({n})").samples[0].value for _ in range(queries_n)]
            with lock:
                values.extend(got)
                # Kept alive (referenced) so that identities cannot be reused.
                connections.append(client._connection())
        except BaseException as exc:
            with lock:
                failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert sorted(values) == sorted(float(n) for n in range(threads_n) for _ in range(queries_n))
    assert len({id(c) for c in connections}) == threads_n
    assert len({id(c.session) for c in connections}) == threads_n


# --- a Prometheus that stops and comes back -------------------------------------------


@pytest.mark.faults
@pytest.mark.prometheus
def test_stopped_prometheus_then_restarted(prometheus_factory: PrometheusFactory) -> None:
    server = prometheus_factory()
    client = client_for(server.url, timeout="0.5s")
    assert client.query("vector(1)").samples[0].value == 1.0

    server.stop()
    error = unavailable(client, "vector(1)")
    assert error.reason is UnavailableReason.CONNECT
    assert not client.ready()

    server.restart()  # same port, waits until ready
    assert client.ready()
    assert client.query("vector(1)").samples[0].value == 1.0


# --- hostile servers ------------------------------------------------------------------


@pytest.mark.faults
def test_hung_server_times_out() -> None:
    with HungServer() as hung:
        client = client_for(hung.url, timeout="0.5s")
        error = unavailable(client)
        assert error.reason is UnavailableReason.TIMEOUT
        assert error.status is None
        assert "no answer within" in str(error)
        assert not client.ready(timeout=0.2)


@pytest.mark.faults
def test_closed_port_is_connect() -> None:
    with closed_port() as url:
        error = unavailable(client_for(url, timeout="0.6s"))
    assert error.reason is UnavailableReason.CONNECT
    assert "Connection refused" in str(error)
    assert error.attempts > 1  # retried until the deadline


@pytest.mark.faults
def test_hang_up_without_answer_is_connect() -> None:
    with RecordingServer(always(CLOSE)) as server:
        error = unavailable(client_for(server.url, timeout="0.3s"))
    assert error.reason is UnavailableReason.CONNECT
    assert error.attempts == server.count


@pytest.mark.faults
def test_503_while_starting_is_retried_then_unavailable() -> None:
    with RecordingServer(always(STARTING)) as server:
        client = client_for(server.url, timeout="1s")
        error = unavailable(client)
        assert not client.ready()
    assert error.reason is UnavailableReason.HTTP_5XX
    assert error.status == 503
    assert "Service Unavailable" in str(error)
    assert server.count > 1
    # Every attempt is one request: urllib3 does not retry underneath.
    assert error.attempts == server.count - 1  # the last request was ready()'s
    assert str(error).endswith(f"(gave up after {error.attempts} attempts)")


@pytest.mark.faults
def test_503_twice_then_success() -> None:
    with RecordingServer(in_turn(STARTING, STARTING, ONE)) as server:
        result = client_for(server.url, timeout="5s").query("up")
    assert [(s.labels, s.value) for s in result.samples] == [((("job", "api"),), 1.0)]
    assert server.count == 3


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (error(503, "timeout", "query timed out in expression evaluation"), "timeout"),
        (error(503, "canceled", "query was canceled"), "http_5xx"),
        (error(500, "internal", "oops"), "http_5xx"),
        (Reply(502, b"<html>Bad Gateway</html>", "text/html"), "http_5xx"),
        (Reply(429, b"slow down", "text/plain"), "throttled"),
    ],
)
@pytest.mark.faults
def test_transient_statuses(reply: Reply, reason: str) -> None:
    with RecordingServer(always(reply)) as server:
        error = unavailable(client_for(server.url, timeout="0.3s"))
    assert error.reason == reason
    assert error.status == reply.status
    assert error.attempts == server.count >= 1


@pytest.mark.parametrize(
    "reply",
    [
        Reply(200, b"<html>this is not Prometheus</html>", "text/html"),
        Reply(200, b"", "application/json"),
        json_reply(200, {"status": "success"}),
        json_reply(200, ["a", "list"]),
        json_reply(200, {"status": "success", "data": {"result": "a string"}}),
        success([{"metric": {"job": "api"}, "value": [AT, 1]}]),  # value not a string
        success([{"metric": {"job": "api"}, "value": [AT, "one"]}]),
        success([{"metric": {"job": 1}, "value": [AT, "1"]}]),
        success([{"metric": {}}]),
        success([AT, "1", "extra"]),
    ],
)
@pytest.mark.faults
def test_garbage_is_bad_response(reply: Reply) -> None:
    with RecordingServer(always(reply)) as server:
        error = unavailable(client_for(server.url, timeout="0.3s"))
    assert error.reason is UnavailableReason.BAD_RESPONSE
    assert error.attempts == server.count >= 1


@pytest.mark.parametrize(
    ("reply", "error_type"),
    [
        (error(400, "bad_data", 'invalid parameter "query": parse error'), "bad_data"),
        (error(422, "execution", "many-to-many matching not allowed"), "execution"),
        (Reply(401, b"Unauthorized", "text/plain"), "http_401"),
        (Reply(404, b"404 page not found", "text/plain"), "http_404"),
    ],
)
@pytest.mark.faults
def test_rejections_are_not_retried(reply: Reply, error_type: str) -> None:
    with RecordingServer(always(reply)) as server:
        with pytest.raises(QueryError) as caught:
            client_for(server.url, timeout="5s").query("sum(")
        assert server.count == 1
    assert (caught.value.status, caught.value.error_type) == (reply.status, error_type)


def test_request_parameters() -> None:
    with RecordingServer(always(ONE)) as server:
        client = client_for(server.url, timeout="2s", headers={"X-Scope-OrgID": "team-a"})
        client.query("up == 1", at=AT)
        client.query("up")
        [instant, now] = server.requests
    assert instant.path == "/api/v1/query"
    assert instant.param("query") == "up == 1"
    assert instant.param("time") == f"{AT:.3f}"
    assert instant.headers["x-scope-orgid"] == "team-a"
    assert now.param("time") is None
    # Prometheus' own query timeout is sent, a little below the request's.
    for request in (instant, now):
        server_timeout = float(request.param("timeout") or "inf")
        assert 0 < server_timeout < 2.0


def test_warnings_are_kept() -> None:
    reply = success([], warnings=["PromQL info: metric might not be a counter"])
    with RecordingServer(always(reply)) as server:
        result = client_for(server.url).query("rate(x[5m])")
    assert result.warnings == ("PromQL info: metric might not be a counter",)


# --- credentials ------------------------------------------------------------------------


def echo_authorization(status: int) -> RecordingServer:
    """A server that echoes the Authorization header back in an error body."""

    def responder(request: Any, _n: int) -> Reply:
        seen = request.headers.get("authorization", "")
        return error(status, "bad_data", f"you sent {seen}")

    return RecordingServer(responder)


@pytest.mark.parametrize("status", [400, 401, 503])
def test_bearer_token_from_file_is_sent_and_never_shown(tmp_path: Path, status: int) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with echo_authorization(status) as server:
        client = client_for(server.url, timeout="0.3s", bearer_token_file=str(token_file))
        with pytest.raises(PrometheusError) as caught:
            client.query("up")
        requests = server.requests
    assert requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in str(caught.value)
    assert TOKEN not in repr(caught.value)
    assert "<redacted>" in str(caught.value)


def test_basic_auth_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROM_PASSWORD", PASSWORD)
    with echo_authorization(400) as server:
        client = client_for(
            server.url,
            basic_auth={"username": "rollbackd", "password_env": "PROM_PASSWORD"},
        )
        with pytest.raises(QueryError) as caught:
            client.query("up")
        [request] = server.requests
    expected = base64.b64encode(f"rollbackd:{PASSWORD}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    assert expected not in str(caught.value)


def test_bearer_and_basic_auth_together_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROM_TOKEN", TOKEN)
    monkeypatch.setenv("PROM_PASSWORD", PASSWORD)
    with pytest.raises(ValueError, match="not both"):
        client_for(
            "http://127.0.0.1:9090",
            bearer_token_env="PROM_TOKEN",
            basic_auth={"username": "u", "password_env": "PROM_PASSWORD"},
        )


def test_a_bare_400_is_a_query_error() -> None:
    reply = Reply(400, b"Bad Request", "text/plain")
    with RecordingServer(always(reply)) as server, pytest.raises(QueryError) as caught:
        client_for(server.url).query("up")
    assert (caught.value.status, caught.value.error_type) == (400, "http_400")
    assert "(400 http_400): Bad Request" in str(caught.value)


def test_a_password_in_the_url_is_not_shown() -> None:
    with closed_port() as url:
        client = client_for(url.replace("://", f"://user:{PASSWORD}@"), timeout="0.2s")
        error = unavailable(client)
    assert PASSWORD not in str(error)
    assert PASSWORD not in client.url


def test_deadline_must_be_positive() -> None:
    with pytest.raises(ValueError, match="deadline"):
        client_for("http://127.0.0.1:9090").query("up", deadline=0)
