from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

LinkState = Literal["active", "expired", "revoked"]


class LinkCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"expires_in_days": 7}]})

    expires_in_days: StrictInt | None = Field(
        default=None,
        ge=1,
        le=3650,
        description="Days until the link stops working; RETRO_DOWNLOAD_LINK_DEFAULT_DAYS if left out",
    )


class LinkOut(BaseModel):
    id: uuid.UUID
    retro_test_id: uuid.UUID
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None
    state: LinkState


class LinkCreated(LinkOut):
    url: str = Field(description="The link to send to the partner; shown only now")


class DownloadOut(BaseModel):
    """One download through a partner link, from the audit trail."""

    at: datetime
    link_id: str | None
    file: str | None
    ip: str | None
    user_agent: str | None
    bytes: int | None
    status: int | None
