"""Times on the command line: RFC 3339, unix seconds, ``now``, or ``now-1h`` / ``-1h``."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from rollbackd.core.durations import parse_duration


def parse_time(text: str, now: float | None = None) -> float:
    current = time.time() if now is None else now
    value = text.strip()
    if value == "now":
        return current
    relative = value.removeprefix("now")
    if relative.startswith("-"):
        return current - parse_duration(relative[1:]).total_seconds()
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: use RFC 3339 (2026-11-28T10:00:00Z), unix seconds, "
            "'now', or 'now-1h'"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def format_time(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
