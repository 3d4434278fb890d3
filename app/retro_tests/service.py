"""Retro tests: validate and create requests, read them, cancel them, move them through their states."""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import ColumnElement, Row, Select, String, bindparam, cast, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit.service import record
from app.clock import utcnow
from app.config import Settings
from app.core.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    ResultFile,
    RetroTest,
    RetroTestModel,
    State,
    get_retro_test,
    job_prefix,
)
from app.core.model_types import ModelVersionInfo, SourceSpec, column_prefix, compared_inputs
from app.core.partners import Partner
from app.core.periods import days_text, missing_days
from app.core.records import PopulationRecord, SourceRecord
from app.core.scope import ALL_PARTNERS, PartnerScope
from app.core.transitions import advance
from app.errors import (
    Conflict,
    Forbidden,
    Invalid,
    InvalidPeriod,
    InvalidPopulation,
    NoHistoryInPeriod,
    NotFound,
    PartnerNotFound,
    PeriodTooLong,
)
from app.i18n import _
from app.partners.service import find_by_code
from app.retro_tests.population import Population, PopulationColumns, PopulationUpload, read_population
from app.retro_tests.schemas import JobFilters, ModelRef, RetroTestCreate


class ModelResolver(Protocol):
    def resolve(self, *, name: str, version: str | None = None, alias: str | None = None) -> ModelVersionInfo: ...


class HistoryCoverage(Protocol):
    def history_days(self, *, table: str, date_column: str) -> list[date] | None: ...

    def known_schema(self, table: str) -> pa.Schema | None: ...


def check_id_types(*, history: HistoryCoverage, table: str, population: Population) -> None:
    """Refuse text ids for a history whose id column holds integers, naming the column and both types; where the
    source knows the table's schema without a statement (local Parquet: a file footer)."""
    schema = history.known_schema(table)
    if schema is None:
        return
    have = {name.lower(): schema.field(name).type for name in schema.names}
    sent = pq.read_schema(pa.BufferReader(population.parquet))
    for name in population.columns.id_columns:
        wanted, got = have.get(name.lower()), sent.field(name).type
        if wanted is not None and pa.types.is_integer(wanted) and not pa.types.is_integer(got):
            raise InvalidPopulation(
                _(
                    "column {name} holds text ({got}) in the population but whole numbers ({wanted}) in history table {table}; send ids that are whole numbers"
                ).format(name=name, got=got, wanted=wanted, table=table),
                field="population",
            )


def check_history(
    *, history: HistoryCoverage, table: str, date_column: str, start: date, end: date, require_full: bool = False
) -> list[date] | None:
    """The period's days without history, where the source tells its days cheaply (None where it does not).

    A period with no day of history is refused, naming the days there are; one with some days missing is refused
    only when the request requires the full period, naming them."""
    days = history.history_days(table=table, date_column=date_column)
    if not days:
        return None
    first, last = days[0], days[-1]
    if end < first or start > last:
        raise NoHistoryInPeriod(
            _(
                "history table {table} has no rows between {start} and {end}; it has history from {first} to {last}: choose days in that range"
            ).format(table=table, start=start, end=end, first=first, last=last),
            field="period_start",
        )
    missing = missing_days(start=start, end=end, days_with_history=days)
    if missing and require_full:
        raise NoHistoryInPeriod(
            _(
                "history table {table} has no rows on {missing} of the {value} days of the period ({missing2}); choose days with history, or submit without require_full_period to score the days there are"
            ).format(table=table, missing=len(missing), value=(end - start).days + 1, missing2=days_text(missing)),
            field="period_start",
        )
    return missing


def check_period(*, start: date, end: date, max_days: int, today: date | None = None) -> None:
    """Refuse periods that are reversed, reach into the future, or are longer than allowed."""
    today = today or utcnow().date()
    if start > end:
        raise InvalidPeriod(
            _("the first day ({start}) is after the last day ({end})").format(start=start, end=end),
            field="period_start",
        )
    if end > today:
        raise InvalidPeriod(
            _("the last day ({end}) is in the future (today is {today})").format(end=end, today=today),
            field="period_end",
        )
    days = (end - start).days + 1
    if days > max_days:
        raise PeriodTooLong(
            _("the period covers {days} days; at most {max_days} are allowed in one retro test").format(
                days=days, max_days=max_days
            ),
            field="period_end",
        )


