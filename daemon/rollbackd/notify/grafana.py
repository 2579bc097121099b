"""``grafana``: an annotation marking the rollback on dashboards."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from rollbackd.notify.base import NotifierSpec


class GrafanaNotifier(NotifierSpec):
    type: Literal["grafana"]
    url: str = Field(pattern=r"^https?://", description="Grafana's base URL")
    token_file: str | None = None
    token_env: str | None = None
    dashboard_uid: str | None = None
    tags: list[str] = Field(default_factory=lambda: ["rollbackd"])

    secret_keys: ClassVar[tuple[str, ...]] = ("token",)
    key_hints: ClassVar[dict[str, str]] = {
        "token": "the API token is a secret: set 'token_file' or 'token_env'"
    }
