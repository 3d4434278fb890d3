"""The job row and its states, as the API, the web pages and the worker all read them."""

from __future__ import annotations

import enum
import uuid
from datetime import date, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    select,
    text,
)
from sqlalchemy.orm import Mapped, Session, joinedload, mapped_column, relationship, selectinload

from app.clock import utcnow
from app.core.partners import Partner
from app.core.records import (
    ChunkPlanRecord,
    EnvironmentRecord,
    ModelRecord,
    PopulationRecord,
    RecordJSON,
    SourceRecord,
    ValidationRecord,
)
from app.core.scope import PartnerScope
from app.db import Base
from app.errors import NotFound
from app.i18n import _


class State(enum.StrEnum):
    """Life of a retro test; the order of the running states is the order of the pipeline."""

    queued = "queued"
    resolving = "resolving"
    extracting = "extracting"
    preparing_environment = "preparing_environment"
    deploying = "deploying"
    validating = "validating"
    scoring = "scoring"
    publishing = "publishing"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


RUNNING_STATES = (
    State.resolving,
    State.extracting,
    State.preparing_environment,
    State.deploying,
    State.validating,
    State.scoring,
    State.publishing,
)
ACTIVE_STATES = (State.queued, *RUNNING_STATES)
TERMINAL_STATES = (State.succeeded, State.failed, State.cancelled)

_ACTIVE_SQL = (
    "state IN ('queued','resolving','extracting','preparing_environment','deploying','validating','scoring',"
    "'publishing')"
)


class RetroTest(Base):
    """One request to score a partner's history with one model version over one period."""

    __tablename__ = "retro_tests"
    __table_args__ = (
        # At most one active job per identical request: the database settles races.
        Index(
            "uq_retro_tests_active_request",
            "request_key",
            unique=True,
            postgresql_where=text(_ACTIVE_SQL),
            sqlite_where=text(_ACTIVE_SQL),
        ),
        Index("ix_retro_tests_partner_created", "partner_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    partner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("partners.id", ondelete="RESTRICT"))
    partner: Mapped[Partner] = relationship(lazy="raise")

    # The request as made.
    model_name: Mapped[str] = mapped_column(String(256), index=True)
    requested_version: Mapped[str | None] = mapped_column(String(32))
    requested_alias: Mapped[str | None] = mapped_column(String(256))
    period_start: Mapped[date] = mapped_column(Date)
    period_end: Mapped[date] = mapped_column(Date)
    output_formats: Mapped[list[str]] = mapped_column(JSON)
    source_override: Mapped[SourceRecord] = mapped_column(RecordJSON(SourceRecord), default=SourceRecord)
    note: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(String(200))
    request_key: Mapped[str] = mapped_column(String(64))

    # What the request resolved to at submission: the exact model version and its source.
    model_version: Mapped[str] = mapped_column(String(32))
    model_run_id: Mapped[str | None] = mapped_column(String(64))
    model_uri: Mapped[str] = mapped_column(Text)
    source_table: Mapped[str] = mapped_column(String(512))
    date_column: Mapped[str] = mapped_column(String(256))
    id_columns: Mapped[list[str]] = mapped_column(JSON)
    # The JSON facts below are typed records (app/core/records.py), read and written as objects.
    # The registry's full answer (signature, artifact location), recorded by the API when it accepts the job:
    # every attempt reads it here and needs neither the registry nor mlflow (ModelVersionInfo.to_record).
    model_info: Mapped[ModelRecord | None] = mapped_column(RecordJSON(ModelRecord))
    # The partner's own population, when the request brought one (app/retro_tests/population.py): where its
    # checked Parquet copy is in the result store, its columns, rows, sha256, and lookback_days of the join.
    population: Mapped[PopulationRecord | None] = mapped_column(RecordJSON(PopulationRecord))
    # Honest periods: whether the request refuses a period with days that have no history, and those days as the
    # API (from partitions) or the worker (from the period's per-day counts) found them, YYYY-MM-DD; None: not known yet.
    require_full_period: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    days_without_history: Mapped[list[str] | None] = mapped_column(JSON)

    # State machine and timings.
    state: Mapped[State] = mapped_column(
        Enum(State, native_enum=False, length=32, validate_strings=True), default=State.queued
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # The time of each update itself, not its transaction's start (SQL now()): two updates in one transaction tell
    # apart, which the API's kept views of ended jobs rely on (app/retro_tests/views.py). Written by the app, as
    # SQLite (the demo) has no clock_timestamp().
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), onupdate=utcnow)
    stage_started: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)  # the latest start of each stage
    # Every stage entered, in order, as [state, started at]: a resumed job's passes stay apart (None: older jobs).
    stage_log: Mapped[list[list[str]] | None] = mapped_column(JSON)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The worker attempt that owns the job: only it may move the job on; others back off.
    lease_token: Mapped[str | None] = mapped_column(String(32))
    lease_holder: Mapped[str | None] = mapped_column(String(300))  # "<host>:<pid>" of the attempt holding the lease
    last_enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # Progress.
    rows_total: Mapped[int | None] = mapped_column(BigInteger)
    rows_read: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_scored: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_rejected: Mapped[int] = mapped_column(BigInteger, default=0)
    chunks_total: Mapped[int | None] = mapped_column(Integer)
    chunks_done: Mapped[int] = mapped_column(Integer, default=0)
    # The chunks as the first attempt planned them (worker/chunks.py plan_chunks): every attempt and helper cuts
    # the period the same way, whatever the source says later.
    chunk_plan: Mapped[ChunkPlanRecord | None] = mapped_column(RecordJSON(ChunkPlanRecord))

    # Outcome.
    deployment_name: Mapped[str | None] = mapped_column(String(128))
    # True: the job scored on a warm deployment another job had started (worker/warm.py); False: on a new one.
    deployment_warm: Mapped[bool | None] = mapped_column(Boolean)
    score_protocol: Mapped[str | None] = mapped_column(String(16))  # v2-grpc, v2-rest or seldon, once scoring starts
    # The model's environment (ModelEnvironment.to_record, with the step it is at while being prepared) and the
    # reference check's outcome (worker/validation.py), as the job page and the manifest show them.
    environment: Mapped[EnvironmentRecord | None] = mapped_column(RecordJSON(EnvironmentRecord))
    validation: Mapped[ValidationRecord | None] = mapped_column(RecordJSON(ValidationRecord))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    result_location: Mapped[str | None] = mapped_column(Text)

    files: Mapped[list[ResultFile]] = relationship(
        lazy="raise", cascade="all, delete-orphan", order_by="ResultFile.name"
    )
    # A job comparing several models: one row each, in the request's order (the first is the one named above).
    # Each model's own facts (environment, check, deployment, rows) are there; a job of one model has none and
    # keeps its model's facts on this row.
    models: Mapped[list[RetroTestModel]] = relationship(
        lazy="raise", cascade="all, delete-orphan", order_by="RetroTestModel.position"
    )
    # With several models: publish the models that succeeded when another fails its deployment or check (its
    # columns are then left out and the job names it), instead of failing the job.
    allow_partial: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # How many models the job compares (0: a job of one model): the views read the models' rows only when set.
    compared_models: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def partner_code(self) -> str:
        """The partner's code, as the rows of the public view carry it; the partner must be loaded."""
        return self.partner.code


