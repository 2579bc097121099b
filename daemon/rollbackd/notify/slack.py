"""``slack``: a Block Kit message to an incoming webhook."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from rollbackd.config.secrets import read_secret
from rollbackd.notify.base import BuildContext, HttpSender, NotifierSpec, Redactor, Sender
from rollbackd.notify.content import Message


class SlackNotifier(NotifierSpec):
    type: Literal["slack"]
    url_file: str | None = None
    url_env: str | None = None
    channel: str | None = None

    secret_keys: ClassVar[tuple[str, ...]] = ("url",)
    key_hints: ClassVar[dict[str, str]] = {
        "url": "the webhook URL is a secret: set 'url_file' or 'url_env'"
    }

    def build(self, context: BuildContext) -> Sender:
        url = read_secret(self.url_file, self.url_env, f"notify {self.name}: Slack webhook URL")
        redact = Redactor()
        redact.add_url(url, whole=True)
        return SlackSender(self, url, redact, context)


# Block Kit limits; past them Slack answers 400 invalid_blocks and nothing is posted.
_HEADER_MAX = 150
_TEXT_MAX = 3000
_FIELD_MAX = 2000
_FIELDS_MAX = 10


class SlackSender(HttpSender):
    type = "slack"

    def __init__(
        self, spec: SlackNotifier, url: str, redact: Redactor, context: BuildContext
    ) -> None:
        super().__init__(spec.name, redact, context)
        self._url = url
        self._channel = spec.channel

    async def send(self, message: Message) -> None:
        payload = slack_payload(message, channel=self._channel)
        await self.post(self._url, json.dumps(payload, ensure_ascii=False).encode("utf-8"))


def slack_payload(message: Message, *, channel: str | None = None) -> dict[str, Any]:
    """The webhook body: ``text`` for notifications and clients without blocks, ``blocks``
    for the message itself."""
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": _cut(message.title, _HEADER_MAX)},
        }
    ]
    fields = [
        ("Service", message.service),
        ("Versions", _versions(message)),
        ("Rollback", f"#{message.rollback_id}" if message.rollback_id is not None else None),
        ("Severity", message.severity),
    ]
    shown = [
        {"type": "mrkdwn", "text": _cut(f"*{label}*\n{escape(value)}", _FIELD_MAX)}
        for label, value in fields
        if value
    ]
    blocks.append({"type": "section", "fields": shown[:_FIELDS_MAX]})
    if message.facts:
        lines = [f"*{label}:* {escape(value)}" for label, value in message.facts]
        blocks.append(_section("\n".join(lines)))
    if message.causes:
        lines = ["*Caused by*"]
        for cause in message.causes:
            line = f"• {escape(cause.line())}"
            if cause.graph_url:
                line += f" <{cause.graph_url}|graph>"
            lines.append(line)
        blocks.append(_section("\n".join(lines)))
    if message.guards:
        lines = ["*Guards*"]
        lines += [
            f"{'✅' if g.passed else '⛔'} *{escape(g.name)}*: {escape(g.reason)}"
            for g in message.guards
        ]
        blocks.append(_section("\n".join(lines)))
    context = f"`{message.type}` at {message.time}"
    if message.link:
        context += f" · <{message.link}|rollbackd>"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]})
    payload: dict[str, Any] = {"text": _cut(message.title, _TEXT_MAX), "blocks": blocks}
    if channel:
        payload["channel"] = channel
    return payload


def escape(text: str) -> str:
    """Slack's mrkdwn escaping: ``&``, ``<`` and ``>`` would otherwise start entities and
    links (a reason such as ``p99 > 0.5`` would vanish)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _versions(message: Message) -> str | None:
    if message.from_version is None and message.to_version is None:
        return None
    return f"{message.from_version or '?'} → {message.to_version or '?'}"


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _cut(text, _TEXT_MAX)}}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
