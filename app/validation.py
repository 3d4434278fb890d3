"""Field types shared by request schemas: text that every database and log can hold."""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field

# No NUL or other control characters: Postgres refuses NUL in text, and the rest only hide things in logs.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]*$"


# Half of a UTF-16 pair alone (JSON allows "\ud800"): no database or file can store it.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters such as NUL")
    if _LONE_SURROGATE.search(value):
        raise ValueError("must be valid Unicode text (it holds half of a UTF-16 surrogate pair)")
    return value


SafeText = Annotated[str, AfterValidator(_no_control)]
"""Free text (may contain newlines and tabs)."""

Name = Annotated[str, Field(min_length=1, max_length=256, pattern=NO_CONTROL_PATTERN)]
"""A one-line name such as a model name or alias."""


def _date_as_text(value: object) -> object:
    # Lax parsing reads 0 as 1970-01-01 and 1.7e9 as a day in 2023: a person meant neither.
    if not isinstance(value, str | date):
        raise ValueError("must be a date written YYYY-MM-DD")
    return value


IsoDate = Annotated[date, BeforeValidator(_date_as_text)]
"""A calendar day, given as YYYY-MM-DD text (never a number)."""
