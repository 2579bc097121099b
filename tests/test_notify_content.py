"""What notifications say: built once per event from the data the engine and the pipeline
publish, the same for every notifier."""

from __future__ import annotations

import json
import math
from urllib.parse import parse_qs, urlsplit

import pytest

from rollbackd.core.events import EVENT_TYPES
from rollbackd.core.model import Event
from rollbackd.notify.content import build_message, graph_link, jsonable
from support.notify_peers import QUERY, pipeline_event, plain_event


def test_a_rollback_message_carries_versions_causes_guards_and_links() -> None:
    message = build_message(
        pipeline_event("rollback.succeeded", outcome="verified: checks held for 5m"),
        prometheus_url="http://prom.internal:9090/",
        public_url="https://rollbackd.example/",
    )
    assert message.title == "checkout rolled back 2.0.0 → 1.0.0"
    assert message.severity == "warning"
    assert (message.service, message.rollback_id) == ("checkout", 7)
    assert (message.from_version, message.to_version) == ("2.0.0", "1.0.0")
    [cause] = message.causes
    assert (cause.source, cause.check, cause.value, cause.threshold) == (
        "check",
        "error_rate",
        0.125,
        "> 0.05",
    )
    assert (cause.baseline, cause.baseline_source) == (0.01, "last known good 1.0.0")
    assert dict(cause.series) == {"version": "2.0.0"}
    assert [(g.name, g.passed) for g in message.guards] == [
        ("paused", True),
        ("cooldown", True),
        ("mode", True),
    ]
    assert message.link == "https://rollbackd.example/api/v1/rollbacks?service=checkout"
    text = message.text()
    for expected in (
        "Outcome: verified: checks held for 5m",
        "Rollback: #7 (source: check)",
        'error_rate{version="2.0.0"}: error ratio 12.5% > 5%',
        "value 0.125; threshold > 0.05; baseline 0.01 (last known good 1.0.0)",
        "passed mode: mode auto: execute",
        "Event: rollback.succeeded at 2023-11-14T22:15:00Z",
        f"graph: {message.graph_url}",
    ):
        assert expected in text


def test_the_graph_link_opens_the_breaching_query_in_prometheus() -> None:
    link = graph_link("http://user:hunter2@prom.internal:9090/", QUERY)
    assert link is not None
    parts = urlsplit(link)
    assert (parts.scheme, parts.netloc, parts.path) == ("http", "prom.internal:9090", "/graph")
    assert "hunter2" not in link  # credentials in the configured URL never reach a message
    assert parse_qs(parts.query) == {
        "g0.expr": [QUERY],
        "g0.tab": ["0"],
        "g0.range_input": ["1h"],
    }
    assert graph_link(None, QUERY) is None


@pytest.mark.parametrize(
    ("kind", "extra", "title", "severity"),
    [
        (
            "rollback.started",
            {"canary": True},
            "checkout rolling back 2.0.0 → 1.0.0 (canary",
            "warning",
        ),
        (
            "rollback.failed",
            {"outcome": "every executor failed"},
            "checkout rollback 2.0.0 → 1.0.0 FAILED",
            "critical",
        ),
        (
            "rollback.failed",
            {"interrupted": True},
            "checkout rollback 2.0.0 → 1.0.0 interrupted",
            "critical",
        ),
        (
            "verify.failed",
            {"reason": "error_rate still firing"},
            "checkout rollback to 1.0.0 did not verify",
            "critical",
        ),
        (
            "rollback.pending",
            {"dry_run": True},
            "checkout: dry-run, would roll back 2.0.0 → 1.0.0",
            "warning",
        ),
        ("rollback.pending", {}, "checkout: rollback 2.0.0 → 1.0.0 waits for approval", "warning"),
        (
            "canary.aborted",
            {"step": "kubectl argo rollouts abort"},
            "checkout canary 2.0.0 aborted, back on 1.0.0",
            "warning",
        ),
        ("rollback.rejected", {"by": "alice"}, "checkout: rollback 2.0.0 → 1.0.0 rejected", "info"),
    ],
)
def test_each_rollback_event_has_its_own_title(
    kind: str, extra: dict[str, object], title: str, severity: str
) -> None:
    message = build_message(pipeline_event(kind, **extra))  # type: ignore[arg-type]
    assert message.title.startswith(title)
    assert message.severity == severity


