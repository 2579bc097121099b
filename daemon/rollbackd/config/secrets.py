"""Secrets come from a file or an environment variable, never from a config or rule file."""

from __future__ import annotations

import os
from pathlib import Path


class SecretError(Exception):
    """A secret could not be read; the message names where it was looked for, never its value."""


def read_secret(file: str | None, env: str | None, what: str) -> str:
    if file:
        try:
            value = Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecretError(f"{what}: cannot read {file}: {exc.strerror}") from None
        if not value:
            raise SecretError(f"{what}: {file} is empty")
        return value
    if env:
        value = os.environ.get(env, "").strip()
        if not value:
            raise SecretError(f"{what}: environment variable {env} is not set")
        return value
    raise SecretError(f"{what}: no file or environment variable configured")
