"""The job's JSON facts as typed records (app/core/records.py): rows written before the records existed (no
schema_version) read as version 1, the API shows exactly the keys the row holds, and a bad fact is refused on
write instead of landing on the row."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy.dialects import postgresql

from app.core.records import (
    ChunkPlanRecord,
    EnvironmentRecord,
    ModelRecord,
    PopulationRecord,
    Record,
    RecordJSON,
    SourceRecord,
    StageTimeline,
    ValidationRecord,
)

DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]

# Each record as the code before the records wrote it to the row (no schema_version).
OLD_ROWS: dict[type[Record], dict[str, Any]] = {
    ModelRecord: {
        "name": "churn",
        "version": "3",
        "run_id": "abc",
        "source": "models:/churn/3",
        "artifact_uri": "file:///srv/mlflow/1/abc/artifacts/model",
        "inputs": [["age", "long"], ["spend", "double"]],
        "outputs": ["score"],
        "tags": {"retro.table": "features"},
    },
    PopulationRecord: {
        "path": "p/j/population.parquet",
        "rows": 10,
        "id_columns": ["customer_id"],
        "as_of_column": "as_of",
        "outcome_column": None,
        "lookback_days": 3,
        "sha256": "0" * 64,
    },
    ChunkPlanRecord: {"chunks": [["2026-01-01", "2026-01-03", 120], ["2026-01-04", "2026-01-04", None]]},
    EnvironmentRecord: {
        "key": "k",
        "python": "3.11.9",
        "python_requested": "3.11",
        "server_version": "1.7.1",
        "packages": {"mlserver": "1.7.1"},
        "warnings": [],
        "reused": False,
    },
    ValidationRecord: {
        "source": "the model's input example",
        "rows": 2,
        "tolerance": 1e-6,
        "max_abs_diff": 0.5,
        "passed": False,
        "mismatches": [{"row": 1, "expected": [0.5], "got": [1.0]}],
    },
    SourceRecord: {},
}


@pytest.mark.parametrize("record", OLD_ROWS, ids=lambda r: r.__name__)
def test_a_row_written_before_records_reads_as_version_1_and_shows_as_it_was(record: type[Record]) -> None:
    column = RecordJSON(record)
    old = OLD_ROWS[record]
    read = column.process_result_value(old, DIALECT)
    assert isinstance(read, record) and read.schema_version == 1
    shown = {k: v for k, v in old.items() if not (record is PopulationRecord and k == "path")}
    assert read.public() == shown  # the API's JSON of an old job is what it was
    stored = column.process_bind_param(read, DIALECT)
    assert stored == {**old, "schema_version": 1}  # written back: the same fields, and the version
    assert column.process_result_value(stored, DIALECT) == read


def test_readers_get_typed_fields_not_strings() -> None:
    plan = ChunkPlanRecord.read(OLD_ROWS[ChunkPlanRecord])
    assert plan.chunks[0] == (date(2026, 1, 1), date(2026, 1, 3), 120) and plan.chunks[1][2] is None
    model = ModelRecord.read(OLD_ROWS[ModelRecord])
    assert model.inputs == [("age", "long"), ("spend", "double")]
    validation = ValidationRecord.read(OLD_ROWS[ValidationRecord])
    assert validation.mismatches is not None and validation.mismatches[0].row == 1


def test_an_environment_being_prepared_shows_only_its_step() -> None:
    column = RecordJSON(EnvironmentRecord)
    read = column.process_result_value(column.process_bind_param(EnvironmentRecord(step="resolving"), DIALECT), DIALECT)
    assert read is not None and read.public() == {"step": "resolving"}


def test_a_key_a_newer_writer_added_is_ignored_and_a_wrong_type_is_refused() -> None:
    newer = {**OLD_ROWS[PopulationRecord], "schema_version": 1, "added_later": "x"}
    assert "added_later" not in PopulationRecord.read(newer).public()
    with pytest.raises(ValidationError):
        RecordJSON(PopulationRecord).process_bind_param({**OLD_ROWS[PopulationRecord], "rows": "many"}, DIALECT)


def test_the_stage_timeline_reads_the_log_or_for_an_older_job_its_latest_starts() -> None:
    log = [
        ["queued", "2026-01-01T00:00:00"],
        ["resolving", "2026-01-01T00:00:01"],
        ["resolving", "2026-01-01T00:05:00"],
    ]
    timeline = StageTimeline(log=log, started={"queued": "2026-01-01T00:00:00"})
    assert timeline.latest_start("resolving") == "2026-01-01T00:05:00"  # the second attempt's, from the log
    assert timeline.latest_start("scoring") is None
    assert timeline.as_log() == log
    older = StageTimeline(log=None, started={"scoring": "2026-01-01T00:02:00", "queued": "2026-01-01T00:00:00"})
    assert older.as_log() == [["queued", "2026-01-01T00:00:00"], ["scoring", "2026-01-01T00:02:00"]]
    assert older.latest_start("scoring") == "2026-01-01T00:02:00"
