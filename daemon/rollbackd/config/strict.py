"""The strict base for every config and rule model.

Unknown keys are rejected with a "did you mean" hint. Pydantic's own
``extra="forbid"`` only says "Extra inputs are not permitted", so the check is
done here, where the model knows its own key names, and combined with the
model's other errors so that one run reports every problem at once.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else ``""``."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def as_init_error(error: Any) -> InitErrorDetails:
    # Re-raise an already-formatted error unchanged; braces would be read as
    # template fields by PydanticCustomError, so they are doubled.
    message = str(error["msg"]).replace("{", "{{").replace("}", "}}")
    return InitErrorDetails(
        type=PydanticCustomError(str(error["type"]), message),
        loc=tuple(error["loc"]),
        input=error.get("input"),
    )


class Strict(BaseModel):
    """Frozen, strict model: unknown keys are errors that suggest the intended key."""

    # Numbers are finite: TOML can write nan and inf, and a threshold of either never
    # (or always) breaches, which silently disables a check.
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=False, allow_inf_nan=False
    )

    # Keys that are accepted but hinted at differently (a secret written inline,
    # say); subclasses map the bad key to the message.
    key_hints: ClassVar[dict[str, str]] = {}

    @classmethod
    def known_keys(cls) -> list[str]:
        return [field.alias or name for name, field in cls.model_fields.items()]

    @model_validator(mode="wrap")
    @classmethod
    def _reject_unknown_keys(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        if not isinstance(data, dict):
            return handler(data)
        known = cls.known_keys()
        unknown = [key for key in data if key not in known]
        if not unknown:
            return handler(data)
        errors: list[InitErrorDetails] = []
        for key in unknown:
            hint = cls.key_hints.get(key) or ("unknown key" + did_you_mean(str(key), known))
            errors.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "unknown_key", hint.replace("{", "{{").replace("}", "}}")
                    ),
                    loc=(key,),
                    input=data[key],
                )
            )
        try:
            handler({key: value for key, value in data.items() if key in known})
        except ValidationError as exc:
            errors.extend(as_init_error(error) for error in exc.errors())
        raise ValidationError.from_exception_data(cls.__name__, errors)