def request_key(
    *,
    partner_id: uuid.UUID,
    models: Sequence[ModelVersionInfo],
    data: RetroTestCreate,
    source: Mapping[str, object],
    formats: Sequence[str],
) -> str:
    """A fingerprint of what the job would compute, so an identical active request is not run twice."""
    fields: dict[str, object] = {
        "partner": str(partner_id),
        "model": models[0].name,
        "version": models[0].version,
        "start": data.period_start.isoformat(),
        "end": data.period_end.isoformat(),
        "source": source,
        "formats": sorted(formats),
    }
    if len(models) > 1:  # a job of one model keeps the fingerprint it always had
        fields |= {"models": [[m.name, m.version] for m in models], "allow_partial": data.allow_partial}
    canonical = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _active_with_key(session: Session, key: str) -> RetroTest | None:
    return session.scalars(
        select(RetroTest).where(RetroTest.request_key == key, RetroTest.state.in_(ACTIVE_STATES))
    ).first()


def _unknown_partner(session: Session, code: str, scope: PartnerScope) -> PartnerNotFound:
    """The refusal of a partner the caller cannot use, with the caller's own near matches and advice for their role.

    An account manager hears the same thing for a partner that exists but is not theirs: nothing leaks."""
    visible = select(Partner.code)
    if not scope.everything:
        visible = visible.where(Partner.id.in_(scope.partner_ids or ()))
    codes = list(session.scalars(visible.order_by(Partner.code).limit(10_000)))
    near = difflib.get_close_matches(code, codes, n=3, cutoff=0.6)
    hint = _("; did you mean {names}?").format(names=", ".join(repr(c) for c in near)) if near else ""
    if scope.everything:
        return PartnerNotFound(
            _("no partner with code {code}{hint} (an admin adds partners on the Partners page)").format(
                code=repr(code), hint=hint
            ),
            field="partner_code",
        )
    return PartnerNotFound(
        _("no partner with code {code} is assigned to you{hint} (an admin can add it or assign it to you)").format(
            code=repr(code), hint=hint
        ),
        field="partner_code",
    )


def check_source_override(*, override: Mapping[str, object], model: ModelVersionInfo, scope: PartnerScope) -> None:
    """Only admins name the history source; even they copy into results only the model's own id columns.

    The source's table and columns decide what lands in files a partner downloads: an account manager could
    otherwise read any table and hand any column (a plan, a price) to the partner.
    """
    if not override:
        return
    if not scope.everything:
        raise Forbidden(
            _("only an admin may set `source`; ask one, or tag the model version with where its history lives")
        )
    own = model.own_id_columns()
    asked = override.get("id_columns")
    if own and isinstance(asked, list) and not set(asked) <= set(own):
        raise Invalid(
            _("source.id_columns may only name the model's own id columns ({value})").format(value=", ".join(own)),
            field="source.id_columns",
        )


class Submission(NamedTuple):
    """A created (or reused) job, and its checked population to store before it is queued."""

    job: RetroTest
    created: bool
    population: Population | None


@dataclass(frozen=True)
class RetroTestRequest:
    """A request for a retro test as the REST API or the web form received it: what is asked, the population file
    it brought, who asks and which partners they may act for."""

    data: RetroTestCreate
    actor: str
    scope: PartnerScope
    upload: PopulationUpload | None = None


@dataclass(frozen=True)
class CheckedRequest:
    """A request checked against everything outside the database (the registry, its population, the history
    source), with its partner and its fingerprint: what add_job writes."""

    request: RetroTestRequest
    partner: Partner
    model: ModelVersionInfo  # the first of models
    models: list[ModelVersionInfo]
    override: dict[str, object]
    spec: SourceSpec
    population: Population | None
    missing: list[date] | None
    formats: list[str]
    key: str


