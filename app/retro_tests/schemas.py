from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from app.config import OutputFormat
from app.core.jobs import State
from app.i18n import _
from app.validation import NO_CONTROL_PATTERN, IsoDate, JsonInt, Name, SafeText

Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class SourceOverride(BaseModel):
    """Where the model's history lives, when the model version's tags are missing or must be overridden."""

    model_config = ConfigDict(extra="forbid")

    table: (
        Annotated[str, Field(max_length=257, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")] | None
    ) = None
    date_column: Identifier | None = None
    id_columns: Annotated[list[Identifier], Field(min_length=1, max_length=16)] | None = None


class ModelRef(BaseModel):
    """One model of a request: a registry model by name, at a version or an alias."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    version: Annotated[str, Field(pattern=r"^[0-9]{1,9}$")] | None = None
    alias: Name | None = None

    @model_validator(mode="after")
    def _one_of_version_or_alias(self) -> ModelRef:
        if (self.version is None) == (self.alias is None):
            raise ValueError(_("give each model exactly one of version or alias"))
        return self


def parse_model_ref(text: str) -> dict[str, str] | None:
    """`churn/3` (a version) or `churn@champion` (an alias), as MLflow writes model URIs, as a `models` item; None
    when the text is neither (the CLI's --model and the form's "Compare with" say so in their own way)."""
    name, at, alias = text.partition("@")
    if at:
        return {"name": name.strip(), "alias": alias.strip()}
    name, slash, version = text.rpartition("/")
    if slash and name.strip():
        return {"name": name.strip(), "version": version.strip()}
    return None


class RetroTestCreate(BaseModel):
    """A request to score a partner's history with one model version over one period."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "partner_code": "acme",
                    "model_name": "churn",
                    "model_alias": "champion",
                    "period_start": "2026-01-01",
                    "period_end": "2026-03-31",
                    "output_formats": ["parquet", "csv.gz"],
                    "note": "Q1 retro test asked for by ACME's risk team",
                },
                {
                    "partner_code": "acme",
                    "models": [{"name": "churn", "version": "6"}, {"name": "churn", "alias": "champion"}],
                    "period_start": "2026-01-01",
                    "period_end": "2026-03-31",
                    "note": "is the champion better than version 6 on ACME's customers?",
                },
            ]
        },
    )

    partner_code: Annotated[str, Field(min_length=1, max_length=64, pattern=NO_CONTROL_PATTERN)]
    model_name: Name | None = Field(default=None, description="The registry model; or give `models`.")
    model_version: Annotated[str, Field(pattern=r"^[0-9]{1,9}$")] | None = Field(
        default=None, description="A registry version number; give this or model_alias."
    )
    model_alias: Name | None = Field(
        default=None, description="A registry alias such as 'champion'; resolved to a version at submission."
    )
    models: Annotated[list[ModelRef], Field(min_length=1, max_length=16)] | None = Field(
        default=None,
        description="Several models to compare on the same rows (at most RETRO_MAX_MODELS_PER_JOB), instead of "
        "model_name with model_version or model_alias: every row is scored by each, and the report compares them.",
    )
    allow_partial: StrictBool = Field(
        default=False,
        description="With several models: when one fails its deployment or reference check, publish the others "
        "and name it, instead of failing the job.",
    )
    period_start: IsoDate
    period_end: IsoDate
    output_formats: Annotated[list[OutputFormat], Field(min_length=1, max_length=2)] | None = None
    source: SourceOverride | None = None
    note: Annotated[SafeText, Field(max_length=2000)] | None = None
    lookback_days: JsonInt = Field(
        default=0,
        ge=0,
        le=366,
        description="With a population: each row takes the latest snapshot of its id on or before its as-of date, "
        "at most this many days before it (0: only the as-of date's own snapshot).",
    )
    require_full_period: StrictBool = Field(
        default=False,
        description="Refuse the request if any day of the period has no history (by default those days are left "
        "out and named in `warnings`, the job and its report).",
    )
    as_of_column: Identifier = Field(default="as_of", description="The population's as-of date column.")
    outcome_column: Identifier = Field(
        default="outcome", description="The population's 0/1 outcome column, if it has one: AUC, Gini, KS."
    )

    @model_validator(mode="after")
    def _one_of_version_or_alias(self) -> RetroTestCreate:
        if self.models is not None:
            if self.model_name is not None or self.model_version is not None or self.model_alias is not None:
                raise ValueError(_("give either models or model_name with model_version or model_alias, not both"))
            return self
        if self.model_name is None:
            raise ValueError(_("give model_name with model_version or model_alias, or models"))
        if (self.model_version is None) == (self.model_alias is None):
            raise ValueError(_("give exactly one of model_version or model_alias"))
        return self

    def model_refs(self) -> list[ModelRef]:
        """Every model of the request, in order: one for a request of one model."""
        if self.models is not None:
            return list(self.models)
        assert self.model_name is not None
        return [ModelRef(name=self.model_name, version=self.model_version, alias=self.model_alias)]


