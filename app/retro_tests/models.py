"""The job's models moved to app/core/jobs.py (issue 28); this name stays only for tests/k8s/, which another
branch is editing, and goes once that branch has landed. Code in app/ and worker/ imports app.core.jobs."""

from app.core.jobs import ACTIVE_STATES, RUNNING_STATES, TERMINAL_STATES, ResultFile, RetroTest, RetroTestChunk, State

__all__ = ["ACTIVE_STATES", "RUNNING_STATES", "TERMINAL_STATES", "ResultFile", "RetroTest", "RetroTestChunk", "State"]
