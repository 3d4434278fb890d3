"""Field types shared by request schemas: text that every database and log can hold."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

from app.i18n import N_, _, current_language

# No NUL or other control characters: Postgres refuses NUL in text, and the rest only hide things in logs.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]*$"


# Half of a UTF-16 pair alone (JSON allows "\ud800"): no database or file can store it.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(_("must not contain control characters such as NUL"))
    if _LONE_SURROGATE.search(value):
        raise ValueError(_("must be valid Unicode text (it holds half of a UTF-16 surrogate pair)"))
    return value


SafeText = Annotated[str, AfterValidator(_no_control)]
"""Free text (may contain newlines and tabs)."""

Name = Annotated[str, Field(min_length=1, max_length=256, pattern=NO_CONTROL_PATTERN)]
"""A one-line name such as a model name or alias."""


_ISO_DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_WHOLE_NUMBER = re.compile(r"^[0-9]{1,18}$")


def _date_as_text(value: object) -> object:
    # Lax parsing reads 0 as 1970-01-01, 1.7e9 as a day in 2023 and 2026-10-05T00:00:00 as a day: a person meant
    # none of them (issue 26, N11); only the day itself, written YYYY-MM-DD.
    if isinstance(value, datetime) or not isinstance(value, str | date):
        raise ValueError(_("must be a date written YYYY-MM-DD"))
    if isinstance(value, str) and not _ISO_DAY.fullmatch(value):
        raise ValueError(_("must be a date written YYYY-MM-DD, nothing more"))
    return value


def _whole_number_text(value: object) -> object:
    # A query parameter arrives as text: digits only, so 10.0, 1e1 and " 10" are refused rather than read as 10.
    if isinstance(value, str) and not _WHOLE_NUMBER.fullmatch(value):
        raise ValueError(_("must be a whole number written in digits"))
    return value


IsoDate = Annotated[date, BeforeValidator(_date_as_text)]
"""A calendar day, given as YYYY-MM-DD text (never a number)."""

QueryInt = Annotated[int, BeforeValidator(_whole_number_text)]
"""A whole number in a query string: digits only."""

JsonInt = Annotated[int, Field(strict=True)]
"""A whole number in JSON: a JSON integer, never "1", 1.0 or true."""


# Pydantic's own messages, by error type, in the language of the request: English keeps pydantic's wording as it is.
_PYDANTIC_MESSAGES = {
    "missing": N_("Field required"),
    "extra_forbidden": N_("Extra inputs are not permitted"),
    "string_too_short": N_("String should have at least {min_length} characters"),
    "string_too_long": N_("String should have at most {max_length} characters"),
    "string_pattern_mismatch": N_("String should match pattern '{pattern}'"),
    "string_type": N_("Input should be a valid string"),
    "int_parsing": N_("Input should be a valid integer, unable to parse string as an integer"),
    "int_type": N_("Input should be a valid integer"),
    "greater_than_equal": N_("Input should be greater than or equal to {ge}"),
    "less_than_equal": N_("Input should be less than or equal to {le}"),
    "greater_than": N_("Input should be greater than {gt}"),
    "less_than": N_("Input should be less than {lt}"),
    "literal_error": N_("Input should be {expected}"),
    "enum": N_("Input should be {expected}"),
    "bool_parsing": N_("Input should be a valid boolean, unable to interpret input"),
    "date_from_datetime_parsing": N_("Input should be a valid date or datetime"),
    "uuid_parsing": N_("Input should be a valid UUID"),
    "list_type": N_("Input should be a valid list"),
    "too_long": N_("List should have at most {max_length} items"),
    "too_short": N_("List should have at least {min_length} items"),
    "json_invalid": N_("Invalid JSON"),
    "model_attributes_type": N_("Input should be a valid dictionary or object to extract fields from"),
}


def error_message(error: Mapping[str, Any]) -> str:
    """One pydantic validation error's message for people: our validators' own text, pydantic's in the request's
    language."""
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    template = _PYDANTIC_MESSAGES.get(str(error.get("type")))
    if template is None or current_language() == "en":
        return message
    try:
        return _(template).format(**(error.get("ctx") or {}))
    except (KeyError, IndexError, ValueError):
        return message
