from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.validation import SafeText

# The language of a partner's report and download page; None: RETRO_DEFAULT_LANGUAGE.
ReportLanguage = Literal["en", "ru"] | None
PartnerCode = Annotated[str, Field(min_length=2, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$")]


class PartnerCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"code": "acme", "name": "ACME Telecom Resale", "contact_email": "risk@acme.example"}]
        },
    )

    code: PartnerCode
    name: Annotated[SafeText, Field(min_length=1, max_length=200)]
    contact_email: (
        Annotated[str, Field(max_length=320, pattern=r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$")] | None
    ) = None
    report_language: ReportLanguage = None


class PartnerUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[SafeText, Field(min_length=1, max_length=200)] | None = None
    contact_email: (
        Annotated[str, Field(max_length=320, pattern=r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$")] | None
    ) = None
    report_language: ReportLanguage = None


class PartnerOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    code: str
    name: str
    contact_email: str | None
    report_language: str | None
    created_at: datetime
