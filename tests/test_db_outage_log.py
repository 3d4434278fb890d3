"""A worker waiting out a database outage says so once, and once more when it gives up (app/db.py): no line per
try, and not silence. A loopback port nothing listens on stands in for the stopped server."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from tests.conftest import free_port


def test_the_wait_for_a_database_is_logged_when_it_starts_and_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    from app.db import make_engine

    engine = make_engine(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x", outage_budget_s=1.5)
    try:
        with (
            caplog.at_level(logging.INFO, logger="app.db"),
            pytest.raises(OperationalError),
            engine.connect() as conn,
        ):
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    lines = [r.getMessage() for r in caplog.records if r.name == "app.db"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("the database is unreachable (") and lines[0].endswith("waiting up to 2 s for it")
    assert lines[1].startswith("the database is still unreachable after 2 s; giving up:")
