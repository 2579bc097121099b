"""``http``: call a deployment or CI API."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx
from pydantic import Field, field_validator
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
)

from rollbackd.config.secrets import SecretError, read_secret
from rollbackd.executors.base import (
    Executor,
    ExecutorSpec,
    RollbackContext,
    StepResult,
    UnsafeValueError,
)
from rollbackd.executors.placeholders import substitute, substitute_json
from rollbackd.executors.process import DEFAULT_TAIL_BYTES, format_seconds

SAFE_TO_RETRY = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class HttpExecutor(ExecutorSpec):
    type: Literal["http"]
    url: str = Field(min_length=1)
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = Field(
        default=None,
        description="placeholders are JSON-escaped in a JSON body, percent-encoded in a form "
        "(application/x-www-form-urlencoded) body, verbatim otherwise",
    )
    expect_status: list[int] = Field(
        default_factory=list, description="statuses that mean success; default any 2xx"
    )
    retries: int = Field(
        default=0,
        ge=0,
        le=10,
        description="retries on connection errors and 5xx; only for idempotent methods "
        "unless `idempotent = true`",
    )
    idempotent: bool = False
    bearer_token_file: str | None = None
    bearer_token_env: str | None = None

    key_hints: ClassVar[dict[str, str]] = {
        "token": "secrets are read from 'bearer_token_file' or 'bearer_token_env', never "
        "written in a rule file",
        "bearer_token": "secrets are read from 'bearer_token_file' or 'bearer_token_env', "
        "never written in a rule file",
    }

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/{}]+", value):
            raise ValueError(f"must be an http:// or https:// URL with a host, got: {value!r}")
        return value

    def templates(self) -> list[str]:
        return [self.url, *self.headers.values(), *([self.body] if self.body else [])]

    def may_retry(self) -> bool:
        return self.retries > 0 and (self.idempotent or self.method in SAFE_TO_RETRY)

    def runner(self) -> HttpRun:
        return HttpRun(self)


_BACKOFF = 0.5
"""Seconds before the first retry; each further retry waits twice as long."""

_MAX_BACKOFF = 30.0
_SECRET_QUERY = re.compile(r"(?i)token|key|secret|password|passwd|signature|sig|auth|credential")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REDACTED = "[redacted]"


class _RetryableStatus(Exception):
    """An answer worth asking again for (5xx, 429), raised only so tenacity retries it."""

    def __init__(self, answer: _Answer) -> None:
        super().__init__(f"HTTP {answer.status}")
        self.answer = answer


@dataclass(frozen=True)
class _Answer:
    status: int
    body_tail: str


def redact_url(url: str) -> str:
    """``url`` fit for the audit record: no password, no value of a secret-looking query key."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:{_REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY.search(name) for name, _ in pairs):
            query = urlencode(
                [(name, _REDACTED if _SECRET_QUERY.search(name) else v) for name, v in pairs],
                safe="[]",
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _content_type(headers: Mapping[str, str]) -> str:
    return next((value for name, value in headers.items() if name.lower() == "content-type"), "")


def _looks_like_json(body: str, headers: Mapping[str, str]) -> bool:
    return "json" in _content_type(headers).lower() or body.lstrip().startswith(("{", "["))


def _is_form(headers: Mapping[str, str]) -> bool:
    """A form body (``a=1&b=2``): its values are percent-encoded like the URL's, so an
    ``&version=...`` in a reason cannot add or override a field."""
    media_type = _content_type(headers).split(";", 1)[0].strip().lower()
    return media_type == "application/x-www-form-urlencoded"


class HttpRun(Executor[HttpExecutor]):
    """Makes the spec's request once, or with retries when :meth:`HttpExecutor.may_retry`.

    Only idempotent requests are retried: a POST whose connection broke after it was sent
    may already have started a deployment, and starting it twice is worse than failing.
    The whole run, retries and their waits included, ends at the spec's timeout.
    """

    def __init__(self, spec: HttpExecutor, *, backoff: float = _BACKOFF) -> None:
        super().__init__(spec)
        self.backoff = backoff

    def describe(self) -> str:
        return f"http {self.spec.method} {redact_url(self.spec.url)}"

    async def run(self, context: RollbackContext) -> StepResult:
        started = time.monotonic()
        spec = self.spec
        try:
            context.check()
        except UnsafeValueError as exc:
            return StepResult(ok=False, summary=f"refused: {exc}; nothing was sent")
        request = _build_request(spec, context.placeholders())
        exchange = _Exchange(spec, request, started, self.backoff)
        if spec.bearer_token_file or spec.bearer_token_env:
            try:
                token = read_secret(spec.bearer_token_file, spec.bearer_token_env, "bearer token")
            except SecretError as exc:
                return exchange.failed(f"{exc}; nothing was sent")
            exchange.authorize(token)
        return await exchange.send()


@dataclass(frozen=True)
class _Request:
    url: str
    headers: list[tuple[bytes, bytes]]
    content: bytes | None


def _build_request(spec: HttpExecutor, values: Mapping[str, str]) -> _Request:
    # Each value is quoted whole: a reason holding "/", "?", "&" or "#" cannot change
    # which path or parameter the URL (or a form body) names.
    quoted = {key: quote(value, safe="") for key, value in values.items()}
    url = substitute(spec.url, quoted)
    # A line break in a header value would end the header (and h11 refuses it anyway);
    # a reason is free text, so its control characters become spaces.
    header_values = {key: _CONTROL.sub(" ", value) for key, value in values.items()}
    headers: list[tuple[bytes, bytes]] = [
        (name.encode("utf-8"), substitute(value, header_values).encode("utf-8"))
        for name, value in spec.headers.items()
    ]
    content: bytes | None = None
    if spec.body is not None:
        if _is_form(spec.headers):
            content = substitute(spec.body, quoted).encode("utf-8")
        elif _looks_like_json(spec.body, spec.headers):
            content = substitute_json(spec.body, values).encode("utf-8")
            if not _has_header(headers, b"content-type"):
                headers.append((b"Content-Type", b"application/json"))
        else:
            content = substitute(spec.body, values).encode("utf-8")
    return _Request(url, headers, content)


class _Exchange:
    """One run's request, its attempts, and the step result they come to."""

    def __init__(
        self, spec: HttpExecutor, request: _Request, started: float, backoff: float
    ) -> None:
        self.spec = spec
        self.request = request
        self.started = started
        self.backoff = backoff
        self.headers = list(request.headers)
        self.token: str | None = None
        self.attempts = 0
        self.timeout = spec.timeout.total_seconds()
        self.command = (spec.method, redact_url(request.url))

    def authorize(self, token: str) -> None:
        self.token = token
        self.headers = [(k, v) for k, v in self.headers if k.lower() != b"authorization"]
        self.headers.append((b"Authorization", f"Bearer {token}".encode()))

    def scrub(self, text: str) -> str:
        # A server may echo the request back, Authorization header included.
        return text.replace(self.token, _REDACTED) if self.token else text

    def failed(self, summary: str, *, timed_out: bool = False, body: str = "") -> StepResult:
        return StepResult(
            ok=False,
            summary=summary,
            stdout_tail=body,
            duration=time.monotonic() - self.started,
            timed_out=timed_out,
            command=self.command,
        )

    def after(self, summary: str) -> str:
        return f"{summary} after {self.attempts} attempts" if self.attempts > 1 else summary

    async def attempt(self, client: httpx.AsyncClient) -> _Answer:
        self.attempts += 1
        remaining = max(self.timeout - (time.monotonic() - self.started), 0.001)
        async with client.stream(
            self.spec.method,
            self.request.url,
            headers=self.headers,
            content=self.request.content,
            timeout=remaining,
        ) as response:
            tail = bytearray()
            async for chunk in response.aiter_bytes():
                tail += chunk
                if len(tail) > DEFAULT_TAIL_BYTES:
                    del tail[: len(tail) - DEFAULT_TAIL_BYTES]
            answer = _Answer(
                response.status_code, self.scrub(bytes(tail).decode("utf-8", errors="replace"))
            )
        if _worth_retrying(answer.status) and answer.status not in self.spec.expect_status:
            raise _RetryableStatus(answer)
        return answer

    async def send(self) -> StepResult:
        spec = self.spec
        retrying = AsyncRetrying(
            # Stop early rather than start a wait the timeout would cut short: the last real
            # answer or error says more than "timed out".
            stop=stop_after_attempt(1 + spec.retries if spec.may_retry() else 1)
            | stop_before_delay(self.timeout),
            wait=wait_exponential(multiplier=self.backoff, max=_MAX_BACKOFF),
            retry=retry_if_exception_type((httpx.TransportError, _RetryableStatus)),
            reraise=True,
        )
        answer: _Answer
        try:
            async with (
                asyncio.timeout(self.timeout),
                httpx.AsyncClient(follow_redirects=False) as client,
            ):
                answer = await retrying(self.attempt, client)
        except _RetryableStatus as exc:
            answer = exc.answer
        except (TimeoutError, httpx.TimeoutException):
            tries = f" ({self.attempts} attempts)" if self.attempts > 1 else ""
            budget = f"timed out after {format_seconds(self.timeout)}"
            return self.failed(budget + tries, timed_out=True)
        except httpx.TransportError as exc:
            return self.failed(self.after(f"request failed: {self.scrub(_describe_error(exc))}"))
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            # Bad URL after substitution, unsupported scheme and the like: nothing was sent.
            return self.failed(f"cannot send request: {self.scrub(_describe_error(exc))}")
        return self.result(answer)

    def result(self, answer: _Answer) -> StepResult:
        spec = self.spec
        ok = (
            answer.status in spec.expect_status
            if spec.expect_status
            else 200 <= answer.status < 300
        )
        summary = f"HTTP {answer.status}"
        if not ok and spec.expect_status:
            summary += f"; expected {', '.join(str(s) for s in spec.expect_status)}"
        return StepResult(
            ok=ok,
            summary=self.after(summary),
            stdout_tail=answer.body_tail,
            duration=time.monotonic() - self.started,
            command=self.command,
        )


def _worth_retrying(status: int) -> bool:
    # 5xx and 429 may pass; any other answer will be the same next time.
    return status >= 500 or status == 429


def _has_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bool:
    return any(key.lower() == name for key, _ in headers)


def _describe_error(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
