"""What every ``[[notify]]`` entry shares, and the small interface every notifier implements.

A spec (the config model) builds a :class:`Sender` once, reading its secrets then. A sender
delivers one :class:`~rollbackd.notify.content.Message` per call and says, when it fails,
whether trying again may help; the dispatcher (``dispatcher.py``) alone decides when to
retry, how often, and counts what happened. This is Alertmanager's ``notify/`` split: the
integration knows its peer, one shared stage owns the policy.

Errors::

    DeliveryError         one attempt failed; ``reason`` is a short metric label
                          (timeout, connect, network, http_429, http_5xx, http_4xx, http_3xx,
                          invalid, smtp, tls, error) and ``retry`` says whether the failure
                          is transient
    SecretError           (rollbackd.config.secrets) a secret could not be read at build time

Every text a sender puts into an error passes through its :class:`Redactor`, which knows the
secrets (webhook URLs, routing keys, tokens, passwords) it was built with.

Nothing here may import ``rollbackd.logs`` or ``rollbackd.config.settings``: the
config module imports this package to know the notifier specs.
"""

from __future__ import annotations

import abc
import contextlib
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Self
from urllib.parse import parse_qsl, urlsplit

import httpx
from pydantic import Field, model_validator

from rollbackd.config.strict import Strict
from rollbackd.core.events import EVENT_TYPES
from rollbackd.notify.content import Message

REDACTED = "[redacted]"

_SECRET_NAME = ("token", "key", "secret", "password", "passwd", "signature", "auth", "credential")
_MIN_FRAGMENT = 8
"""Parts of a secret URL shorter than this (a path like ``/hook``) are not redacted on their
own: they would blank out ordinary words in every log line while protecting nothing."""

_BODY_TAIL = 300


class NotifierSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    events: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    services: list[str] = Field(default_factory=lambda: ["*"], min_length=1)

    # Secret keys this notifier needs, each read from `<key>_file` or `<key>_env`.
    secret_keys: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _events_match_something(self) -> Self:
        for pattern in self.events:
            if not fnmatch.filter(EVENT_TYPES, pattern):
                raise ValueError(
                    f"events: {pattern!r} matches no event; events are {', '.join(EVENT_TYPES)}"
                )
        return self

    @model_validator(mode="after")
    def _secrets_from_file_or_env(self) -> Self:
        for key in self.secret_keys:
            given = [
                f"{key}_{where}" for where in ("file", "env") if getattr(self, f"{key}_{where}")
            ]
            if len(given) != 1:
                raise ValueError(f"set exactly one of '{key}_file' or '{key}_env'")
        return self

    def wants(self, event_type: str, service: str) -> bool:
        return any(fnmatch.fnmatchcase(event_type, p) for p in self.events) and any(
            fnmatch.fnmatchcase(service, p) for p in self.services
        )

    def build(self, context: BuildContext) -> Sender:
        """The sender for this spec; reads its secrets now (raises SecretError)."""
        raise NotImplementedError(f"{type(self).__name__} cannot build a sender")


