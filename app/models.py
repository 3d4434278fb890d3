"""Every ORM model, imported in one place for Alembic and for create_all in tests."""

from app.audit.models import AuditEvent
from app.auth.models import ApiToken, User, UserPartner
from app.db import Base
from app.downloads.models import DownloadLink
from app.partners.models import Partner
from app.retro_tests.models import ResultFile, RetroTest, RetroTestChunk

__all__ = [
    "ApiToken",
    "AuditEvent",
    "Base",
    "DownloadLink",
    "Partner",
    "ResultFile",
    "RetroTest",
    "RetroTestChunk",
    "User",
    "UserPartner",
]