class ProgressOut(BaseModel):
    rows_total: int | None
    rows_read: int
    rows_scored: int
    rows_rejected: int
    chunks_total: int | None
    chunks_done: int
    percent: float | None
    elapsed_s: float = Field(description="Seconds since the job was submitted (until it ended)")
    rows_per_s: float | None = Field(
        description="Rows scored or rejected per second while scoring; null before rows flow"
    )
    eta_s: float | None = Field(description="Seconds left while scoring, at the rate so far; null otherwise")
    activity: str = Field(description="What the current stage is doing, in words")


class StageOut(BaseModel):
    state: str
    started_at: datetime
    seconds: float | None
    attempt: int = Field(default=1, description="Which pass of the job: a resumed job runs its stages again")


class ResultFileOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    kind: str
    format: str
    rows: int | None
    bytes: int
    sha256: str
    download_url: str


class ModelOut(BaseModel):
    """One model of a job that compares several."""

    position: int = Field(description="0, 1, ... in the request's order")
    model_name: str
    model_version: str
    requested_version: str | None
    requested_alias: str | None
    column_prefix: str = Field(description="where the model's outputs start in the results: <prefix><output>")
    score_protocol: str | None
    environment: dict[str, Any] | None
    validation: dict[str, Any] | None
    rows_scored: int
    rows_rejected: int
    left_out: dict[str, Any] | None = Field(
        description="set when the model failed and the job went on without it (allow_partial): code and message"
    )


class RetroTestOut(BaseModel):
    id: uuid.UUID
    partner_id: uuid.UUID
    partner_code: str
    model_name: str
    model_version: str
    requested_version: str | None
    requested_alias: str | None
    model_run_id: str | None
    model_uri: str
    period_start: date
    period_end: date
    output_formats: list[str]
    source_table: str
    date_column: str
    id_columns: list[str]
    population: dict[str, Any] | None = Field(
        default=None,
        description="the partner's own population the job scores as of its dates: rows, id_columns, as_of_column, "
        "outcome_column, lookback_days, sha256",
    )
    note: str | None
    requested_by: str
    state: State
    cancel_requested: bool
    attempts: int
    created_at: datetime
    finished_at: datetime | None
    stages: list[StageOut]
    score_protocol: str | None = Field(
        default=None, description="the inference protocol the rows were scored over: v2-grpc, v2-rest or seldon"
    )
    deployment_warm: bool | None = Field(
        default=None,
        description="true: scored on a warm deployment an earlier job had started (checked against the reference "
        "again); false: on a deployment started for this job; null: not deployed yet",
    )
    environment: dict[str, Any] | None = Field(
        default=None,
        description="the model server's own environment: python, python_requested, server_version, packages "
        "(name -> version), warnings, reused (found in the worker's cache); while it is prepared, the step it is at; "
        "null when the model is served from the worker's packages (RETRO_MODEL_ENV=worker)",
    )
    validation: dict[str, Any] | None = Field(
        default=None,
        description="the reference check before scoring: source, rows, tolerance, max_abs_diff, passed, and the "
        "first mismatches when it failed",
    )
    progress: ProgressOut
    days_without_history: list[date] | None = Field(
        default=None,
        description="Days of the period the history has no row for (not in the results); null while not known "
        "(a Hive source tells once the job has counted its period)",
    )
    warnings: list[str] = Field(default_factory=list, description="What to know about the period before reading")
    error: dict[str, Any] | None
    result_location: str | None
    files: list[ResultFileOut]
    models: list[ModelOut] | None = Field(
        default=None,
        description="a job comparing several models: each, with its own environment, check and rows (the fields "
        "above name the first); null for a job of one model",
    )


class RetroTestPage(BaseModel):
    items: list[RetroTestOut]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True)
class JobFilters:
    """Which jobs a list shows: by partner code, state and registry model, and which page of them."""

    partner: str | None = None
    state: State | None = None
    model: str | None = None
    id_prefix: str | None = None  # the start of the job's id, as the pages and the CLI show it (8+ characters)
    limit: int = 50
    offset: int = 0