# The list's order, newest first with the id breaking ties, alone or within one state: a page is read in order
# from an index rather than sorted out of every matching job, and counting a state needs only the index.
Index("ix_retro_tests_created_at_id", RetroTest.created_at.desc(), RetroTest.id)
Index("ix_retro_tests_state_created_at_id", RetroTest.state, RetroTest.created_at.desc(), RetroTest.id)


class RetroTestModel(Base):
    """One of the models a comparing job scores every row with, and what its worker learned of it."""

    __tablename__ = "retro_test_models"
    __table_args__ = (UniqueConstraint("retro_test_id", "position"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    retro_test_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("retro_tests.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # 0, 1, ... in the request's order
    model_name: Mapped[str] = mapped_column(String(256))
    requested_version: Mapped[str | None] = mapped_column(String(32))
    requested_alias: Mapped[str | None] = mapped_column(String(256))
    model_version: Mapped[str] = mapped_column(String(32))
    model_info: Mapped[ModelRecord] = mapped_column(RecordJSON(ModelRecord))
    # The start of this model's columns in the results ("churn_v7_"): its outputs are named <prefix><output>.
    column_prefix: Mapped[str] = mapped_column(String(300))
    environment: Mapped[EnvironmentRecord | None] = mapped_column(RecordJSON(EnvironmentRecord))
    validation: Mapped[ValidationRecord | None] = mapped_column(RecordJSON(ValidationRecord))
    deployment_name: Mapped[str | None] = mapped_column(String(128))
    score_protocol: Mapped[str | None] = mapped_column(String(16))
    rows_scored: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_rejected: Mapped[int] = mapped_column(BigInteger, default=0)
    # Set when the model failed and the job went on without it (allow_partial): it has no columns in the results.
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)


class RetroTestChunk(Base):
    """A finished slice of the period; its part file is final once this row is committed."""

    __tablename__ = "retro_test_chunks"
    __table_args__ = (UniqueConstraint("retro_test_id", "chunk_key"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    retro_test_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("retro_tests.id", ondelete="CASCADE"), index=True)
    chunk_key: Mapped[str] = mapped_column(String(32))
    rows_read: Mapped[int] = mapped_column(BigInteger)
    rows_scored: Mapped[int] = mapped_column(BigInteger)
    rows_rejected: Mapped[int] = mapped_column(BigInteger)
    part_path: Mapped[str | None] = mapped_column(Text)
    rejects_path: Mapped[str | None] = mapped_column(Text)
    # A comparing job's rows per model, in model order: [[scored, rejected], ...] (None: a job of one model).
    model_counts: Mapped[list[list[int]] | None] = mapped_column(JSON)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ResultFile(Base):
    """A published result file of a retro test."""

    __tablename__ = "result_files"
    __table_args__ = (UniqueConstraint("retro_test_id", "name"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    retro_test_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("retro_tests.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # scores | rejects | manifest | staff_manifest | environment
    format: Mapped[str] = mapped_column(String(16))
    rows: Mapped[int | None] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


def job_prefix(job: RetroTest) -> str:
    """Results folder of a job, under its partner's folder so storage policies can follow partners."""
    return f"{job.partner_id}/{job.id}"


def get_retro_test(*, session: Session, job_id: uuid.UUID, scope: PartnerScope) -> RetroTest:
    """The job with its partner and files loaded, or NotFound (also when it is another account manager's)."""
    job = session.scalars(
        select(RetroTest)
        .where(RetroTest.id == job_id)
        .options(joinedload(RetroTest.partner), selectinload(RetroTest.files))
        .execution_options(populate_existing=True)
    ).one_or_none()
    if job is None or not scope.allows(job.partner_id):
        raise NotFound(_("no retro test with id {job_id}").format(job_id=job_id))
    return job
