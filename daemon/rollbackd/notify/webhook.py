"""``webhook``: the event as JSON, optionally signed with HMAC-SHA256."""

from __future__ import annotations

from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from rollbackd.notify.base import NotifierSpec


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
