"""Each HTTP notifier against a real local server that records what it receives: the exact
request, and how each kind of failure is classified (reason, retry or not)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rollbackd.config.secrets import SecretError
from rollbackd.notify.base import BuildContext, DeliveryError, NotifierSpec, Sender
from rollbackd.notify.content import Message, build_message
from rollbackd.notify.slack import SlackNotifier
from support.hostile_http import closed_port
from support.notify_peers import (
    CLOSE,
    ROUTING_KEY,
    SIGNING,
    SLACK_PATH,
    SPECS,
    TOKEN,
    Answer,
    HeaderServer,
    HungServer,
    RecordingServer,
    Reply,
    always,
    grafana_spec,
    json_body,
    json_reply,
    pagerduty_spec,
    pipeline_event,
    plain_event,
    secret_file,
    slack_spec,
    webhook_spec,
)

PROMETHEUS = "http://prom.internal:9090"
PUBLIC = "https://rollbackd.example"
CONTEXT = BuildContext(prometheus_url=PROMETHEUS, public_url=PUBLIC, timeout=5.0)


def message(kind: str = "rollback.succeeded", **extra: Any) -> Message:
    return build_message(
        pipeline_event(kind, **extra), prometheus_url=PROMETHEUS, public_url=PUBLIC
    )


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    with RecordingServer(always(Reply(200, b"ok", "text/plain"))) as peer:
        yield peer


@pytest.fixture
async def senders() -> AsyncIterator[Callable[[NotifierSpec], Sender]]:
    built: list[Sender] = []

    def build(spec: NotifierSpec, context: BuildContext = CONTEXT) -> Sender:
        sender = spec.build(context)
        built.append(sender)
        return sender

    yield build
    for sender in built:
        await sender.aclose()


# -- Slack --------------------------------------------------------------------------


async def test_slack_posts_a_block_kit_message(
    tmp_path: Path, server: RecordingServer, senders: Callable[[NotifierSpec], Sender]
) -> None:
    sender = senders(slack_spec(tmp_path, server.url + SLACK_PATH, channel="#releases"))
    sent = message("rollback.succeeded", outcome="verified")
    await sender.send(sent)
    [request] = server.requests
    assert (request.method, request.path) == ("POST", SLACK_PATH)
    assert request.headers["content-type"] == "application/json"
    body = json_body(request)
    assert body["text"] == "checkout rolled back 2.0.0 → 1.0.0"
    assert body["channel"] == "#releases"
    blocks = body["blocks"]
    assert blocks[0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": "checkout rolled back 2.0.0 → 1.0.0"},
    }
    fields = [f["text"] for f in blocks[1]["fields"]]
    assert fields == [
        "*Service*\ncheckout",
        "*Versions*\n2.0.0 → 1.0.0",
        "*Rollback*\n#7",
        "*Severity*\nwarning",
    ]
    sections = [b["text"]["text"] for b in blocks if b["type"] == "section" and "text" in b]
    facts, causes, guards = sections
    assert "*Outcome:* verified" in facts
    # mrkdwn escaping: a reason's "<" and "&" must not start links or entities.
    assert "error ratio 12.5% &gt; 5% &amp; p99 &lt;ok&gt;" in causes
    assert f"<{sent.graph_url}|graph>" in causes
    assert "value 0.125; threshold &gt; 0.05; baseline 0.01" in causes
    assert "✅ *cooldown*: no rollback in the last 15m" in guards
    assert blocks[-1]["type"] == "context"
    assert (
        f"<{PUBLIC}/api/v1/rollbacks?service=checkout|rollbackd>"
        in (blocks[-1]["elements"][0]["text"])
    )


async def test_a_missing_secret_is_named_without_its_value(tmp_path: Path) -> None:
    spec = SlackNotifier.model_validate(
        {"name": "ops", "type": "slack", "url_env": "ROLLBACKD_TEST_NO_SUCH_SLACK_URL"}
    )
    with pytest.raises(SecretError, match="ROLLBACKD_TEST_NO_SUCH_SLACK_URL is not set"):
        spec.build(CONTEXT)


# -- webhook ------------------------------------------------------------------------


async def test_webhook_posts_the_event_as_json_signed_over_the_exact_body(
    tmp_path: Path, server: RecordingServer, senders: Callable[[NotifierSpec], Sender]
) -> None:
    spec = webhook_spec(
        tmp_path,
        server.url + "/hooks/rollbackd",
        headers={"X-Team": "payments"},
        signing_secret_file=secret_file(tmp_path, "signing", SIGNING),
    )
    sent = message("rollback.failed", outcome="every executor failed")
    await senders(spec).send(sent)
    [request] = server.requests
    assert (request.method, request.path) == ("POST", "/hooks/rollbackd")
    headers = request.headers
    assert headers["content-type"] == "application/json"
    assert headers["x-rollbackd-event"] == "rollback.failed"
    assert headers["x-rollbackd-delivery"] == "42"
    assert headers["x-team"] == "payments"
    # What a receiver does: recompute over the raw bytes, compare in constant time.
    expected = "sha256=" + hmac.new(SIGNING.encode(), request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-rollbackd-signature"], expected)
    forged = "sha256=" + hmac.new(b"wrong", request.body, hashlib.sha256).hexdigest()
    assert not hmac.compare_digest(headers["x-rollbackd-signature"], forged)
    body = json_body(request)
    assert body == sent.as_json()
    assert (body["type"], body["service"], body["rollback_id"], body["id"]) == (
        "rollback.failed",
        "checkout",
        7,
        42,
    )
    assert (body["from_version"], body["to_version"]) == ("2.0.0", "1.0.0")
    assert body["data"]["trigger"]["check"] == "error_rate"
    assert body["causes"][0]["value"] == 0.125
    assert [g["guard"] for g in body["guards"]] == ["paused", "cooldown", "mode"]
    assert body["graph_url"].startswith(f"{PROMETHEUS}/graph?g0.expr=")
    assert body["severity"] == "critical"


async def test_webhook_without_a_secret_is_unsigned_and_takes_its_header_name(
    tmp_path: Path, server: RecordingServer, senders: Callable[[NotifierSpec], Sender]
) -> None:
    await senders(webhook_spec(tmp_path, server.url + "/a")).send(message())
    signed = webhook_spec(
        tmp_path,
        server.url + "/b",
        signature_header="X-Hub-Signature-256",
        signing_secret_file=secret_file(tmp_path, "s", SIGNING),
    )
    await senders(signed).send(message())
    unsigned, hub = server.requests
    assert "x-rollbackd-signature" not in unsigned.headers
    expected = "sha256=" + hmac.new(SIGNING.encode(), hub.body, hashlib.sha256).hexdigest()
    assert hub.headers["x-hub-signature-256"] == expected


# -- PagerDuty ----------------------------------------------------------------------


async def test_pagerduty_triggers_on_a_failed_rollback_and_a_success_resolves_it(
    tmp_path: Path, senders: Callable[[NotifierSpec], Sender]
) -> None:
    accepted = json_reply(202, {"status": "success", "message": "Event processed"})
    with RecordingServer(always(accepted)) as server:
        sender = senders(pagerduty_spec(tmp_path, server.url + "/v2/enqueue"))
        await sender.send(message("rollback.failed", outcome="every executor failed"))
        await sender.send(message("rollback.succeeded", rollback_id=8))
        trigger, resolve = (json_body(r) for r in server.requests)
    assert server.requests[0].path == "/v2/enqueue"
    assert trigger["routing_key"] == ROUTING_KEY
    assert trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == "rollbackd/checkout/rollback"
    payload = trigger["payload"]
    assert payload["summary"] == "checkout rollback 2.0.0 → 1.0.0 FAILED"
    assert (payload["source"], payload["component"], payload["class"]) == (
        "checkout",
        "checkout",
        "rollback.failed",
    )
    assert payload["severity"] == "critical"
    assert payload["timestamp"] == "2023-11-14T22:15:00Z"
    details = payload["custom_details"]
    assert details["Outcome"] == "every executor failed"
    assert (details["from_version"], details["to_version"], details["rollback_id"]) == (
        "2.0.0",
        "1.0.0",
        7,
    )
    assert details["causes"][0].startswith('error_rate{version="2.0.0"}: error ratio 12.5%')
    assert "query: sum(rate(" in details["causes"][0]
    assert details["guards"][0] == "passed paused: automation is on"
    assert [link["text"] for link in trigger["links"]] == ["Prometheus graph", "rollbackd"]
    assert trigger["client_url"] == PUBLIC
    assert resolve == {
        "routing_key": ROUTING_KEY,
        "event_action": "resolve",
        "dedup_key": "rollbackd/checkout/rollback",
    }


async def test_pagerduty_pages_for_blind_checks_and_resolves_when_prometheus_is_back(
    tmp_path: Path, server: RecordingServer, senders: Callable[[NotifierSpec], Sender]
) -> None:
    sender = senders(pagerduty_spec(tmp_path, server.url))
    # Reachability is daemon-wide: the recovery may name another service than the outage.
    await sender.send(build_message(plain_event("prometheus.unreachable", reason="refused")))
    await sender.send(build_message(plain_event("prometheus.recovered", service="search")))
    down, up = (json_body(r) for r in server.requests)
    assert (down["event_action"], down["dedup_key"]) == ("trigger", "rollbackd/prometheus")
    assert (up["event_action"], up["dedup_key"]) == ("resolve", "rollbackd/prometheus")
    assert [
        k for k in ("rollback.started", "check.breach", "verify.failed") if sender.accepts(k)
    ] == ["verify.failed"]


# -- Grafana ------------------------------------------------------------------------


async def test_grafana_annotates_with_tags_and_a_bearer_token(
    tmp_path: Path, server: RecordingServer, senders: Callable[[NotifierSpec], Sender]
) -> None:
    spec = grafana_spec(
        tmp_path, server.url + "/grafana/", dashboard_uid="abc123", tags=["rollbackd", "prod"]
    )
    sent = message("rollback.started")
    await senders(spec).send(sent)
    [request] = server.requests
    assert (request.method, request.path) == ("POST", "/grafana/api/annotations")
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    body = json_body(request)
    assert body == {
        "time": 1_700_000_100_000,
        "tags": ["rollbackd", "prod", "checkout", "rollback.started"],
        "text": sent.text(),
        "dashboardUID": "abc123",
    }
    assert body["text"].startswith("checkout rolling back 2.0.0 → 1.0.0")


# -- failures, the same for every HTTP notifier --------------------------------------


@pytest.mark.parametrize("kind", SPECS)
@pytest.mark.parametrize(
    ("reply", "reason", "retry"),
    [
        (Reply(500, b"boom"), "http_5xx", True),
        (Reply(503, b"starting", "text/plain"), "http_5xx", True),
        (Reply(429, b"slow down"), "http_429", True),
        (Reply(400, b'{"error":"invalid_payload"}'), "http_4xx", False),
        (Reply(403, b"invalid_token"), "http_4xx", False),
        (Reply(404, b"no_service"), "http_4xx", False),
        (Reply(301, b""), "http_3xx", False),
        (CLOSE, "network", True),
    ],
)
async def test_failures_are_classified(
    tmp_path: Path,
    senders: Callable[[NotifierSpec], Sender],
    kind: str,
    reply: Reply | None,
    reason: str,
    retry: bool,
) -> None:
    with RecordingServer(always(reply)) as server:
        sender = senders(SPECS[kind](tmp_path, server.url))
        with pytest.raises(DeliveryError) as caught:
            await sender.send(message("rollback.failed"))
    assert (caught.value.reason, caught.value.retry) == (reason, retry)
    assert server.count == 1  # a sender tries once; the dispatcher decides about more
    for secret in (SLACK_PATH, ROUTING_KEY, TOKEN, SIGNING):
        assert secret not in str(caught.value)


async def test_retry_after_is_passed_on(
    tmp_path: Path, senders: Callable[[NotifierSpec], Sender]
) -> None:
    answers = [Answer(429, {"Retry-After": "7"}), Answer(503, {"Retry-After": "soon"})]
    with HeaderServer(answers) as server:
        sender = senders(webhook_spec(tmp_path, server.url))
        with pytest.raises(DeliveryError) as limited:
            await sender.send(message())
        with pytest.raises(DeliveryError) as unavailable:
            await sender.send(message())
    assert (limited.value.reason, limited.value.retry_after) == ("http_429", 7.0)
    assert (unavailable.value.reason, unavailable.value.retry_after) == ("http_5xx", None)


@pytest.mark.parametrize("kind", SPECS)
async def test_connection_refused_and_no_answer(
    tmp_path: Path, senders: Callable[..., Sender], kind: str
) -> None:
    with closed_port() as url, pytest.raises(DeliveryError) as refused:
        await senders(SPECS[kind](tmp_path, url)).send(message())
    assert (refused.value.reason, refused.value.retry) == ("connect", True)
    with HungServer() as hung:
        quick = BuildContext(timeout=0.2)
        with pytest.raises(DeliveryError) as silent:
            await senders(SPECS[kind](tmp_path, hung.url), quick).send(message())
    assert (silent.value.reason, silent.value.retry) == ("timeout", True)


async def test_a_secret_url_is_redacted_from_errors_even_when_echoed(
    tmp_path: Path, senders: Callable[[NotifierSpec], Sender]
) -> None:
    # A misbehaving peer answers with the request line it got, the secret path included.
    def echo(request: Any, number: int) -> Reply:
        return Reply(400, f"unknown hook {request.path}".encode(), "text/plain")

    with RecordingServer(echo) as server:
        secret_url = server.url + SLACK_PATH
        with pytest.raises(DeliveryError) as caught:
            await senders(slack_spec(tmp_path, secret_url)).send(message())
    assert str(caught.value) == "HTTP 400: unknown hook [redacted]"
