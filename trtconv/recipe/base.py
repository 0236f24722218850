"""The base of every recipe section: unknown keys are errors, and booleans are not numbers.

pydantic's lax mode reads `true` as 1 for an int field and as 1.0 for a float field, so
`--set export.tp_size=true` would quietly build for one rank. A YAML boolean given where the schema
wants a number is almost always a typo or a wrong key, so it is refused, naming the field.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _admits_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_admits_bool(a) for a in typing.get_args(annotation) if not isinstance(a, (int, str, float)))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            if not _admits_bool(cls.model_fields[info.field_name].annotation):
                raise ValueError("a boolean is not a number here; give a number")
        return value
