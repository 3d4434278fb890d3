"""The server-rendered web UI: every page router in one, mounted by create_app."""

from __future__ import annotations

from fastapi import APIRouter

from app.web import account, admin, jobs

router = APIRouter(include_in_schema=False)
router.include_router(account.router)
router.include_router(jobs.router)
router.include_router(admin.router)
