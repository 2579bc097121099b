"""A check's :class:`CheckState` as JSON, so it survives a restart.

Prometheus restores its alerts' ``for`` state after a restart; without the same, a breach
that began before a release would, after a restart, look as if it began after it, and a
healthy release would be rolled back. The engine stores what :func:`encode` gives, one row
per check, and reads it back with :func:`decode`.

What is kept: the check-level ``error_count`` and ``blind``, and every series that is not
``ok`` with all of its fields. An ``ok`` series carries nothing a restart needs (a fresh
:class:`SeriesState` behaves the same), and leaving them out means an all-OK check encodes
to the same text at every evaluation, so nothing is written for it.

Times are ISO 8601 with their offset, which round-trips a ``datetime`` exactly (a float of
unix seconds can lose the last microsecond). Labels are a list of pairs, in their order.

:func:`decode` is strict, since the text comes from a file: anything but what
:func:`encode` writes raises :class:`StateFormatError` rather than restoring a state the
daemon would then act on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from rollbackd.core.check_state import CheckState, Phase, SeriesState
from rollbackd.core.samples import Labels, Verdict

FORMAT = 1
"""Written into every document; a document of another format is refused, not guessed at."""


class StateFormatError(ValueError):
    """The text is not a check state this version of rollbackd wrote."""


def kept(state: CheckState) -> CheckState:
    """``state`` as it is stored: without its ``ok`` series."""
    return CheckState(
        {labels: s for labels, s in state.series.items() if s.phase is not Phase.OK},
        state.error_count,
        state.blind,
    )


def encode(state: CheckState) -> str:
    """The JSON of ``state`` without its ``ok`` series; the same state, the same text."""
    series = [
        _encode_series(labels, s)
        for labels, s in sorted(state.series.items(), key=lambda item: item[0])
        if s.phase is not Phase.OK
    ]
    document = {
        "format": FORMAT,
        "error_count": state.error_count,
        "blind": state.blind,
        "series": series,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)


def decode(text: str) -> CheckState:
    """The state :func:`encode` wrote. Raises StateFormatError on anything else."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise StateFormatError(f"not JSON: {exc}") from exc
    doc = _object(document, "the document", {"format", "error_count", "blind", "series"})
    if type(doc["format"]) is not int or doc["format"] != FORMAT:
        raise StateFormatError(f"format {doc['format']!r}, expected {FORMAT}")
    raw_series = doc["series"]
    if not isinstance(raw_series, list):
        raise StateFormatError("series: expected a list")
    series: dict[Labels, SeriesState] = {}
    for i, raw in enumerate(raw_series):
        labels, decoded = _decode_series(raw, f"series[{i}]")
        if labels in series:
            raise StateFormatError(f"series[{i}]: labels {labels!r} twice")
        series[labels] = decoded
    return CheckState(
        series, _count(doc["error_count"], "error_count"), _bool(doc["blind"], "blind")
    )


_SERIES_KEYS = {
    "labels",
    "phase",
    "pending_since",
    "firing_since",
    "breach_count",
    "errors_held",
    "last_verdict",
    "last_evaluated",
}


def _encode_series(labels: Labels, s: SeriesState) -> dict[str, Any]:
    return {
        "labels": [[name, value] for name, value in labels],
        "phase": s.phase.value,
        "pending_since": _time(s.pending_since),
        "firing_since": _time(s.firing_since),
        "breach_count": s.breach_count,
        "errors_held": s.errors_held,
        "last_verdict": None if s.last_verdict is None else s.last_verdict.value,
        "last_evaluated": _time(s.last_evaluated),
    }


def _decode_series(raw: object, where: str) -> tuple[Labels, SeriesState]:
    doc = _object(raw, where, _SERIES_KEYS)
    pairs = doc["labels"]
    if not isinstance(pairs, list):
        raise StateFormatError(f"{where}.labels: expected a list of [name, value] pairs")
    labels: list[tuple[str, str]] = []
    for pair in pairs:
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        ):
            raise StateFormatError(f"{where}.labels: expected [name, value] strings, got {pair!r}")
        labels.append((pair[0], pair[1]))
    try:
        phase = Phase(doc["phase"])
        verdict = None if doc["last_verdict"] is None else Verdict(doc["last_verdict"])
    except ValueError as exc:
        raise StateFormatError(f"{where}: {exc}") from exc
    state = SeriesState(
        phase=phase,
        pending_since=_parse_time(doc["pending_since"], f"{where}.pending_since"),
        firing_since=_parse_time(doc["firing_since"], f"{where}.firing_since"),
        breach_count=_count(doc["breach_count"], f"{where}.breach_count"),
        last_verdict=verdict,
        last_evaluated=_parse_time(doc["last_evaluated"], f"{where}.last_evaluated"),
        errors_held=_count(doc["errors_held"], f"{where}.errors_held"),
    )
    # The state machine relies on these (``for`` measures from pending_since), so a state
    # without them is refused here rather than failing on the next evaluation.
    if phase is not Phase.OK and state.pending_since is None:
        raise StateFormatError(f"{where}: a {phase.value} series needs pending_since")
    if phase is Phase.FIRING and state.firing_since is None:
        raise StateFormatError(f"{where}: a firing series needs firing_since")
    return tuple(labels), state


def _object(value: object, where: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise StateFormatError(f"{where}: expected an object")
    if set(value) != keys:
        missing, unknown = sorted(keys - set(value)), sorted(set(value) - keys)
        raise StateFormatError(f"{where}: missing {missing}, unknown {unknown}")
    return value


def _count(value: object, where: str) -> int:
    # bool is an int to Python, not to JSON.
    if type(value) is not int or value < 0:
        raise StateFormatError(f"{where}: expected a count, got {value!r}")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise StateFormatError(f"{where}: expected true or false, got {value!r}")
    return value


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(value: object, where: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise StateFormatError(f"{where}: expected an ISO 8601 time, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise StateFormatError(f"{where}: {exc}") from exc
    if parsed.tzinfo is None:
        # A naive time would compare unequal to, and fail to subtract from, the engine's.
        raise StateFormatError(f"{where}: {value!r} has no UTC offset")
    return parsed


__all__ = ["FORMAT", "StateFormatError", "decode", "encode", "kept"]
