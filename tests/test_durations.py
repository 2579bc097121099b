from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollbackd.core.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("15s", 15),
        ("1m", 60),
        ("2h", 7200),
        ("1h30m", 5400),
        ("30d", 30 * 86400),
        ("1w", 7 * 86400),
        (" 1.5s ", 1.5),
    ],
)
def test_parses(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "15", "s", "1x", "-1s", "0s", "1 m", "1m-", "ms"])
def test_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.5, "500ms"), (60, "1m"), (5400, "1h30m"), (90061.25, "1d1h1m1s250ms"), (86400 * 30, "30d")],
)
def test_formats_as_promql_range(seconds: float, text: str) -> None:
    assert format_duration(timedelta(seconds=seconds)) == text


@given(st.integers(min_value=1, max_value=10**10))
def test_format_parse_round_trip(milliseconds: int) -> None:
    value = timedelta(milliseconds=milliseconds)
    assert parse_duration(format_duration(value)) == value
