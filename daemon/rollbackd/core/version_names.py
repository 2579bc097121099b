"""What a version may be called: it becomes part of argv, URLs, paths and placeholders."""

from __future__ import annotations

import re

VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
"""A version: starts with a letter or digit, then letters, digits and ``. _ + -``, at most
128 characters. No slashes, spaces, quotes or braces: it becomes part of argv, URLs,
paths (``versions/<to_version>``) and placeholders."""


def is_valid_version(text: str) -> bool:
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    return VERSION_PATTERN.fullmatch(text) is not None