def submit_request(
    *,
    session: Session,
    registry: ModelResolver,
    settings: Settings,
    request: RetroTestRequest,
    history: HistoryCoverage | None = None,
) -> Submission:
    """Validate a request (and its population) and add it as a queued job; an identical active job is reused.

    On one session throughout (tests, benchmarks); the API runs the same three steps in app/retro_tests/dispatch.py
    with the partner's read transaction ended before the outside calls."""
    partner = requested_partner(session=session, settings=settings, request=request)
    checked = check_request(registry=registry, settings=settings, request=request, partner=partner, history=history)
    return add_job(session=session, checked=checked)


def requested_partner(*, session: Session, settings: Settings, request: RetroTestRequest) -> Partner:
    """The request's partner, if the caller may act for it, after the checks that need no outside system.

    A request for a partner the caller cannot use is refused here, before the registry, the population or the
    history source is asked anything."""
    data, scope = request.data, request.scope
    check_period(start=data.period_start, end=data.period_end, max_days=settings.max_period_days)
    if request.upload is None and data.lookback_days:
        raise InvalidPopulation(_("lookback_days applies to a population; send a population file with it"))
    partner = find_by_code(session=session, code=data.partner_code)
    if partner is None or not scope.allows(partner.id):
        raise _unknown_partner(session, data.partner_code, scope)
    return partner


def check_request(
    *,
    registry: ModelResolver,
    settings: Settings,
    request: RetroTestRequest,
    partner: Partner,
    history: HistoryCoverage | None = None,
) -> CheckedRequest:
    """Resolve the model, check the population and the period's history: every outside call of a submission, and
    no database query, so that no transaction waits on the registry, a 64 MiB upload or a partition listing."""
    data, scope, upload = request.data, request.scope, request.upload
    models = resolve_models(registry=registry, refs=data.model_refs(), settings=settings)
    model = models[0]
    override = data.source.model_dump(exclude_none=True) if data.source else {}
    for each in models:
        check_source_override(override=override, model=each, scope=scope)
    spec = compared_source(models, override)
    population = _check_population(upload, data=data, models=models, spec=spec, settings=settings)
    if population is not None and history is not None:
        check_id_types(history=history, table=spec.table, population=population)
    missing: list[date] | None = None
    if history is not None:
        missing = check_history(
            history=history,
            table=spec.table,
            date_column=spec.date_column,
            start=data.period_start,
            end=data.period_end,
            require_full=data.require_full_period and population is None,
        )
    formats: list[str] = list(data.output_formats or settings.output_formats)
    source: dict[str, object] = {
        "table": spec.table,
        "date_column": spec.date_column,
        "id_columns": list(spec.id_columns),
    }
    if population is not None:
        source["population"] = hashlib.sha256(population.parquet).hexdigest()
        source["lookback_days"] = data.lookback_days
    key = request_key(partner_id=partner.id, models=models, data=data, source=source, formats=formats)
    return CheckedRequest(
        request=request,
        partner=partner,
        model=model,
        models=models,
        override=override,
        spec=spec,
        population=population,
        missing=missing,
        formats=formats,
        key=key,
    )


def resolve_models(*, registry: ModelResolver, refs: list[ModelRef], settings: Settings) -> list[ModelVersionInfo]:
    """Each model of the request, resolved to its exact version; at most RETRO_MAX_MODELS_PER_JOB, none twice."""
    if len(refs) > settings.max_models_per_job:
        raise Invalid(
            _("{count} models asked for; one retro test compares at most {limit} (RETRO_MAX_MODELS_PER_JOB)").format(
                count=len(refs), limit=settings.max_models_per_job
            ),
            field="models",
        )
    models = [registry.resolve(name=r.name, version=r.version, alias=r.alias) for r in refs]
    seen: set[tuple[str, str]] = set()
    for m in models:
        if (m.name, m.version) in seen:
            raise Invalid(
                _("model {name} version {version} is asked for twice; compare different versions").format(
                    name=repr(m.name), version=m.version
                ),
                field="models",
            )
        seen.add((m.name, m.version))
    if len(models) > 1:
        compared_inputs(models)
        prefixes = sorted(column_prefix(m) for m in models)
        for first, second in itertools.pairwise(prefixes):
            if second.startswith(first):  # "a_v1_" and "a_v1_b_v2_": one model's columns would pass for the other's
                raise Invalid(
                    _(
                        "the result columns of two models would start alike ({first}, {second}); compare them in two retro tests"
                    ).format(first=first, second=second),
                    field="models",
                )
    return models


