"""An alert's words, made safe to become a rollback's reason (and ``{reason}``)."""

from __future__ import annotations

import re
from collections.abc import Mapping

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]+")
"""What an alert's text may not carry into a reason: C0 and C1 controls, and the invisible
Unicode that breaks lines (U+2028, U+2029) or disguises what a terminal shows (zero-width
characters, bidirectional overrides)."""
REASON_LIMIT = 300
"""Characters of an alert's text kept in a rollback's reason: it reaches executors as
``{reason}``, so outside text is kept short and on one line."""


def one_line(text: str, limit: int = REASON_LIMIT) -> str:
    flat = " ".join(_CONTROL.sub(" ", text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def alert_reason(alertname: str, labels: Mapping[str, str], annotations: Mapping[str, str]) -> str:
    text = annotations.get("summary") or annotations.get("description")
    if not text:
        shown = [f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "alertname"]
        text = "{" + ", ".join(shown) + "}"
    return one_line(f"alert {alertname}: {text}")
