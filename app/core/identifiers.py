"""Identifiers that end up in SQL: validated against an allow-list pattern, then quoted."""

from __future__ import annotations

import re

from app.errors import Invalid
from app.i18n import _

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def check_name(value: str, *, what: str) -> str:
    """Return value if it is a plain identifier (letters, digits, underscore), else refuse it."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise Invalid(
            _(
                "{what} {value} is not a valid identifier: use letters, digits and underscores, starting with a letter or underscore, at most 128 characters"
            ).format(what=what, value=repr(value)),
            field=what,
        )
    return value


def check_table(value: str) -> tuple[str, ...]:
    """Split 'db.table' or 'table' into checked parts."""
    parts = value.split(".") if isinstance(value, str) else [value]
    if not 1 <= len(parts) <= 2:
        raise Invalid(_("table {value} must be 'table' or 'database.table'").format(value=repr(value)), field="table")
    return tuple(check_name(p, what="table") for p in parts)