def compared_source(models: list[ModelVersionInfo], override: dict[str, object]) -> SourceSpec:
    """The history every model of the request reads: one table, read once for all of them."""
    spec = models[0].source_spec(override)
    for other in models[1:]:
        theirs = other.source_spec(override)
        if theirs != spec:
            raise Invalid(
                _(
                    "model {first} reads history table {table} ({columns}) but {second} reads {other_table} ({other_columns}); one retro test compares models on the same history"
                ).format(
                    first=f"{models[0].name} v{models[0].version}",
                    table=spec.table,
                    columns=", ".join([spec.date_column, *spec.id_columns]),
                    second=f"{other.name} v{other.version}",
                    other_table=theirs.table,
                    other_columns=", ".join([theirs.date_column, *theirs.id_columns]),
                ),
                field="models",
            )
    return spec


def add_job(*, session: Session, checked: CheckedRequest) -> Submission:
    """Add a checked request as a queued job, or hand back the identical active one: the submission's one write
    transaction, which the caller commits.

    The partial unique index on request_key over active jobs decides a race between two identical requests: the
    loser's insert fails and it returns the winner's job."""
    data, actor = checked.request.data, checked.request.actor
    model, spec, population, missing, key = (
        checked.model,
        checked.spec,
        checked.population,
        checked.missing,
        checked.key,
    )
    existing = _active_with_key(session, key)
    if existing is not None:
        return Submission(existing, False, None)
    job = RetroTest(
        id=uuid.uuid4(),
        partner_id=checked.partner.id,
        model_name=model.name,
        requested_version=(first := data.model_refs()[0]).version,
        requested_alias=first.alias,
        period_start=data.period_start,
        period_end=data.period_end,
        output_formats=checked.formats,
        source_override=SourceRecord.model_validate(checked.override),
        note=data.note,
        requested_by=actor,
        request_key=key,
        model_version=model.version,
        model_run_id=model.run_id,
        model_uri=model.artifact_uri,
        model_info=model.to_record(),  # what the workers deploy: this answer, not a later one for the same name
        source_table=spec.table,
        date_column=spec.date_column,
        id_columns=list(spec.id_columns),
        state=State.queued,
        stage_started={State.queued.value: (queued_at := utcnow().isoformat())},
        stage_log=[[State.queued.value, queued_at]],
        require_full_period=data.require_full_period,
        # A population is scored as of its own dates: its rows without history are listed as unmatched instead.
        days_without_history=[d.isoformat() for d in missing] if missing is not None and population is None else None,
        allow_partial=data.allow_partial,
        compared_models=len(checked.models) if len(checked.models) > 1 else 0,
    )
    if len(checked.models) > 1:
        job.models = [
            RetroTestModel(
                position=n,
                model_name=m.name,
                requested_version=ref.version,
                requested_alias=ref.alias,
                model_version=m.version,
                model_info=m.to_record(),
                column_prefix=column_prefix(m),
                rows_scored=0,
                rows_rejected=0,
            )
            for n, (m, ref) in enumerate(zip(checked.models, data.model_refs(), strict=True))
        ]
    if population is not None:
        job.population = population_record(job, population=population, lookback_days=data.lookback_days)
    session.add(job)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        # Another request with the same key won the race: hand back that one.
        session.expunge(job)
        existing = _active_with_key(session, key)
        if existing is None:
            raise
        return Submission(existing, False, None)
    record(
        session=session,
        actor=actor,
        action="retro_test.create",
        subject_type="retro_test",
        subject_id=job.id,
        partner=checked.partner.code,
        model=", ".join(f"{m.name}/{m.version}" for m in checked.models),
        period=[data.period_start.isoformat(), data.period_end.isoformat()],
        population_rows=population.rows if population else None,
    )
    return Submission(job, True, population)


