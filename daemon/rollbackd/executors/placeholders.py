"""Placeholders in executor arguments: ``{service}``, ``{to_version}``, ...

Substitution is plain text replacement of the known names only, so JSON bodies
keep their own braces, and nothing ever passes through a shell.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

from rollbackd.config.strict import did_you_mean

PLACEHOLDERS = (
    "service",
    "from_version",
    "to_version",
    "reason",
    "rollback_id",
    "canary",
    "fencing_token",
)
_KNOWN = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
# Something that looks like a placeholder: {word}, but not JSON such as {"a": 1}.
_LOOKS_LIKE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


def unknown_placeholders(text: str) -> list[str]:
    """Messages for each ``{word}`` in ``text`` that is not a known placeholder."""
    return [
        f"unknown placeholder {{{word}}}{did_you_mean(word, list(PLACEHOLDERS))}; "
        f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
        for word in _LOOKS_LIKE.findall(text)
        if word not in PLACEHOLDERS
    ]


def check_templates(texts: Iterable[str]) -> str | None:
    """One error message for every unknown placeholder in ``texts``, or ``None``."""
    problems = [message for text in texts for message in unknown_placeholders(text)]
    return "; ".join(dict.fromkeys(problems)) if problems else None


def substitute(template: str, values: Mapping[str, str]) -> str:
    """Replace each known placeholder with its value, verbatim."""
    return _KNOWN.sub(lambda m: values.get(m.group(1), ""), template)


def substitute_json(template: str, values: Mapping[str, str]) -> str:
    """Replace placeholders inside a JSON document, escaping each value as a JSON string
    body, so a reason with quotes or newlines cannot break or extend the document."""
    return _KNOWN.sub(lambda m: json.dumps(values.get(m.group(1), ""))[1:-1], template)
