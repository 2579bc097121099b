"""Secrets come from a file or an environment variable, never from a config or rule file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollbackd.config.settings import ServerSection


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


def read_api_token(server: ServerSection) -> str:
    """The API token as the daemon reads it. ``token_file`` has a default, so a config
    that sets only ``token_env`` means the environment."""
    use_env = server.token_env is not None and "token_file" not in server.model_fields_set
    return read_secret(None if use_env else server.token_file, server.token_env, "API token")
