"""``http``: call a deployment or CI API."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from rollbackd.executors.base import ExecutorSpec

SAFE_TO_RETRY = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class HttpExecutor(ExecutorSpec):
    type: Literal["http"]
    url: str = Field(min_length=1)
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = Field(default=None, description="placeholders are JSON-escaped")
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