class DeliveryError(Exception):
    """One attempt to deliver failed. ``str()`` is already redacted."""

    def __init__(
        self, reason: str, detail: str, *, retry: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry = retry
        self.retry_after = retry_after
        """Seconds the peer asked us to wait (HTTP ``Retry-After``), if it did."""


class Redactor:
    """Replaces every known secret in a text with ``[redacted]``."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add(self, secret: str | None) -> None:
        if secret:
            self._secrets.add(secret)

    def add_url(self, url: str, *, whole: bool) -> None:
        """A URL's secrets: with ``whole`` (a webhook URL read from a secret) the URL itself,
        as written and as httpx normalises it, and its path and query, which an error may
        show on their own; otherwise only a password and secret-looking query values."""
        if whole:
            self.add(url)
            with contextlib.suppress(httpx.InvalidURL):
                self.add(str(httpx.URL(url)))
        try:
            parts = urlsplit(url)
            pairs = parse_qsl(parts.query, keep_blank_values=True)
            password = parts.password
        except ValueError:
            return
        self.add(password)
        for name, value in pairs:
            if whole or any(word in name.lower() for word in _SECRET_NAME):
                self.add(value)
        if whole:
            for fragment in (parts.path + (f"?{parts.query}" if parts.query else ""), parts.path):
                if len(fragment) >= _MIN_FRAGMENT:
                    self.add(fragment)

    def add_headers(self, headers: Mapping[str, str]) -> None:
        """Values of headers whose names look secret (Authorization, X-Api-Key, ...)."""
        for name, value in headers.items():
            if any(word in name.lower() for word in _SECRET_NAME):
                self.add(value)
                # "Bearer abc" shows up in errors as just "abc" too
                self.add(value.split(" ", 1)[1] if " " in value else None)

    def __call__(self, text: str) -> str:
        # Longest first: a URL is redacted whole before its path is looked for.
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


def default_http_client(timeout: float) -> httpx.AsyncClient:
    # Redirects are not followed: a webhook that moved is a configuration error to see,
    # and following one would send the body (and its signature) somewhere unreviewed.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        headers={"User-Agent": "rollbackd"},
    )


@dataclass(frozen=True)
class BuildContext:
    """What a spec needs from outside itself to build its sender."""

    prometheus_url: str | None = None
    public_url: str | None = None
    timeout: float = 10.0
    """Seconds for one attempt: connecting, sending and reading the answer."""
    http_client: Callable[[float], httpx.AsyncClient] = field(default=default_http_client)


class Sender(abc.ABC):
    """A built notifier: delivers messages to one destination."""

    type: ClassVar[str]

    def __init__(self, name: str, redact: Redactor) -> None:
        self.name = name
        self.redact = redact

    def accepts(self, event_type: str) -> bool:
        """Whether this sender has anything to say about the event at all; the dispatcher
        does not queue what it does not accept."""
        return True

    @abc.abstractmethod
    async def send(self, message: Message) -> None:
        """Deliver ``message`` once; raise :class:`DeliveryError` when that failed."""

    async def aclose(self) -> None:  # noqa: B027 (most senders hold nothing to release)
        """Release connections; the sender is not used afterwards."""

    def error(
        self, reason: str, detail: str, *, retry: bool, retry_after: float | None = None
    ) -> DeliveryError:
        return DeliveryError(reason, self.redact(detail), retry=retry, retry_after=retry_after)


class HttpSender(Sender):
    """A sender that POSTs JSON with httpx, with the HTTP failure taxonomy shared by all."""

    def __init__(self, name: str, redact: Redactor, context: BuildContext) -> None:
        super().__init__(name, redact)
        self._client = context.http_client(context.timeout)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def post(
        self, url: str, content: bytes, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """POST ``content``; a 2xx answer is returned, anything else raised as a
        DeliveryError that says whether another attempt may succeed.

        A POST whose connection broke after it was sent may have arrived; it is retried all
        the same, because a notification seen twice is better than one never seen.
        """
        sent = {"Content-Type": "application/json", **(headers or {})}
        try:
            response = await self._client.post(url, content=content, headers=sent)
        except httpx.TimeoutException as exc:
            raise self.error(
                "timeout", f"no answer in time: {_describe(exc)}", retry=True
            ) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise self.error("invalid", f"cannot send: {_describe(exc)}", retry=False) from None
        except httpx.ConnectError as exc:
            raise self.error("connect", f"cannot connect: {_describe(exc)}", retry=True) from None
        except httpx.TransportError as exc:
            raise self.error("network", f"request failed: {_describe(exc)}", retry=True) from None
        status = response.status_code
        if 200 <= status < 300:
            return response
        body = response.text[:_BODY_TAIL].strip()
        detail = f"HTTP {status}" + (f": {body}" if body else "")
        if status == 429:
            raise self.error(
                "http_429", detail, retry=True, retry_after=_retry_after(response)
            ) from None
        if status >= 500:
            raise self.error(
                "http_5xx", detail, retry=True, retry_after=_retry_after(response)
            ) from None
        # Any other answer will be the same next time: a bad key, a bad payload, a moved URL.
        raise self.error("http_3xx" if status < 400 else "http_4xx", detail, retry=False)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        seconds = float(value)
    except ValueError:
        return None  # the HTTP-date form is rare from these APIs; the backoff applies
    return seconds if seconds >= 0 else None


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
