"""Email over SMTP against a real local SMTP server (aiosmtpd) that records what it gets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from rollbackd.notify.base import BuildContext, DeliveryError, Sender
from rollbackd.notify.content import build_message
from rollbackd.notify.dispatcher import Dispatcher
from rollbackd.notify.email import EmailNotifier
from support.hostile_http import closed_port
from support.notify_peers import FAST, SmtpSink, eventually, pipeline_event, sample, secret_file

PASSWORD = "smtp-Pa55word-0123"

# aiosmtpd warns that AUTH without TLS is unsafe; these tests use it on 127.0.0.1 on purpose.
plain_auth = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


def spec(port: int, **extra: Any) -> EmailNotifier:
    return EmailNotifier.model_validate(
        {
            "name": "mail",
            "type": "email",
            "smtp_host": "127.0.0.1",
            "smtp_port": port,
            "starttls": False,
            "from": "rollbackd@example.com",
            "to": ["oncall@example.com", "releases@example.com"],
            **extra,
        }
    )


@pytest.fixture
async def build() -> AsyncIterator[Callable[[EmailNotifier], Sender]]:
    built: list[Sender] = []

    def make(notifier: EmailNotifier) -> Sender:
        sender = notifier.build(BuildContext(prometheus_url="http://prom:9090", timeout=5.0))
        built.append(sender)
        return sender

    yield make
    for sender in built:
        await sender.aclose()


async def test_the_message_arrives_with_the_title_as_subject(
    build: Callable[[EmailNotifier], Sender],
) -> None:
    message = build_message(
        pipeline_event("rollback.failed", outcome="every executor failed"),
        prometheus_url="http://prom:9090",
    )
    with SmtpSink() as sink:
        await build(spec(sink.port)).send(message)
    [mail] = sink.messages
    assert mail["Subject"] == "checkout rollback 2.0.0 → 1.0.0 FAILED"
    assert mail["From"] == "rollbackd@example.com"
    assert mail["To"] == "oncall@example.com, releases@example.com"
    assert mail["X-Rollbackd-Event"] == "rollback.failed"
    assert mail["X-Rollbackd-Service"] == "checkout"
    assert mail.get_content_type() == "text/plain"
    body = mail.get_content().replace("\r\n", "\n")
    assert body.strip() == message.text().strip()
    assert "Outcome: every executor failed" in body
    assert "value 0.125; threshold > 0.05" in body
    assert "graph: http://prom:9090/graph?g0.expr=" in body
    assert sink.envelopes == [
        ("rollbackd@example.com", ["oncall@example.com", "releases@example.com"])
    ]


@plain_auth
async def test_it_logs_in_when_a_username_is_set(
    tmp_path: Path, build: Callable[[EmailNotifier], Sender]
) -> None:
    password = secret_file(tmp_path, "smtp", PASSWORD)
    message = build_message(pipeline_event())
    with SmtpSink(login=("rollbackd", PASSWORD)) as sink:
        await build(spec(sink.port, username="rollbackd", password_file=password)).send(message)
    assert sink.logins == [("rollbackd", True)]
    assert len(sink.messages) == 1


@plain_auth
async def test_a_wrong_password_is_final_and_never_shown(
    tmp_path: Path, build: Callable[[EmailNotifier], Sender]
) -> None:
    password = secret_file(tmp_path, "smtp", PASSWORD)
    with SmtpSink(login=("rollbackd", "the-right-one")) as sink:
        sender = build(spec(sink.port, username="rollbackd", password_file=password))
        with pytest.raises(DeliveryError) as caught:
            await sender.send(build_message(pipeline_event()))
    assert (caught.value.reason, caught.value.retry) == ("smtp", False)
    assert str(caught.value).startswith("SMTP 535")
    assert PASSWORD not in str(caught.value)
    assert sink.messages == []


@pytest.mark.parametrize(
    ("reply", "retry"),
    [("451 4.3.0 mailbox busy, try later", True), ("554 5.7.1 rejected as spam", False)],
)
async def test_smtp_4xx_is_transient_and_5xx_final(
    build: Callable[[EmailNotifier], Sender], reply: str, retry: bool
) -> None:
    with SmtpSink(replies=(reply,)) as sink, pytest.raises(DeliveryError) as caught:
        await build(spec(sink.port)).send(build_message(pipeline_event()))
    assert (caught.value.reason, caught.value.retry) == ("smtp", retry)
    assert reply.split(" ", 1)[1] in str(caught.value)


async def test_a_refused_connection_is_retried(build: Callable[[EmailNotifier], Sender]) -> None:
    with closed_port() as url:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(DeliveryError) as caught:
            await build(spec(port)).send(build_message(pipeline_event()))
    assert (caught.value.reason, caught.value.retry) == ("connect", True)


async def test_starttls_refused_by_the_server_is_a_configuration_error(
    build: Callable[[EmailNotifier], Sender],
) -> None:
    # aiosmtpd without a TLS context offers no STARTTLS.
    with SmtpSink() as sink, pytest.raises(DeliveryError) as caught:
        await build(spec(sink.port, starttls=True)).send(build_message(pipeline_event()))
    assert (caught.value.reason, caught.value.retry) == ("smtp", False)
    assert "STARTTLS" in str(caught.value)


async def test_through_the_dispatcher_a_busy_mailbox_is_retried_until_accepted() -> None:
    registry = CollectorRegistry()
    with SmtpSink(replies=("451 4.3.0 try later", "451 4.3.0 try later", "250 OK")) as sink:
        dispatcher = Dispatcher([spec(sink.port)], metrics_registry=registry, retry=FAST)
        dispatcher.start()
        try:
            dispatcher.on_event(pipeline_event("service.frozen", reason="rollback 7 failed"))
            await eventually(lambda: len(sink.messages) == 1, what="the mail accepted")
            await dispatcher.wait_idle()
        finally:
            await dispatcher.stop()
    assert sink.attempts == 3
    assert sink.messages[0]["Subject"].startswith("checkout frozen")
    assert sample(registry, "rollbackd_notifications_total", notifier="mail", outcome="sent") == 1
    assert (
        sample(registry, "rollbackd_notification_retries_total", notifier="mail", reason="smtp")
        == 2
    )
