"""Every ORM model, imported in one place for Alembic and for create_all in tests."""

from app.audit.models import AuditEvent
from app.auth.models import ApiToken, User, UserPartner
from app.core.jobs import ResultFile, RetroTest, RetroTestChunk
from app.core.partners import Partner
from app.db import Base
from app.downloads.models import DownloadLink
from app.retro_tests.warm_pool import WarmDeployment, WarmDeploymentUser

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
    "WarmDeployment",
    "WarmDeploymentUser",
]
