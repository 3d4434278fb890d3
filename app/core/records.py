"""The facts a job keeps as JSON on its row, each a versioned record type, and the one place they are
(de)serialized: RecordJSON, the column type of each (app/core/jobs.py). Whoever reads a job (the API's service
and view, the worker's stages, publishing, the report, the pages) gets these objects, never the JSON.

Each record carries `schema_version`. A row written before records had versions holds the record's fields
without it and reads as version 1: the field names and JSON shapes of version 1 are the dicts those rows hold,
so no migration was needed. A record that changes shape bumps its version and reads the older ones in its own
`read` (and a data migration in migrations/ if the rows are to be rewritten).

What the API shows of a record (`public()`) is exactly the keys the row holds, less `schema_version` (and less
where files are kept, for the population): the public JSON of a job is a contract.
"""

from __future__ import annotations

from datetime import date
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict
from sqlalchemy import JSON, Dialect
from sqlalchemy.types import TypeDecorator


class Record(BaseModel):
    """A fact kept on the job row. Unknown keys (a newer writer's) are ignored when read."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: int = 1

    @classmethod
    def read(cls: type[R], stored: Any) -> R:
        """A record from its row's JSON, as any version of the code wrote it (no version: 1)."""
        if isinstance(stored, cls):
            return stored
        return cls.model_validate(stored)

    def stored(self) -> dict[str, Any]:
        """The JSON the row keeps: the fields that were given, and the version."""
        return {**self.model_dump(mode="json", exclude_unset=True), "schema_version": self.schema_version}

    def public(self) -> dict[str, Any]:
        """What the job's view shows of it: the fields that were given, without the version."""
        return self.model_dump(mode="json", exclude_unset=True, exclude={"schema_version"})


R = TypeVar("R", bound=Record)


class RecordJSON(TypeDecorator[R], Generic[R]):
    """A JSON column holding one record type: written from the record, read back as one.

    A plain dict is accepted on write too (checked by the record type), as tests and older callers build them.
    """

    impl = JSON
    cache_ok = True

    def __init__(self, record: type[R]) -> None:
        super().__init__()
        self.record = record

    def process_bind_param(self, value: R | dict[str, Any] | None, dialect: Dialect) -> dict[str, Any] | None:
        return None if value is None else self.record.read(value).stored()

    def process_result_value(self, value: Any | None, dialect: Dialect) -> R | None:
        return None if value is None else self.record.read(value)


class ModelRecord(Record):
    """The registry's full answer for the job's model version, recorded by the API when it accepts the job
    (ModelVersionInfo.to_record / from_record): every attempt reads it and needs neither the registry nor mlflow."""

    name: str
    version: str
    run_id: str | None
    source: str
    artifact_uri: str
    inputs: list[tuple[str, str]]  # (name, type) of each input, in the signature's order
    outputs: list[str]
    tags: dict[str, str] = {}


class PopulationRecord(Record):
    """The partner's own population a job scores as of its dates (app/retro_tests/population.py)."""

    path: str  # its checked Parquet copy in the result store: never shown
    rows: int
    id_columns: list[str]
    as_of_column: str
    outcome_column: str | None
    lookback_days: int
    sha256: str

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True, exclude={"schema_version", "path"})


class ChunkPlanRecord(Record):
    """The chunks as the job's first attempt planned them (worker/chunks.py): every attempt and helper cuts the
    period the same way, whatever the source says later."""

    chunks: list[tuple[date, date, int | None]]  # first day, last day, rows as planned (None: planned by days)


class EnvironmentRecord(Record):
    """The model server's own environment (ModelEnvironment.to_record): while it is prepared only `step`, then
    what was built or found in the cache."""

    step: str | None = None
    key: str | None = None
    python: str | None = None
    python_requested: str | None = None
    server_version: str | None = None
    packages: dict[str, str] | None = None  # name -> pinned version
    warnings: list[str] | None = None
    reused: bool | None = None


class Mismatch(BaseModel):
    """A reference row the deployment scored otherwise."""

    model_config = ConfigDict(frozen=True)

    row: int
    expected: Any
    got: Any


class ValidationRecord(Record):
    """The reference check's outcome (worker/validation.py): passed, failed, or not checked (passed None)."""

    passed: bool | None = None
    source: str | None = None
    note: str | None = None
    rows: int | None = None
    tolerance: float | None = None
    max_abs_diff: float | None = None
    mismatches: list[Mismatch] | None = None


class SourceRecord(Record):
    """Where the history is, as the request overrode the model version's tags (admins only); empty: the tags."""

    table: str | None = None
    date_column: str | None = None
    id_columns: list[str] | None = None


class StageTimeline:
    """When a job entered each stage, read from its two JSON columns in one place: `stage_log` (every entry, in
    order: a resumed job's stages appear once per attempt) and, for a job from before the log (migration 0013),
    `stage_started` (the latest start of each stage). The transition policy writes both (app/core/transitions.py)."""

    def __init__(self, *, log: list[list[str]] | None, started: dict[str, str] | None) -> None:
        if log is not None:
            self.entries = [(str(state), str(at)) for state, at in log]
        else:
            self.entries = sorted(((str(s), str(at)) for s, at in (started or {}).items()), key=lambda e: e[1])

    def latest_start(self, state: str) -> str | None:
        """The ISO time the job last entered `state`, or None if it never did."""
        for entered, at in reversed(self.entries):
            if entered == state:
                return at
        return None

    def as_log(self) -> list[list[str]]:
        """The entries as the stage_log column holds them."""
        return [[state, at] for state, at in self.entries]
