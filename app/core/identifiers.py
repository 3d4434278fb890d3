"""Identifiers that end up in SQL: validated against an allow-list pattern, then quoted."""

from __future__ import annotations

import re

from app.errors import Invalid

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def check_name(value: str, *, what: str) -> str:
    """Return value if it is a plain identifier (letters, digits, underscore), else refuse it."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise Invalid(
            f"{what} {value!r} is not a valid identifier: use letters, digits and underscores, "
            "starting with a letter or underscore, at most 128 characters",
            field=what,
        )
    return value


def check_table(value: str) -> tuple[str, ...]:
    """Split 'db.table' or 'table' into checked parts."""
    parts = value.split(".") if isinstance(value, str) else [value]
    if not 1 <= len(parts) <= 2:
        raise Invalid(f"table {value!r} must be 'table' or 'database.table'", field="table")
    return tuple(check_name(p, what="table") for p in parts)
