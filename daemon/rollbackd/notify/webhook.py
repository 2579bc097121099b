"""``webhook``: the event as JSON, optionally signed with HMAC-SHA256.

The body is :meth:`Message.as_json`: the event (``id``, ``type``, ``at``, ``service``,
``rollback_id``, ``data``) and the message fields (``title``, ``severity``, versions,
``causes``, ``guards``, ``graph_url``, ``link``, ``text``). With a signing secret, the
``signature_header`` carries ``sha256=<hex HMAC-SHA256 of the exact body bytes>``; a receiver
recomputes it over the raw body before parsing and compares in constant time.
``X-Rollbackd-Delivery`` is the event id, the same on every retry, so a receiver can drop a
duplicate (a retry after a lost answer delivers twice).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from rollbackd.config.secrets import read_secret
from rollbackd.notify.base import BuildContext, HttpSender, NotifierSpec, Redactor, Sender
from rollbackd.notify.content import Message


class WebhookNotifier(NotifierSpec):
    type: Literal["webhook"]
    url: str | None = Field(default=None, pattern=r"^https?://")
    url_file: str | None = None
    url_env: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    signing_secret_file: str | None = None
    signing_secret_env: str | None = None
    signature_header: str = "X-Rollbackd-Signature"

    secret_keys: ClassVar[tuple[str, ...]] = ()
    key_hints: ClassVar[dict[str, str]] = {
        "signing_secret": "the signing secret is read from 'signing_secret_file' or "
        "'signing_secret_env'",
    }

    @model_validator(mode="after")
    def _one_url(self) -> Self:
        if sum(x is not None for x in (self.url, self.url_file, self.url_env)) != 1:
            raise ValueError("set exactly one of 'url', 'url_file' or 'url_env'")
        return self

    def build(self, context: BuildContext) -> Sender:
        redact = Redactor()
        if self.url is not None:
            url = self.url
            redact.add_url(url, whole=False)
        else:
            url = read_secret(self.url_file, self.url_env, f"notify {self.name}: webhook URL")
            redact.add_url(url, whole=True)
        secret: bytes | None = None
        if self.signing_secret_file or self.signing_secret_env:
            text = read_secret(
                self.signing_secret_file,
                self.signing_secret_env,
                f"notify {self.name}: signing secret",
            )
            redact.add(text)
            secret = text.encode("utf-8")
        redact.add_headers(self.headers)
        return WebhookSender(self, url, secret, redact, context)


class WebhookSender(HttpSender):
    type = "webhook"

    def __init__(
        self,
        spec: WebhookNotifier,
        url: str,
        secret: bytes | None,
        redact: Redactor,
        context: BuildContext,
    ) -> None:
        super().__init__(spec.name, redact, context)
        self._url = url
        self._secret = secret
        self._headers = dict(spec.headers)
        self._signature_header = spec.signature_header

    async def send(self, message: Message) -> None:
        body = json.dumps(message.as_json(), ensure_ascii=False, allow_nan=False).encode("utf-8")
        headers = {
            "X-Rollbackd-Event": message.type,
            "X-Rollbackd-Delivery": delivery_id(message),
            **self._headers,
        }
        if self._secret is not None:
            headers[self._signature_header] = sign(self._secret, body)
        await self.post(self._url, body, headers)


def delivery_id(message: Message) -> str:
    event = message.event
    return str(event.id) if event.id is not None else f"{event.type}@{event.at!r}"


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
