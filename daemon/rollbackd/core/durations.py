"""Durations and other small value types shared by the config and rule models.

Durations are written as strings (``"500ms"``, ``"15s"``, ``"1m"``, ``"2h"``,
``"1h30m"``) and parsed once, at load time, into :class:`datetime.timedelta`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
}
# ASCII digits only: \d would also take U+09EA, the Bengali four, which looks like an 8.
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", re.ASCII)
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+", re.ASCII)
MAX_DURATION = timedelta(days=36500)
"""100 years: longer is a typo, and would overflow date arithmetic (and Prometheus' ranges)."""


def parse_duration(text: str) -> timedelta:
    """Parse ``"1h30m"``-style text; raise ``ValueError`` naming what was wrong."""
    cleaned = text.strip()
    if not cleaned or not _WHOLE.fullmatch(cleaned):
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit (ms, s, m, h, d, w), "
            'for example "500ms", "15s", "1m", "2h"'
        )
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(cleaned))
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got: {text!r}")
    if not seconds <= MAX_DURATION.total_seconds():  # inf too ("999...9s")
        raise ValueError(f"duration must be at most 36500d (100 years), got: {text!r}")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """Shortest exact text for a duration, in Prometheus' range syntax (``1h30m``, ``500ms``)."""
    total_ms = round(value.total_seconds() * 1000)
    if total_ms <= 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        count, total_ms = divmod(total_ms, size)
        if count:
            parts.append(f"{count}{unit}")
    if total_ms:
        parts.append(f"{total_ms}ms")
    return "".join(parts)


def _duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        if value.total_seconds() <= 0:
            raise ValueError(f"duration must be positive, got: {value}")
        return value
    if isinstance(value, str):
        parsed = parse_duration(value)
        if parsed < timedelta(milliseconds=1):
            # PromQL ranges count in milliseconds: "0.5ms" would be written as "0s".
            raise ValueError(f"duration must be at least 1ms, got: {value!r}")
        return parsed
    raise ValueError(f'a duration is a string such as "15s" or "2m", got: {value!r}')


def _seconds(value: object) -> float:
    """A threshold in seconds: a number, or a duration string such as ``"250ms"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected seconds or a duration string, got: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative, got: {value}")
        return float(value)
    if isinstance(value, str):
        return parse_duration(value).total_seconds()
    raise ValueError(f'expected seconds or a duration string such as "1s", got: {value!r}')


def _fraction(value: object) -> float:
    """A relative change: ``"20%"`` or a fraction such as ``0.2``."""
    if isinstance(value, bool):
        raise ValueError(f'expected a percentage such as "20%", got: {value!r}')
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            raise ValueError(f'expected a percentage such as "20%", got: {value!r}')
        try:
            number = float(text[:-1]) / 100.0
        except ValueError:
            raise ValueError(f'expected a percentage such as "20%", got: {value!r}') from None
    elif isinstance(value, int | float):
        number = float(value)
    else:
        raise ValueError(f'expected a percentage such as "20%", got: {value!r}')
    if number <= 0:
        raise ValueError(f"must be positive, got: {value!r}")
    return number


Duration = Annotated[
    timedelta,
    BeforeValidator(_duration),
    PlainSerializer(format_duration, return_type=str),
]
"""A positive duration written as a string such as ``"15s"``."""

Seconds = Annotated[float, BeforeValidator(_seconds)]
"""A non-negative number of seconds, or a duration string (``"1s"``, ``"250ms"``)."""

Fraction = Annotated[float, BeforeValidator(_fraction)]
"""A positive relative change, ``"20%"`` or ``0.2``."""