def _check_population(
    upload: PopulationUpload | None,
    *,
    data: RetroTestCreate,
    models: list[ModelVersionInfo],
    spec: SourceSpec,
    settings: Settings,
) -> Population | None:
    """The request's population, checked against the model's id columns and the period; None without one."""
    if upload is None:
        return None
    taken = {spec.date_column}
    for model in models:
        prefix = column_prefix(model) if len(models) > 1 else ""
        taken |= {f.name for f in model.inputs} | {prefix + o for o in model.outputs or ()}
    for name in (data.as_of_column, data.outcome_column):
        if name in taken or name in spec.id_columns:
            raise InvalidPopulation(
                _(
                    "the population's column name {name} is also a history column or model input/output; rename it in the file and in as_of_column / outcome_column"
                ).format(name=repr(name)),
                field="as_of_column",
            )
    columns = PopulationColumns(
        id_columns=tuple(spec.id_columns), as_of_column=data.as_of_column, outcome_column=data.outcome_column
    )
    return read_population(
        upload,
        columns=columns,
        start=data.period_start,
        end=data.period_end,
        max_bytes=settings.population_max_bytes,
        max_rows=settings.population_max_rows,
    )


def population_record(job: RetroTest, *, population: Population, lookback_days: int) -> PopulationRecord:
    """What the job row keeps of its population: where the checked copy goes, its columns and size."""
    cols = population.columns
    return PopulationRecord(
        path=f"{job_prefix(job)}/population.parquet",
        rows=population.rows,
        id_columns=list(cols.id_columns),
        as_of_column=cols.as_of_column,
        outcome_column=cols.outcome_column,
        lookback_days=lookback_days,
        sha256=hashlib.sha256(population.parquet).hexdigest(),
    )


# What the public view of a job shows (app/retro_tests/router.py job_view), read as plain rows rather than ORM
# objects: the API's read endpoints answer many times a second, and building ORM objects costs several times
# more CPU than the rows do. Built once, since building a select of 33 columns costs CPU on every request too.
JOB_VIEW = select(
    RetroTest.id,
    RetroTest.partner_id,
    Partner.code.label("partner_code"),
    RetroTest.model_name,
    RetroTest.model_version,
    RetroTest.requested_version,
    RetroTest.requested_alias,
    RetroTest.model_run_id,
    RetroTest.model_uri,
    RetroTest.period_start,
    RetroTest.period_end,
    RetroTest.output_formats,
    RetroTest.source_table,
    RetroTest.date_column,
    RetroTest.population,
    RetroTest.id_columns,
    RetroTest.note,
    RetroTest.requested_by,
    RetroTest.state,
    RetroTest.cancel_requested,
    RetroTest.attempts,
    RetroTest.created_at,
    RetroTest.finished_at,
    RetroTest.updated_at,  # not shown: what tells a changed row (views.KeptViews)
    RetroTest.stage_started,
    RetroTest.stage_log,
    RetroTest.score_protocol,
    RetroTest.deployment_warm,
    RetroTest.environment,
    RetroTest.validation,
    RetroTest.rows_total,
    RetroTest.rows_read,
    RetroTest.rows_scored,
    RetroTest.rows_rejected,
    RetroTest.chunks_total,
    RetroTest.chunks_done,
    RetroTest.error_code,
    RetroTest.error_message,
    RetroTest.result_location,
    RetroTest.days_without_history,
    RetroTest.compared_models,
).join(Partner, Partner.id == RetroTest.partner_id)
MODEL_VIEW = select(
    RetroTestModel.retro_test_id,
    RetroTestModel.position,
    RetroTestModel.model_name,
    RetroTestModel.model_version,
    RetroTestModel.requested_version,
    RetroTestModel.requested_alias,
    RetroTestModel.column_prefix,
    RetroTestModel.environment,
    RetroTestModel.validation,
    RetroTestModel.score_protocol,
    RetroTestModel.rows_scored,
    RetroTestModel.rows_rejected,
    RetroTestModel.error_code,
    RetroTestModel.error_message,
)
FILE_VIEW = select(
    ResultFile.retro_test_id,
    ResultFile.name,
    ResultFile.kind,
    ResultFile.format,
    ResultFile.rows,
    ResultFile.bytes,
    ResultFile.sha256,
)
NEWEST_FIRST = (RetroTest.created_at.desc(), RetroTest.id)
# A row of JOB_VIEW or FILE_VIEW, read by attribute like the ORM object it stands for.
ViewRow = Row[*tuple[Any, ...]]
ViewSelect = Select[*tuple[Any, ...]]


