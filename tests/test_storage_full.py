"""Results on a small tmpfs that fills: the job fails as storage_full naming the location, nothing of it remains,
and the next job that fits succeeds (needs root to mount the tmpfs, as CI and the developers' machines run)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _TMP, HISTORY_START, ROWS_PER_DAY
from tests.factories import make_retro_test
from tests.test_end_to_end import END


@pytest.fixture()
def small_volume() -> Iterator[Path]:
    """A 300 KiB tmpfs: room for a one-day job's files, not for a four-day job's."""
    folder = _TMP / f"small-volume-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def run(job_id: uuid.UUID, settings: Any) -> str:
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer, make_history_source, make_registry, make_result_store
    from worker.pipeline import Adapters, run_retro_test

    adapters = Adapters(
        registry=make_registry(settings),
        source=make_history_source(settings),
        deployer=make_deployer(settings),
        store=make_result_store(settings),
    )
    return run_retro_test(job_id=job_id, sessions=get_session_factory(), adapters=adapters, settings=settings).value


@pytest.mark.parametrize("checked_first", [True, False], ids=["free-space-checked-first", "disk-fills-while-writing"])
def test_a_full_result_store_fails_the_job_as_storage_full_and_keeps_nothing_of_it(
    small_volume: Path, database_url: str, registry: dict[str, str], history: Path, checked_first: bool
) -> None:
    """With the check, the job fails before it writes; without it (a store that cannot tell), when the disk fills."""
    from app.config import get_settings
    from app.core.jobs import RetroTest
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer

    settings = get_settings().model_copy(
        update={"results_url": str(small_volume), "partitions": 1, "result_bytes_per_row": 32 if checked_first else 0}
    )
    sessions = get_session_factory()
    with sessions() as s, s.begin():
        big = make_retro_test(
            s, start=HISTORY_START, end=END, output_formats=("parquet", "csv.gz"), partner_prefix="full"
        )
        small = make_retro_test(s, start=HISTORY_START, end=HISTORY_START, partner_prefix="fits")

    assert run(big, settings) == "failed"
    with sessions() as s:
        job = s.get(RetroTest, big)
        assert job is not None and job.error_code == "storage_full", (job.error_code, job.error_message)
        assert str(small_volume) in (job.error_message or "") and "no space left" in (job.error_message or "")
        # Checked first: refused by the count (which runs while the model server starts) before any row was
        # scored or written, naming what it needs; the server it may have started is gone.
        assert ("MiB needed for 10,000 rows" in (job.error_message or "")) is checked_first
        assert ("scoring" not in job.stage_started) is checked_first
    assert make_deployer(settings).list_managed() == []
    assert list(small_volume.rglob("*.parquet")) == [] and list(small_volume.rglob("*.gz")) == []  # nothing remains

    assert run(small, settings) == "succeeded"
    with sessions() as s:
        done = s.get(RetroTest, small)
        assert done is not None and done.rows_scored == ROWS_PER_DAY
    assert (small_volume / str(done.partner_id) / str(small) / "scores.parquet").is_file()
