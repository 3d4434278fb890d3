"""Plain `make_*` helpers for rows that tests and benchmarks create directly in the database."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import date
from typing import Any

from sqlalchemy.orm import Session


def make_retro_test(
    session: Session,
    *,
    start: date,
    end: date,
    table: str = "features.customer_daily",
    output_formats: Sequence[str] = ("parquet",),
    partner_prefix: str = "test",
    requested_by: str = "test",
    model_name: str = "churn",
    date_column: str = "snapshot_date",
    id_columns: Sequence[str] = ("customer_id",),
    model_info: dict[str, Any] | None = None,
) -> uuid.UUID:
    """A queued retro test of version 1 of a model (churn) for a new partner, as the API would have created it
    (with `model_info`, the registry's answer the API records; without, the worker asks the registry); returns
    its id.

    The session's transaction is the caller's to commit.
    """
    from app.core.jobs import RetroTest, State
    from app.core.partners import Partner

    partner = Partner(code=f"{partner_prefix}-{uuid.uuid4().hex[:8]}", name=partner_prefix)
    session.add(partner)
    session.flush()
    job = RetroTest(
        partner_id=partner.id,
        model_name=model_name,
        model_info=model_info,
        model_version="1",
        model_uri="",
        requested_by=requested_by,
        period_start=start,
        period_end=end,
        output_formats=list(output_formats),
        source_override={},
        request_key=uuid.uuid4().hex,
        source_table=table,
        date_column=date_column,
        id_columns=list(id_columns),
        state=State.queued,
        stage_started={},
    )
    session.add(job)
    session.flush()
    return job.id