class JobRead(NamedTuple):
    """A job as its public view reads it: its row of JOB_VIEW, its result files (a succeeded job's), and the rows of
    MODEL_VIEW of the models it compares (none for a job of one model)."""

    job: ViewRow
    files: list[ViewRow]
    models: Sequence[ViewRow] = ()


def read_retro_test(*, session: Session, job_id: uuid.UUID, scope: PartnerScope) -> JobRead:
    """What the public view of one job shows, or NotFound (also when it is another account manager's)."""
    read = _reads(session, _ONE_JOB, {"job_id": job_id}).get(job_id)
    if read is None or not scope.allows(read.job.partner_id):
        raise NotFound(_("no retro test with id {job_id}").format(job_id=job_id))
    return read


def read_retro_tests(*, session: Session, job_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, JobRead]:
    """What the public view of each of these jobs shows, by id, in one query (and one for a succeeded job's files).

    No scope: for app/retro_tests/live.py, whose streams checked their caller with read_retro_test when they began.
    """
    ids = list(job_ids)
    queries = _ViewQueries(
        job=JOB_VIEW.where(RetroTest.id.in_(ids)),
        files=_files_of(ResultFile.retro_test_id.in_(ids)),
        models=_models_of(RetroTestModel.retro_test_id.in_(ids)),
    )
    return _reads(session, queries, {})


def list_retro_tests(
    *, session: Session, scope: PartnerScope, filters: JobFilters | None = None
) -> tuple[list[JobRead], int]:
    """A page of jobs, newest first, with the total that match the filters (by default: the first 50)."""
    filters = filters or JobFilters()
    params = _list_params(scope, filters)
    queries = _list_queries(frozenset(params))
    page = list(_reads(session, queries.page, params).values())
    return page, _total(session, queries.total, params, listed=len(page), filters=filters)


class JobKey(NamedTuple):
    """What a job's kept view depends on in the database (views.KeptViews): a status read and the list read these
    first, and the rows of only the jobs whose view is not kept (read_retro_test, read_listed)."""

    id: uuid.UUID
    partner_id: uuid.UUID
    state: State
    updated_at: datetime
    finished_at: datetime | None
    files: tuple[str, ...]  # the result files a view shows: a succeeded job's, by name


def shown_files(state: State, names: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(names)) if state == State.succeeded else ()


def read_key(*, session: Session, job_id: uuid.UUID, scope: PartnerScope) -> JobKey:
    """One job's key, or NotFound as read_retro_test (also when it is another account manager's)."""
    row = session.execute(_ONE_KEY, {"job_id": job_id}).first()
    if row is None or not scope.allows(row.partner_id):
        raise NotFound(_("no retro test with id {job_id}").format(job_id=job_id))
    return _job_key(row)


def list_keys(*, session: Session, scope: PartnerScope, filters: JobFilters) -> tuple[list[JobKey], int]:
    """list_retro_tests's page as its jobs' keys, and the total."""
    params = _list_params(scope, filters)
    queries = _list_queries(frozenset(params))
    keys = [_job_key(row) for row in session.execute(queries.keys, params)]
    return keys, _total(session, queries.total, params, listed=len(keys), filters=filters)


def _job_key(row: ViewRow) -> JobKey:
    job_id, partner_id, state, updated_at, finished_at, names = row
    return JobKey(
        job_id, partner_id, state, updated_at, finished_at, shown_files(state, names.split("/") if names else ())
    )


