"""What every ``[[notify]]`` entry shares: its name, and which events and services it takes."""

from __future__ import annotations

import fnmatch
from typing import ClassVar, Self

from pydantic import Field, model_validator

from rollbackd.events import EVENT_TYPES
from rollbackd.strict import Strict


class NotifierSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    events: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    services: list[str] = Field(default_factory=lambda: ["*"], min_length=1)

    # Secret keys this notifier needs, each read from `<key>_file` or `<key>_env`.
    secret_keys: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _events_match_something(self) -> Self:
        for pattern in self.events:
            if not fnmatch.filter(EVENT_TYPES, pattern):
                raise ValueError(
                    f"events: {pattern!r} matches no event; events are {', '.join(EVENT_TYPES)}"
                )
        return self

    @model_validator(mode="after")
    def _secrets_from_file_or_env(self) -> Self:
        for key in self.secret_keys:
            given = [
                f"{key}_{where}" for where in ("file", "env") if getattr(self, f"{key}_{where}")
            ]
            if len(given) != 1:
                raise ValueError(f"set exactly one of '{key}_file' or '{key}_env'")
        return self

    def wants(self, event_type: str, service: str) -> bool:
        return any(fnmatch.fnmatchcase(event_type, p) for p in self.events) and any(
            fnmatch.fnmatchcase(service, p) for p in self.services
        )
