"""Every ORM model, imported in one place for Alembic and for create_all in tests."""

from app.audit.models import AuditEvent
from app.db import Base
from app.partners.models import Partner
from app.retro_tests.models import ResultFile, RetroTest, RetroTestChunk

__all__ = ["AuditEvent", "Base", "Partner", "ResultFile", "RetroTest", "RetroTestChunk"]