def read_listed(
    *, session: Session, scope: PartnerScope, filters: JobFilters, job_ids: Collection[uuid.UUID]
) -> dict[uuid.UUID, JobRead]:
    """The reads of these jobs of a page of list_keys, by id: by their ids when they are a few of it, else by the
    page's own statements (which read the same for any page: Postgres plans them once per connection)."""
    if not job_ids:
        return {}
    if 2 * len(job_ids) <= filters.limit:
        return read_retro_tests(session=session, job_ids=job_ids)
    params = _list_params(scope, filters)
    return _reads(session, _list_queries(frozenset(params)).page, params)


def _list_params(scope: PartnerScope, filters: JobFilters) -> dict[str, Any]:
    """The list's bound parameters: the filters given, and the page's bounds."""
    params: dict[str, Any] = {"limit": filters.limit, "offset": filters.offset}
    if scope.partner_ids is not None:
        params["partner_ids"] = list(scope.partner_ids)
    if filters.partner is not None:
        params["partner"] = filters.partner
    if filters.state is not None:
        params["state"] = filters.state
    if filters.model is not None:
        params["model"] = filters.model
    if filters.id_prefix is not None:  # as a LIKE pattern, its own wildcards escaped
        params["id_prefix"] = re.sub(r"([/%_])", r"/\1", filters.id_prefix.lower()) + "%"
    return params


def _total(session: Session, count: ViewSelect, params: Mapping[str, Any], *, listed: int, filters: JobFilters) -> int:
    """How many jobs match the list's filters. A page that is not full is the end of the list, so it tells the
    total; only otherwise count, which (unlike the page, read from an index in order) visits every matching job."""
    if 0 < listed < filters.limit or (filters.offset == 0 and not listed):
        return filters.offset + listed
    return int(session.execute(count, params).scalar_one())


def _reads(session: Session, queries: _ViewQueries, params: Mapping[str, Any]) -> dict[uuid.UUID, JobRead]:
    """The reads of the jobs the queries select, by id, in the order of queries.job."""
    jobs = session.execute(queries.job, params).all()
    files = _view_files(session, jobs, queries.files, params)
    models = _view_models(session, jobs, queries.models, params)
    return {job.id: JobRead(job, files.get(job.id, []), models.get(job.id, [])) for job in jobs}


class _ViewQueries(NamedTuple):
    """The statements of a read of jobs' views, each built once: building a statement, and SQLAlchemy working out
    its cache key, cost as much CPU as running it (a select of 41 columns); a statement kept with bound parameters
    keeps its key."""

    job: ViewSelect
    files: ViewSelect
    models: ViewSelect


def _files_of(jobs: ColumnElement[bool]) -> ViewSelect:
    return FILE_VIEW.where(jobs).order_by(ResultFile.retro_test_id, ResultFile.name)


def _models_of(jobs: ColumnElement[bool]) -> ViewSelect:
    return MODEL_VIEW.where(jobs).order_by(RetroTestModel.retro_test_id, RetroTestModel.position)


_ONE_JOB = _ViewQueries(
    job=JOB_VIEW.where(RetroTest.id == bindparam("job_id")),
    files=_files_of(ResultFile.retro_test_id == bindparam("job_id")),
    models=_models_of(RetroTestModel.retro_test_id == bindparam("job_id")),
)


class _ListQueries(NamedTuple):
    page: _ViewQueries
    keys: ViewSelect  # the page's JobKeys
    total: ViewSelect  # how many match


# The names of a job's result files ("/"-separated: no name holds one), from the (retro_test_id, name) index:
# retention deletes a job's files without changing its row.
_FILE_NAMES = (
    select(func.aggregate_strings(ResultFile.name, "/"))
    .where(ResultFile.retro_test_id == RetroTest.id)
    .scalar_subquery()
)
_KEY = select(
    RetroTest.id, RetroTest.partner_id, RetroTest.state, RetroTest.updated_at, RetroTest.finished_at, _FILE_NAMES
)
_ONE_KEY = _KEY.where(RetroTest.id == bindparam("job_id"))


