"""Field types shared by request schemas: text that every database and log can hold."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

# No NUL or other control characters: Postgres refuses NUL in text, and the rest only hide things in logs.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]*$"


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters such as NUL")
    return value


SafeText = Annotated[str, AfterValidator(_no_control)]
"""Free text (may contain newlines and tabs)."""

Name = Annotated[str, Field(min_length=1, max_length=256, pattern=NO_CONTROL_PATTERN)]
"""A one-line name such as a model name or alias."""
