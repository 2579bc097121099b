"""Label matchers as Alertmanager and PromQL read them (``severity="critical"``,
``team=~"pay.*"``): parsed once, from rule files, and applied to alert labels."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_MATCHER = re.compile(
    r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\\n]|\\.)*)"\s*(?:,|$)'
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"'}


class MatcherError(ValueError):
    pass


@dataclass(frozen=True)
class LabelMatcher:
    """One matcher, as Alertmanager and PromQL read it. A missing label reads as "", and a
    regex must match the whole value."""

    name: str
    op: str
    value: str
    regex: re.Pattern[str] | None = None

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self.regex is not None
        found = self.regex.fullmatch(actual) is not None
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'{self.name}{self.op}"{escaped}"'


def _unquote(body: str) -> str:
    # An unknown escape keeps its backslash: in a regex, "\d" must stay "\d".
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), body)


def parse_matchers(text: str) -> tuple[LabelMatcher, ...]:
    """``'severity="critical", team=~"pay.*"'`` -> matchers. Raises MatcherError."""
    matchers: list[LabelMatcher] = []
    position = 0
    text = text.strip()
    while position < len(text):
        found = _MATCHER.match(text, position)
        if found is None or found.end() == position:
            raise MatcherError(f"cannot read label matchers at {text[position:]!r}")
        name, op, body = found.group(1), found.group(2), found.group(3)
        value = _unquote(body)
        regex = None
        if op in ("=~", "!~"):
            try:
                regex = re.compile(value)
            except re.error as exc:
                raise MatcherError(f"{name}{op}: invalid regular expression: {exc}") from None
        matchers.append(LabelMatcher(name, op, value, regex))
        position = found.end()
    return tuple(matchers)
