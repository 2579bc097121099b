"""``grafana``: an annotation marking the rollback on dashboards.

``POST <url>/api/annotations`` with a service-account token: the event's time in ms, the
message as text, and tags (the spec's, the service, the event type) that dashboards filter
annotations by. With ``dashboard_uid`` the annotation belongs to that dashboard; without, it
is an organisation-wide annotation that any dashboard can show through a tag query.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import Field

from rollbackd.config.secrets import read_secret
from rollbackd.notify.base import BuildContext, HttpSender, NotifierSpec, Redactor, Sender
from rollbackd.notify.content import Message


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

    def build(self, context: BuildContext) -> Sender:
        token = read_secret(self.token_file, self.token_env, f"notify {self.name}: Grafana token")
        redact = Redactor()
        redact.add(token)
        redact.add_url(self.url, whole=False)
        return GrafanaSender(self, token, redact, context)


class GrafanaSender(HttpSender):
    type = "grafana"

    def __init__(
        self, spec: GrafanaNotifier, token: str, redact: Redactor, context: BuildContext
    ) -> None:
        super().__init__(spec.name, redact, context)
        self._url = spec.url.rstrip("/") + "/api/annotations"
        self._token = token
        self._dashboard_uid = spec.dashboard_uid
        self._tags = list(spec.tags)

    async def send(self, message: Message) -> None:
        body = annotation(message, tags=self._tags, dashboard_uid=self._dashboard_uid)
        await self.post(
            self._url,
            json.dumps(body, ensure_ascii=False).encode("utf-8"),
            {"Authorization": f"Bearer {self._token}"},
        )


def annotation(
    message: Message, *, tags: list[str], dashboard_uid: str | None = None
) -> dict[str, Any]:
    all_tags = [*tags, *([message.service] if message.service else []), message.type]
    body: dict[str, Any] = {
        "time": round(message.event.at * 1000),
        "tags": list(dict.fromkeys(all_tags)),
        "text": message.text(),
    }
    if dashboard_uid:
        body["dashboardUID"] = dashboard_uid
    return body
