"""``slack``: a Block Kit message to an incoming webhook."""

from __future__ import annotations

from typing import ClassVar, Literal

from rollbackd.notify.base import NotifierSpec


class SlackNotifier(NotifierSpec):
    type: Literal["slack"]
    url_file: str | None = None
    url_env: str | None = None
    channel: str | None = None

    secret_keys: ClassVar[tuple[str, ...]] = ("url",)
    key_hints: ClassVar[dict[str, str]] = {
        "url": "the webhook URL is a secret: set 'url_file' or 'url_env'"
    }
