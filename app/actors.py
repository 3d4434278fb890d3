"""Who is making a request. Until sign-in exists, the caller names itself in a header for the audit trail."""

from __future__ import annotations

import re

from fastapi import Header

_SAFE = re.compile(r"^[\w.@+-]{1,200}$")


def current_actor(
    x_retro_user: str | None = Header(default=None, description="Who is acting, for the audit trail"),
) -> str:
    """The acting user's name, or 'api' when none is given."""
    if x_retro_user and _SAFE.fullmatch(x_retro_user):
        return x_retro_user
    return "api"
