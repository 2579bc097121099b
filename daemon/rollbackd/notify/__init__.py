"""Notifiers: one module per destination, gathered into the ``Notifier`` union."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from rollbackd.notify.base import NotifierSpec
from rollbackd.notify.email import EmailNotifier
from rollbackd.notify.grafana import GrafanaNotifier
from rollbackd.notify.pagerduty import PagerDutyNotifier
from rollbackd.notify.slack import SlackNotifier
from rollbackd.notify.webhook import WebhookNotifier

Notifier = Annotated[
    SlackNotifier | WebhookNotifier | PagerDutyNotifier | GrafanaNotifier | EmailNotifier,
    Field(discriminator="type"),
]

NOTIFIER_TYPES = ("slack", "webhook", "pagerduty", "grafana", "email")

__all__ = ["NOTIFIER_TYPES", "Notifier", "NotifierSpec"]