def test_an_approval_request_says_how_to_decide() -> None:
    text = build_message(pipeline_event("rollback.pending", expires_at=1_700_001_900.0)).text()
    assert "Approve: rollbackd approve 7" in text
    assert "Reject: rollbackd reject 7" in text
    assert "Expires: 2023-11-14T22:45:00Z" in text


def test_a_breach_carries_its_measurement() -> None:
    event = plain_event(
        "check.breach",
        check="latency_p99",
        action="notify",
        version="2.0.0",
        series={"route": "/pay"},
        value=1.7,
        threshold="> 0.5",
        baseline=None,
        reason="p99 1.7s > 0.5s",
        query="histogram_quantile(0.99, x)",
    )
    message = build_message(event, prometheus_url="http://prom:9090")
    assert message.title == "checkout: check latency_p99 breached"
    [cause] = message.causes
    assert (cause.check, cause.value, cause.reason) == ("latency_p99", 1.7, "p99 1.7s > 0.5s")
    assert cause.graph_url is not None
    assert parse_qs(urlsplit(cause.graph_url).query)["g0.expr"] == ["histogram_quantile(0.99, x)"]
    assert "notify only" in message.text()


def test_a_refusal_lists_the_guard_that_stopped_it() -> None:
    event = Event(
        type="rollback.refused",
        at=1_700_000_000.0,
        service="checkout",
        data={
            "reason": "within cooldown 15m",
            "guards": [
                {"guard": "paused", "passed": True, "reason": "automation is on"},
                {"guard": "cooldown", "passed": False, "reason": "last rollback 3m ago"},
            ],
            "trigger": {"source": "alert", "reason": "alert CheckoutDown firing"},
        },
    )
    message = build_message(event)
    assert message.title == "checkout: rollback refused"
    assert "STOPPED cooldown: last rollback 3m ago" in message.text()
    [cause] = message.causes
    assert (cause.source, cause.check, cause.reason) == ("alert", None, "alert CheckoutDown firing")


def test_non_finite_values_and_odd_data_never_break_a_message() -> None:
    event = pipeline_event("rollback.succeeded")
    trigger = dict(event.data["trigger"])  # type: ignore[arg-type]
    trigger.update(value=math.nan, baseline={"value": math.inf, "source": "x"}, series=["odd"])
    odd = Event(
        type="rollback.succeeded",
        at=event.at,
        service="checkout",
        rollback_id=7,
        data={**event.data, "trigger": trigger, "guards": "not a list", "to_version": None},
    )
    message = build_message(odd, prometheus_url="http://prom:9090")
    assert message.title == "checkout rolled back 2.0.0 → ?"
    assert "value NaN" in message.text() and "baseline +Inf" in message.text()
    assert message.guards == ()
    body = json.dumps(message.as_json(), allow_nan=False)  # strict JSON: no NaN literals
    assert '"value": "NaN"' in body


def test_line_breaks_in_free_text_stay_out_of_titles() -> None:
    message = build_message(
        Event(type="version.changed", at=0.0, service="api\r\nBcc: x@evil", data={})
    )
    assert "\n" not in message.title and "\r" not in message.title


@pytest.mark.parametrize("kind", EVENT_TYPES)
def test_every_event_type_builds(kind: str) -> None:
    for event in (plain_event(kind), plain_event(kind, service=None), pipeline_event(kind)):
        message = build_message(event, prometheus_url="http://p", public_url="http://d")
        assert message.title and message.text().startswith(message.title)
        json.dumps(message.as_json(), allow_nan=False)


def test_jsonable() -> None:
    assert jsonable({"a": (1, math.nan, -math.inf), "b": {"c": None}}) == {
        "a": [1, "NaN", "-Inf"],
        "b": {"c": None},
    }
