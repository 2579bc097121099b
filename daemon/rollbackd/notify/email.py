"""``email``: a plain-text message over SMTP (standard library)."""

from __future__ import annotations

from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from rollbackd.notify.base import NotifierSpec


class EmailNotifier(NotifierSpec):
    type: Literal["email"]
    smtp_host: str
    smtp_port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    username: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    from_addr: str = Field(alias="from", pattern=r"^[^@\s]+@[^@\s]+$")
    to: list[str] = Field(min_length=1)

    key_hints: ClassVar[dict[str, str]] = {
        "password": "the password is a secret: set 'password_file' or 'password_env'"
    }

    @model_validator(mode="after")
    def _password_with_username(self) -> Self:
        if self.password_file and self.password_env:
            raise ValueError("set only one of 'password_file' or 'password_env'")
        if self.username and not (self.password_file or self.password_env):
            raise ValueError("'username' needs 'password_file' or 'password_env'")
        return self
