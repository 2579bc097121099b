"""The dispatcher against real local servers: routing, retries only for transient failures,
timeouts, a bounded queue that drops and counts, one hung notifier delaying no other, and
no secret in any log line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from prometheus_client import CollectorRegistry

from rollbackd.core.model import Event
from rollbackd.notify.base import BuildContext, NotifierSpec, Redactor, Sender
from rollbackd.notify.content import Message
from rollbackd.notify.dispatcher import Dispatcher, RetryPolicy
from rollbackd.notify.email import EmailNotifier
from rollbackd.notify.slack import SlackNotifier
from rollbackd.notify.webhook import WebhookNotifier
from rollbackd.runtime.bus import EventBus
from rollbackd.store.sqlite import Store
from support.hostile_http import closed_port
from support.notify_peers import (
    CLOSE,
    FAST,
    ROUTING_KEY,
    SIGNING,
    SLACK_PATH,
    SPECS,
    TOKEN,
    Answer,
    HeaderServer,
    HungServer,
    Recorded,
    RecordingServer,
    Reply,
    SmtpSink,
    Stall,
    always,
    eventually,
    grafana_spec,
    in_turn,
    json_body,
    json_logs,
    pagerduty_spec,
    pipeline_event,
    sample,
    secret_file,
    slack_spec,
    webhook_spec,
)

OK = Reply(200, b"ok", "text/plain")
SLOW = RetryPolicy(attempts=1, attempt_timeout=60.0)
"""For peers that must stay stuck for the whole test."""


class Setup:
    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.bus = EventBus(store)
        self.dispatchers: list[Dispatcher] = []

    def dispatcher(
        self, specs: list[NotifierSpec], *, start: bool = True, **kwargs: Any
    ) -> Dispatcher:
        kwargs.setdefault("retry", FAST)
        dispatcher = Dispatcher(
            specs,
            prometheus_url="http://prom:9090",
            metrics_registry=self.registry,
            **kwargs,
        )
        dispatcher.subscribe(self.bus)
        if start:
            dispatcher.start()
        self.dispatchers.append(dispatcher)
        return dispatcher

    async def publish(self, kind: str, service: str = "checkout", **data: Any) -> Event:
        return await self.bus.publish(kind, 1_700_000_000.0, service, rollback_id=1, data=data)

    def value(self, name: str, **labels: str) -> float:
        return sample(self.registry, name, **labels)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    store = Store(tmp_path / "state.db")
    made = Setup(store)
    yield made
    for dispatcher in made.dispatchers:
        await dispatcher.stop(timeout=0.1)
    store.close()


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    with RecordingServer(always(OK)) as peer:
        yield peer


def types(server: RecordingServer) -> list[str]:
    return [json_body(r)["type"] for r in server.requests]


# -- routing --------------------------------------------------------------------------


async def test_events_go_where_the_globs_and_service_filters_say(
    tmp_path: Path, setup: Setup
) -> None:
    with (
        RecordingServer(always(OK)) as everything,
        RecordingServer(always(OK)) as rollbacks,
        RecordingServer(always(OK)) as checkout_pages,
        RecordingServer(always(OK)) as payments,
    ):
        dispatcher = setup.dispatcher(
            [
                webhook_spec(tmp_path, everything.url).model_copy(update={"name": "all"}),
                webhook_spec(tmp_path, rollbacks.url, events=["rollback.*"]).model_copy(
                    update={"name": "rollbacks"}
                ),
                webhook_spec(
                    tmp_path,
                    checkout_pages.url,
                    events=["verify.failed", "service.frozen"],
                    services=["checkout"],
                ).model_copy(update={"name": "checkout-pages"}),
                webhook_spec(tmp_path, payments.url, services=["pay*"]).model_copy(
                    update={"name": "payments"}
                ),
            ]
        )
        await setup.publish("rollback.started")
        await setup.publish("verify.failed", reason="still failing")
        await setup.publish("service.frozen", service="payments-api", reason="max rollbacks")
        await setup.publish("rollback.succeeded", service="payments-api")
        await setup.publish("check.breach", check="error_rate")
        await dispatcher.wait_idle()
    assert types(everything) == [
        "rollback.started",
        "verify.failed",
        "service.frozen",
        "rollback.succeeded",
        "check.breach",
    ]
    assert types(rollbacks) == ["rollback.started", "rollback.succeeded"]
    assert types(checkout_pages) == ["verify.failed"]
    assert types(payments) == ["service.frozen", "rollback.succeeded"]
    assert [json_body(r)["service"] for r in payments.requests] == ["payments-api"] * 2


async def test_pagerduty_only_queues_what_it_pages_or_resolves(
    tmp_path: Path, setup: Setup, server: RecordingServer
) -> None:
    dispatcher = setup.dispatcher([pagerduty_spec(tmp_path, server.url, events=["*"])])
    for kind in ("rollback.started", "rollback.failed", "check.breach", "rollback.succeeded"):
        await setup.publish(kind)
    await dispatcher.wait_idle()
    actions = [json_body(r)["event_action"] for r in server.requests]
    assert actions == ["trigger", "resolve"]


# -- retries, for transient failures only -----------------------------------------------


@pytest.mark.parametrize("kind", SPECS)
async def test_5xx_and_429_are_retried_until_delivered(
    tmp_path: Path, setup: Setup, kind: str
) -> None:
    answers = in_turn(Reply(502, b"bad gateway"), Reply(429, b"slow down"), Reply(503), OK)
    with RecordingServer(answers) as server:
        dispatcher = setup.dispatcher([SPECS[kind](tmp_path, server.url)])
        await setup.publish("rollback.failed", outcome="every executor failed")
        await dispatcher.wait_idle()
    assert server.count == 4
    assert len({r.body for r in server.requests}) == 1  # the same notification each time
    name = dispatcher.notifiers[0]
    assert setup.value("rollbackd_notifications_total", notifier=name, outcome="sent") == 1
    assert setup.value("rollbackd_notifications_total", notifier=name, outcome="failed") == 0
    retries = "rollbackd_notification_retries_total"
    assert setup.value(retries, notifier=name, reason="http_5xx") == 2
    assert setup.value(retries, notifier=name, reason="http_429") == 1


@pytest.mark.parametrize("kind", SPECS)
@pytest.mark.parametrize("status", [400, 401, 403, 404, 410])
async def test_4xx_is_never_retried(tmp_path: Path, setup: Setup, kind: str, status: int) -> None:
    with RecordingServer(always(Reply(status, b"no"))) as server:
        dispatcher = setup.dispatcher([SPECS[kind](tmp_path, server.url)])
        await setup.publish("rollback.failed")
        await dispatcher.wait_idle()
    assert server.count == 1
    name = dispatcher.notifiers[0]
    assert setup.value("rollbackd_notifications_total", notifier=name, outcome="failed") == 1
    failures = "rollbackd_notification_failures_total"
    assert setup.value(failures, notifier=name, reason="http_4xx") == 1


async def test_a_peer_that_keeps_failing_is_given_up_after_the_attempts(
    tmp_path: Path, setup: Setup
) -> None:
    with RecordingServer(always(Reply(500, b"down"))) as server:
        dispatcher = setup.dispatcher([webhook_spec(tmp_path, server.url)])
        await setup.publish("rollback.failed")
        await dispatcher.wait_idle()
    assert server.count == FAST.attempts
    failures = "rollbackd_notification_failures_total"
    assert setup.value(failures, notifier="hook", reason="http_5xx") == 1


async def test_timeouts_are_retried_then_counted_as_failures(tmp_path: Path, setup: Setup) -> None:
    stall = Stall(CLOSE)
    policy = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05, attempt_timeout=0.3)
    with RecordingServer(stall) as server:
        try:
            dispatcher = setup.dispatcher([webhook_spec(tmp_path, server.url)], retry=policy)
            await setup.publish("rollback.failed")
            await dispatcher.wait_idle()
        finally:
            stall.release()
    assert server.count == 3  # each attempt reached the peer, none got an answer in time
    failures = "rollbackd_notification_failures_total"
    assert setup.value(failures, notifier="hook", reason="timeout") == 1
    assert (
        setup.value("rollbackd_notification_retries_total", notifier="hook", reason="timeout") == 2
    )


async def test_connection_refused_is_retried(tmp_path: Path, setup: Setup) -> None:
    with closed_port() as url:
        dispatcher = setup.dispatcher([webhook_spec(tmp_path, url)])
        await setup.publish("rollback.failed")
        await dispatcher.wait_idle()
    retries = setup.value("rollbackd_notification_retries_total", notifier="hook", reason="connect")
    assert retries == FAST.attempts - 1
    failures = "rollbackd_notification_failures_total"
    assert setup.value(failures, notifier="hook", reason="connect") == 1


async def test_the_wait_honours_retry_after(tmp_path: Path, setup: Setup, capsys: Any) -> None:
    policy = RetryPolicy(attempts=2, backoff=0.01, max_backoff=5.0, attempt_timeout=5.0)
    with json_logs(), HeaderServer([Answer(429, {"Retry-After": "0.4"}), Answer(200)]) as server:
        dispatcher = setup.dispatcher([webhook_spec(tmp_path, server.url)], retry=policy)
        await setup.publish("rollback.failed")
        await dispatcher.wait_idle()
    assert len(server.requests) == 2
    [retry] = [line for line in log_lines(capsys) if line["event"].endswith("retrying")]
    assert retry["retry_in"] >= 0.4
    assert setup.value("rollbackd_notifications_total", notifier="hook", outcome="sent") == 1


# -- a bounded queue; one hung notifier delays no one ----------------------------------


async def test_a_full_queue_drops_the_oldest_and_counts_it(
    tmp_path: Path, setup: Setup, server: RecordingServer
) -> None:
    dispatcher = setup.dispatcher([webhook_spec(tmp_path, server.url)], queue_size=1, start=False)
    for kind in ("rollback.started", "rollback.failed", "service.frozen"):
        await setup.publish(kind)
    assert setup.value("rollbackd_notifications_dropped_total", notifier="hook") == 2
    assert setup.value("rollbackd_notification_queue_length", notifier="hook") == 1
    dispatcher.start()
    await dispatcher.wait_idle()
    assert types(server) == ["service.frozen"]  # the newest news is kept


async def test_behind_a_stuck_delivery_the_queue_fills_and_drops(
    tmp_path: Path, setup: Setup
) -> None:
    stall = Stall()
    with RecordingServer(stall) as server:
        try:
            dispatcher = setup.dispatcher(
                [webhook_spec(tmp_path, server.url)], queue_size=1, retry=SLOW
            )
            await setup.publish("rollback.started")
            await eventually(lambda: server.count == 1, what="the first request stuck")
            await setup.publish("rollback.succeeded")
            await setup.publish("check.recovered")
            assert setup.value("rollbackd_notifications_dropped_total", notifier="hook") == 1
            assert dispatcher.backlog("hook") == 2
        finally:
            stall.release()
        await dispatcher.wait_idle()
    assert types(server) == ["rollback.started", "check.recovered"]


async def test_a_hung_notifier_delays_no_other(tmp_path: Path, setup: Setup) -> None:
    with HungServer() as hung, RecordingServer(always(OK)) as healthy:
        dispatcher = setup.dispatcher(
            [
                webhook_spec(tmp_path, hung.url).model_copy(update={"name": "hung"}),
                slack_spec(tmp_path, healthy.url + SLACK_PATH),
            ],
            retry=SLOW,
        )
        kinds = ["rollback.started", "rollback.failed", "service.frozen", "verify.failed"]
        for kind in kinds:
            await setup.publish(kind)  # returns at once: publishing never waits on a peer
        sent = "rollbackd_notifications_total"
        await eventually(
            lambda: setup.value(sent, notifier="ops", outcome="sent") == len(kinds),
            what="all delivered to the healthy peer",
        )
        assert healthy.count == len(kinds)
        assert dispatcher.backlog("ops") == 0
        assert dispatcher.backlog("hung") == len(kinds)
        assert setup.value(sent, notifier="hung", outcome="sent") == 0


# -- lifecycle ---------------------------------------------------------------------------


async def test_events_published_before_start_go_out_after(
    tmp_path: Path, setup: Setup, server: RecordingServer
) -> None:
    dispatcher = setup.dispatcher([webhook_spec(tmp_path, server.url)], start=False)
    await setup.publish("rollback.started")
    assert server.count == 0
    dispatcher.start()
    await dispatcher.wait_idle()
    assert types(server) == ["rollback.started"]


async def test_events_from_another_thread_are_delivered(
    tmp_path: Path, setup: Setup, server: RecordingServer
) -> None:
    dispatcher = setup.dispatcher([webhook_spec(tmp_path, server.url)])
    await asyncio.to_thread(dispatcher.on_event, pipeline_event("rollback.succeeded"))
    await eventually(lambda: server.count == 1)
    assert types(server) == ["rollback.succeeded"]


async def test_stop_lets_queued_notifications_out_first(
    tmp_path: Path, setup: Setup, server: RecordingServer
) -> None:
    dispatcher = setup.dispatcher([webhook_spec(tmp_path, server.url)])
    for kind in ("rollback.started", "rollback.succeeded"):
        await setup.publish(kind)
    await dispatcher.stop(timeout=30)
    assert types(server) == ["rollback.started", "rollback.succeeded"]
    await setup.publish("check.breach")  # after stop: ignored, never queued for a dead worker
    assert server.count == 2


async def test_stop_gives_up_on_a_hung_peer(tmp_path: Path, setup: Setup) -> None:
    with HungServer() as hung:
        dispatcher = setup.dispatcher([webhook_spec(tmp_path, hung.url)], retry=SLOW)
        await setup.publish("rollback.failed")
        await dispatcher.stop(timeout=0.2)
    # Abandoned: neither delivered nor given up on by the retry policy, just left behind.
    for outcome in ("sent", "failed"):
        assert setup.value("rollbackd_notifications_total", notifier="hook", outcome=outcome) == 0


async def test_a_notifier_whose_secret_is_missing_is_disabled_not_fatal(
    tmp_path: Path, setup: Setup, server: RecordingServer
) -> None:
    missing = SlackNotifier.model_validate(
        {"name": "ops", "type": "slack", "url_file": str(tmp_path / "nope")}
    )
    dispatcher = setup.dispatcher([missing, webhook_spec(tmp_path, server.url)])
    assert dispatcher.notifiers == ["hook"]
    [problem] = dispatcher.problems
    assert problem.startswith("notify ops: disabled: notify ops: Slack webhook URL: cannot read")
    assert setup.value("rollbackd_notifier_ready", notifier="ops") == 0
    assert setup.value("rollbackd_notifier_ready", notifier="hook") == 1
    await setup.publish("rollback.started")
    await dispatcher.wait_idle()
    assert server.count == 1


async def test_reload_routes_new_events_to_the_new_notifiers(tmp_path: Path, setup: Setup) -> None:
    with RecordingServer(always(OK)) as old, RecordingServer(always(OK)) as new:
        dispatcher = setup.dispatcher([webhook_spec(tmp_path, old.url)])
        await setup.publish("rollback.started")
        dispatcher.reload(
            [webhook_spec(tmp_path, new.url).model_copy(update={"name": "new"})],
            prometheus_url="http://prom:9090",
            public_url=None,
        )
        await setup.publish("rollback.succeeded")
        await dispatcher.wait_idle()
        await eventually(lambda: old.count == 1, what="the old notifier's queue delivered")
    assert types(old) == ["rollback.started"]
    assert types(new) == ["rollback.succeeded"]
    assert dispatcher.notifiers == ["new"]


class _Broken(NotifierSpec):
    type: Literal["broken"]
    calls: ClassVar[list[str]] = []

    def build(self, context: BuildContext) -> Sender:
        return _BrokenSender(self.name, Redactor())


class _BrokenSender(Sender):
    type = "broken"

    async def send(self, message: Message) -> None:
        _Broken.calls.append(message.type)
        if message.type == "rollback.started":
            raise RuntimeError("a bug in a notifier")


async def test_a_notifier_bug_is_a_failure_not_a_dead_worker(setup: Setup) -> None:
    _Broken.calls.clear()
    dispatcher = setup.dispatcher([_Broken(name="bug", type="broken")])
    await setup.publish("rollback.started")
    await setup.publish("rollback.succeeded")
    await dispatcher.wait_idle()
    assert _Broken.calls == ["rollback.started", "rollback.succeeded"]  # tried once, not retried
    failures = "rollbackd_notification_failures_total"
    assert setup.value(failures, notifier="bug", reason="error") == 1
    assert setup.value("rollbackd_notifications_total", notifier="bug", outcome="sent") == 1


# -- secrets never logged ----------------------------------------------------------------

PASSWORD = "smtp-Pa55word-0123"
HOOK_URL_SECRET = "/hooks/T0KEN-in-the-path-0042"


def log_lines(capsys: Any) -> list[dict[str, Any]]:
    err = capsys.readouterr().err
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def echo(status: int) -> Callable[[Recorded, int], Reply]:
    """A peer that answers an error quoting everything it was sent, secrets included."""

    def answer(request: Recorded, number: int) -> Reply:
        quoted = f"{request.path} {request.headers.get('authorization', '')} {request.body!r}"
        return Reply(status, quoted.encode(), "text/plain")

    return answer


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_no_secret_reaches_a_log_line_or_an_error(
    tmp_path: Path, setup: Setup, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = [SLACK_PATH, ROUTING_KEY, TOKEN, SIGNING, PASSWORD, HOOK_URL_SECRET]
    with (
        json_logs(),
        RecordingServer(echo(500)) as slack,
        RecordingServer(echo(400)) as pagerduty,
        RecordingServer(echo(401)) as grafana,
        RecordingServer(echo(503)) as hook,
        SmtpSink(login=("rollbackd", "another-password")) as smtp,
    ):
        monkeypatch.setenv("ROLLBACKD_TEST_HOOK_URL", hook.url + HOOK_URL_SECRET)
        password = secret_file(tmp_path, "smtp", PASSWORD)
        dispatcher = setup.dispatcher(
            [
                slack_spec(tmp_path, slack.url + SLACK_PATH),
                pagerduty_spec(tmp_path, pagerduty.url),
                grafana_spec(tmp_path, grafana.url),
                WebhookNotifier.model_validate(
                    {
                        "name": "hook",
                        "type": "webhook",
                        "url_env": "ROLLBACKD_TEST_HOOK_URL",
                        "signing_secret_file": secret_file(tmp_path, "signing", SIGNING),
                    }
                ),
                EmailNotifier.model_validate(
                    {
                        "name": "mail",
                        "type": "email",
                        "smtp_host": "127.0.0.1",
                        "smtp_port": smtp.port,
                        "starttls": False,
                        "username": "rollbackd",
                        "password_file": password,
                        "from": "rollbackd@example.com",
                        "to": ["oncall@example.com"],
                    }
                ),
            ]
        )
        await setup.publish("rollback.failed", outcome="every executor failed")
        await dispatcher.wait_idle()
        assert pagerduty.count == 1 and slack.count == FAST.attempts
    lines = log_lines(capsys)
    failed = {line["notifier"]: line for line in lines if line["event"] == "notification failed"}
    assert {name: line["reason"] for name, line in failed.items()} == {
        "ops": "http_5xx",
        "pager": "http_4xx",
        "dash": "http_4xx",
        "hook": "http_5xx",
        "mail": "smtp",
    }
    # The peers quoted the secrets back; the errors show where they were cut out.
    for name in ("ops", "pager", "dash", "hook"):
        assert "[redacted]" in failed[name]["error"], failed[name]
    text = "\n".join(json.dumps(line) for line in lines)
    for secret in secrets:
        assert secret not in text


def test_redactor_catches_a_url_however_it_is_written() -> None:
    redact = Redactor()
    redact.add_url("https://hooks.example.com/services/T0/B0/SECRET?token=abc123", whole=True)
    for shown in (
        "POST https://hooks.example.com/services/T0/B0/SECRET?token=abc123 failed",
        "path /services/T0/B0/SECRET?token=abc123 not found",
        "token abc123",
    ):
        assert "SECRET" not in redact(shown) and "abc123" not in redact(shown)
    partly = Redactor()
    partly.add_url("https://user:pw-0987@grafana.example/api?api_key=k-4567&page=2", whole=False)
    assert partly("https://user:pw-0987@grafana.example/api?api_key=k-4567&page=2") == (
        "https://user:[redacted]@grafana.example/api?api_key=[redacted]&page=2"
    )