@lru_cache(maxsize=64)
def _list_queries(given: frozenset[str]) -> _ListQueries:
    """The list's statements for a combination of filters (the parameters given)."""
    conditions: list[ColumnElement[bool]] = []
    if "partner_ids" in given:  # an account manager's partners
        conditions.append(RetroTest.partner_id.in_(bindparam("partner_ids", expanding=True)))
    if "partner" in given:
        partner_id = select(Partner.id).where(Partner.code == bindparam("partner")).scalar_subquery()
        conditions.append(RetroTest.partner_id == partner_id)
    if "state" in given:
        conditions.append(RetroTest.state == bindparam("state"))
    if "model" in given:
        conditions.append(RetroTest.model_name == bindparam("model"))
    if "id_prefix" in given:
        conditions.append(cast(RetroTest.id, String).like(bindparam("id_prefix"), escape="/"))
    # The page's ids first, from an index in list order, then only their rows: skipping `offset` jobs then
    # costs index entries rather than whole rows. The files and models are read for the same ids the same way,
    # so that their statements too read the same for every page, and Postgres plans each once per connection
    # (psycopg prepares statements that repeat) instead of an IN list of a different length each time.
    page = (
        select(RetroTest.id)
        .where(*conditions)
        .order_by(*NEWEST_FIRST)
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
        .scalar_subquery()
    )
    return _ListQueries(
        page=_ViewQueries(
            job=JOB_VIEW.where(RetroTest.id.in_(page)).order_by(*NEWEST_FIRST),
            files=_files_of(ResultFile.retro_test_id.in_(page)),
            models=_models_of(RetroTestModel.retro_test_id.in_(page)),
        ),
        keys=_KEY.where(RetroTest.id.in_(page)).order_by(*NEWEST_FIRST),
        total=select(func.count()).select_from(RetroTest).where(*conditions),
    )


def _view_files(
    session: Session, jobs: Sequence[ViewRow], query: ViewSelect, params: Mapping[str, Any]
) -> dict[uuid.UUID, list[ViewRow]]:
    """The result files of jobs (those query selects), by job id; none read when no job succeeded, as the view
    shows only a succeeded job's files."""
    files: dict[uuid.UUID, list[ViewRow]] = {}
    if any(job.state == State.succeeded for job in jobs):
        for file in session.execute(query, params):
            files.setdefault(file.retro_test_id, []).append(file)
    return files


def _view_models(
    session: Session, jobs: Sequence[ViewRow], query: ViewSelect, params: Mapping[str, Any]
) -> dict[uuid.UUID, list[ViewRow]]:
    """The compared models of jobs (those query selects), by job id, in order; none read when no job compares."""
    models: dict[uuid.UUID, list[ViewRow]] = {}
    if any(job.compared_models for job in jobs):
        for model in session.execute(query, params):
            models.setdefault(model.retro_test_id, []).append(model)
    return models


def request_cancel(*, session: Session, job_id: uuid.UUID, actor: str, scope: PartnerScope) -> RetroTest:
    """Cancel a job: a queued one at once, a running one by flagging it for its worker."""
    job = get_retro_test(session=session, job_id=job_id, scope=scope)
    if job.state in TERMINAL_STATES:
        raise Conflict(
            _("retro test {job_id} is already {value} and cannot be cancelled").format(
                job_id=job_id, value=job.state.value
            )
        )
    job.cancel_requested = True
    if job.state == State.queued:
        advance(job, State.cancelled, error_code="cancelled", error_message=f"cancelled by {actor} before it started")
    session.flush()
    record(session=session, actor=actor, action="retro_test.cancel", subject_type="retro_test", subject_id=job.id)
    return job


def fail_unqueued(*, session: Session, job_id: uuid.UUID, reason: str) -> None:
    """Mark a job that could not be sent to the workers as failed, so it is not left queued forever."""
    job = get_retro_test(session=session, job_id=job_id, scope=ALL_PARTNERS)
    if job.state == State.queued:
        advance(
            job, State.failed, error_code="queue_unavailable", error_message=f"the job queue refused the job: {reason}"
        )
    session.flush()
