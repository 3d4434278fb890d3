"""The life of one retro test, stage by stage, as plain functions over the adapters.

resolving  -> the exact model version and its signature, from the registry
extracting -> the source schema is checked before anything is deployed; then the period's rows are counted and
              cut into chunks (one GROUP BY of its days) on a thread of its own while the stages below run: a job
              the count refuses (no rows, days missing, results that will not fit) stops there, as soon as known
preparing_environment -> the model's own Python environment (its logged pins + an MLServer that resolves with
              them), built with uv or found in the worker's cache (app/integrations/environments/cache.py); meanwhile
              the model's input example is scored in-process in it, as the reference for validating
deploying  -> a temporary model server for exactly that version, from that environment (or a warm one); stopped on
              every path
validating -> the deployment scores the reference and must agree with it (worker/validation.py); then the job waits
              for its plan, if the count is still running
scoring    -> the period, chunk by chunk (consecutive days of about RETRO_CHUNK_ROWS rows, planned once from the
              rows of each day and kept on the job; one query each, the next opened while one is scored), streamed in batches to the model server; a chunk's
              part file and its row in retro_test_chunks are the checkpoint, so a redelivered job skips
              finished chunks and never writes a row twice (worker/chunks.py). With RETRO_PARTITIONS > 1,
              helper workers score date ranges of the period against the same deployment (score_partition)
publishing -> parts merged into the result files, a manifest, row counts reconciled

A job comparing several models (issue 30) runs the same stages with each of them: one environment, reference check
and deployment per model (started side by side), the history read once with the union of their inputs, every batch
scored by each (app/integrations/scoring/several.py), one result file and a report comparing them.

The attempt that runs the stages holds the job's lease (worker/control.py) and is the only one to give a verdict.
Every stage takes the attempt's JobRun (worker/run.py), the one writer of the running job: `run.enter(state)`,
`run.record_...(fact)`, `run.commit_chunk(...)`, each a short transaction of its own, never held across a call to
an outside system.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.core.jobs import State
from app.core.model_types import ModelVersionInfo, compared_inputs
from app.core.records import EnvironmentRecord, ValidationRecord
from app.db import describe_database_error, is_transient
from app.errors import (
    AppError,
    DatabaseUnavailable,
    DeploymentFailed,
    EnvironmentFailed,
    JobCancelled,
    ModelServerDown,
    ReferenceMismatch,
    SourceUnknown,
    StorageFull,
    TooManyAttempts,
)
from app.integrations.deployers.port import Deployment, deployment_name
from app.integrations.environments.cache import ModelEnvironment, hold, read_requirements
from app.integrations.environments.sandbox import ModelSandbox
from app.integrations.history.port import HistoryQuery, PopulationJoin, staging_table
from app.integrations.registry.mlflow import fetch_model
from app.integrations.scoring.scorers import SCORERS, BatchScorer, Scorer, ScoringOptions, choose_protocol
from app.integrations.scoring.several import ComparedScorer, ModelsScorer
from app.metrics import DEPLOYMENTS_ALIVE
from app.retro_tests.runs import Beat, Counts, JobSpec, LeaseLost
from worker import run as job_row
from worker.chunks import Chunk, ChunkCounts, enforce_reject_budgets, plan_chunks, score_chunks
from worker.control import JobControl
from worker.publish import publish
from worker.run import Adapters, JobModel, JobRun, PartitionOrder
from worker.validation import Reference, check, load_reference
from worker.warm import WarmPool, pool_key

__all__ = ["Adapters", "PartitionOrder", "run_retro_test", "score_partition", "split_ranges"]

log = logging.getLogger(__name__)


def run_retro_test(
    *, job_id: uuid.UUID, sessions: sessionmaker[Session], adapters: Adapters, settings: Settings
) -> State:
    """Run a job to a terminal state; safe to call again for a redelivered or re-enqueued job."""
    claimed = job_row.claim(sessions=sessions, job_id=job_id, settings=settings)
    if claimed is None:
        log.warning("retro test %s does not exist; nothing to do", job_id)
        return State.failed
    lease = claimed.lease
    if lease is None:
        log.info(
            "retro test %s is %s or held by a live attempt; this delivery does nothing", job_id, claimed.state.value
        )
        return claimed.state

    def finish(state: State, error: tuple[str, str] | None = None) -> State:
        if state != State.succeeded:  # publishing dropped it already
            release_staging(claimed.spec, adapters=adapters, settings=settings)  # gone before the job says it ended
        return job_row.finish(sessions=sessions, job_id=job_id, lease=lease, state=state, error=error)

    if claimed.cancel_requested:
        return _discard(claimed.spec, adapters, finish(State.cancelled, ("cancelled", "cancelled before it started")))
    if claimed.attempts > settings.max_attempts:
        gave_up = (
            f"gave up after {claimed.attempts - 1} attempts: each was interrupted before the job finished "
            "(worker lost, killed or timed out); see the worker logs"
        )
        return _discard(claimed.spec, adapters, finish(State.failed, (TooManyAttempts.code, gave_up)))
    try:
        with _control(claimed.spec, sessions=sessions, lease=lease, settings=settings, heartbeat=True) as control:
            _run_stages(
                JobRun(spec=claimed.spec, control=control, adapters=adapters, settings=settings, sessions=sessions)
            )
        return finish(State.succeeded)
    except LeaseLost:
        log.warning("retro test %s: another attempt took over; this one stops", job_id)
        return State.failed
    except JobCancelled as exc:
        return _discard(claimed.spec, adapters, finish(State.cancelled, (exc.code, exc.detail)))
    except Exception as exc:
        if is_transient(exc):
            exc = DatabaseUnavailable(
                f"the job database stayed unreachable for more than RETRO_DB_OUTAGE_BUDGET_S "
                f"({settings.db_outage_budget_s:.0f} s): {describe_database_error(exc)}"
            )
        elif _no_space(exc):
            where = adapters.store.location(claimed.spec.prefix)
            exc = StorageFull(
                f"no space left on the result store at {where}; free space there or move RETRO_RESULTS_URL"
            )
        if isinstance(exc, AppError):
            log.warning("retro test %s failed: %s", job_id, exc.detail)
            return _discard(claimed.spec, adapters, finish(State.failed, (exc.code, exc.detail)))
        log.exception("retro test %s failed unexpectedly", job_id)
        return _discard(
            claimed.spec, adapters, finish(State.failed, ("internal_error", f"{type(exc).__name__}: {exc}"))
        )


def _no_space(exc: BaseException) -> bool:
    """A write that found the disk full, however the library that wrote it reports it (pyarrow loses the errno)."""
    return isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or "No space left on device" in str(exc))


def release_staging(spec: JobSpec, *, adapters: Adapters, settings: Settings) -> None:
    """Drop the job's population staging table, if it has one; one that cannot be dropped is left to the reaper."""
    if spec.population is None:
        return
    table = staging_table(settings.hive_scratch_database, spec.id)
    try:
        adapters.source.drop_staging(table)
    except Exception:
        log.warning("could not drop %s of retro test %s; the reaper will", table, spec.id, exc_info=True)


def _discard(spec: JobSpec, adapters: Adapters, state: State) -> State:
    """A job that ended without results keeps no files: its parts and any half-written result go at once."""
    if state in (State.failed, State.cancelled):
        try:
            adapters.store.remove_tree(spec.prefix)
        except Exception:
            log.warning("could not remove the files of retro test %s", spec.id, exc_info=True)
    return state


def _control(
    spec: JobSpec, *, sessions: sessionmaker[Session], lease: str, settings: Settings, heartbeat: bool
) -> JobControl:
    """The attempt's lease, heartbeat (a coordinator's; a helper only watches) and deadline."""

    def write_beat(progress: Counts | None, renew: bool) -> Beat:
        return job_row.beat(sessions=sessions, job_id=spec.id, lease=lease, progress=progress, heartbeat=renew)

    return JobControl(
        write_beat=write_beat,
        job_id=spec.id,
        lease=lease,
        deadline=spec.created_at + timedelta(seconds=settings.job_deadline_s),
        heartbeat_s=settings.heartbeat_interval_s if heartbeat else None,
    )


def _run_stages(run: JobRun) -> None:
    run.enter(State.resolving)
    models = resolve_models(run)
    run.enter(State.extracting)
    query = extract(run, models)
    run.control.check()
    # A first attempt counts and plans the period while its model servers start; a resumed one has its plan kept.
    with Plan(run, query, early=run.spec.chunk_plan is None) as plan:
        # An attempt that finds every chunk committed (its predecessor died before publishing) deploys nothing.
        if not plan.ready or not {c.key for c in plan.chunks()} <= run.committed_keys():
            with contextlib.ExitStack() as stack:
                prepared = prepare_models(run, models, plan=plan, stack=stack)
                models = _deploy_and_score(run, prepared, query=query, plan=plan)
    run.enter(State.publishing)
    publish(run, models=models, query=query)


@dataclass(frozen=True)
class Prepared:
    """A model ready to deploy: its environment (None: the worker's packages) and its in-process reference."""

    each: JobModel
    environment: ModelEnvironment | None
    reference: Future[Reference | None]


def resolve_models(run: JobRun) -> list[JobModel]:
    """The job's models: its one model, or each model it compares that no earlier attempt left out."""
    if not run.spec.models:
        return [JobModel(resolve(run))]
    return [
        JobModel(ModelVersionInfo.from_record(m.model_info), position=m.position, column_prefix=m.column_prefix)
        for m in run.spec.models
        if not m.left_out
    ]


def prepare_models(run: JobRun, models: list[JobModel], *, plan: Plan, stack: contextlib.ExitStack) -> list[Prepared]:
    """Each model fetched, its environment prepared and its reference started, held until `stack` closes."""
    prepared: list[Prepared] = []
    left = len(models)
    if len(models) > 1 and run.adapters.environments is not None:
        run.enter(State.preparing_environment)
    for each in models:
        try:
            prepared.append(stack.enter_context(prepared_model(run, each, plan=plan)))
        except (EnvironmentFailed, DeploymentFailed) as exc:
            left -= 1
            leave_out(run, each, exc, others=left)
    return prepared


@contextlib.contextmanager
def prepared_model(run: JobRun, each: JobModel, *, plan: Plan) -> Iterator[Prepared]:
    """The model's files in a scratch folder, its environment held, its reference scored in-process meanwhile."""
    with tempfile.TemporaryDirectory(prefix="retro-model-") as scratch:
        model_dir = fetch_model(each.model.artifact_uri, Path(scratch) / "model")
        plan.check()
        environment = prepare_environment(run, each, model_dir, plan=plan)
        with hold(environment) if environment else contextlib.nullcontext():
            # The in-process reference takes seconds (mlflow's import): it runs while the server starts.
            background = ThreadPoolExecutor(1, thread_name_prefix="reference")
            try:
                reference = background.submit(
                    load_reference,
                    model=each.model,
                    model_dir=model_dir,
                    environment=environment,
                    timeout_s=run.settings.deploy_ready_timeout_s,
                    sandbox=ModelSandbox(run.settings.model_sandbox),
                    cache_dir=run.settings.var_dir / "references",
                )
                yield Prepared(each=each, environment=environment, reference=reference)
            finally:
                # A job that failed or was cancelled while the server started does not wait for the reference.
                background.shutdown(wait=False, cancel_futures=True)


def leave_out(run: JobRun, each: JobModel, exc: AppError, *, others: int) -> None:
    """A compared model failed before scoring: the job goes on without it when the request allows that and some
    other model is left (publishing drops any column of it an earlier attempt wrote); else the job fails, naming it."""
    if each.position is None:
        raise exc
    exc.detail = f"{each.label}: {exc.detail}"
    if not run.spec.allow_partial or others < 1:
        raise exc
    log.warning("retro test %s: leaving out %s (allow_partial)", run.job_id, exc.detail)
    run.record_left_out(each.position, code=exc.code, message=exc.detail)


class Plan:
    """The period's count and chunk plan (plan_period), made now or, with `early`, on a thread of its own.

    Early, the count (on a production Hive a GROUP BY over the period: seconds to minutes) runs while the model is
    fetched, its environment prepared and its server started. A refusal it finds (SourceUnknown, NoHistoryInPeriod,
    StorageFull) is the job's error as soon as it is known: the stages check() between steps and the deployment's
    wait stops on refused(). An attempt that ends before the count does leaves it to finish on its thread: it only
    reads the source and records facts of the job (first plan wins), and its query is abandoned.
    """

    def __init__(self, run: JobRun, query: HistoryQuery, *, early: bool) -> None:
        self._job_id = run.job_id
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future[list[Chunk]] = Future()
        if early:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"plan-{run.job_id}")
            self._future = self._executor.submit(plan_period, run, query)
        else:
            self._future.set_result(plan_period(run, query))

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    @property
    def ready(self) -> bool:
        return self._future.done()

    def refused(self) -> bool:
        """The count or the plan failed: the job must stop."""
        return self._future.done() and self._future.exception() is not None

    def check(self) -> None:
        """Raise the plan's error, if it failed already."""
        if self.refused():
            self._future.result()

    def chunks(self) -> list[Chunk]:
        """The plan, waiting for it if the count is still running; its error if it failed."""
        if not self._future.done():
            log.info("retro test %s: waiting for the period's count and plan", self._job_id)
        return self._future.result()


def plan_period(run: JobRun, query: HistoryQuery) -> list[Chunk]:
    """Count the period's rows and cut it into chunks, recorded on the job; refuse a period with no rows, or one
    whose results will not fit the store."""
    total = count_period(run, query)
    chunks = plan_chunks(run, query)
    run.record_plan(rows_total=total, chunks_total=len(chunks))
    if not run.committed_keys():  # a resumed attempt has written part of it already: the estimate would be off
        check_free_space(run, rows=total)
    return chunks


def _deploy_and_score(run: JobRun, prepared: list[Prepared], *, query: HistoryQuery, plan: Plan) -> list[JobModel]:
    """Deploy, validate and score until every chunk is committed, re-creating model servers that went down;
    returns the models that scored (a compared model that failed is left out when the request allows it)."""
    redeploys = 0
    while True:
        try:
            with serving_models(run, prepared, plan=plan) as started:
                run.enter(State.validating)
                servings: list[Serving] = []
                standing = len(started)
                for serving in started:
                    if _validated(run, serving, others=standing - 1):
                        servings.append(serving)
                    else:
                        standing -= 1
                        prepared = [p for p in prepared if p.each != serving.each]
                for serving in servings:
                    serving.validated()
                chunks = plan.chunks()
                run.enter(State.scoring)
                score_period(run, query=query, chunks=chunks, servings=servings)
            return [s.each for s in servings]
        except ModelServerDown as exc:
            if redeploys >= run.settings.max_redeploys:
                raise ModelServerDown(
                    f"{exc.detail}; the model server was re-created {redeploys} time(s) without help"
                ) from exc
            redeploys += 1
            log.warning(
                "retro test %s: model server down (%s); re-creating it (%d of %d)",
                run.job_id,
                exc.detail,
                redeploys,
                run.settings.max_redeploys,
            )


def _validated(run: JobRun, serving: Serving, *, others: int) -> bool:
    """The model's reference check; False when it failed and the job goes on without it (its server stopped)."""
    try:
        validate(run, each=serving.each, reference=serving.reference.result(), scorer=serving.scorer)
    except ReferenceMismatch as exc:
        if serving.warm:
            # The same check passed when the deployment was new: this one has gone wrong, not the model.
            raise ModelServerDown(
                f"warm deployment {serving.deployment.name} failed the reference check ({exc.detail}); "
                "it leaves the pool"
            ) from exc
        leave_out(run, serving.each, exc, others=others)
        serving.stop()
        return False
    return True


def check_free_space(run: JobRun, *, rows: int | None) -> None:
    """Fail at once, as storage_full, a job whose files will not fit where results go (when the store can tell)."""
    per_row = run.settings.result_bytes_per_row
    free = run.adapters.store.free_bytes(run.spec.prefix)
    if not rows or not per_row or free is None:
        return
    need = rows * per_row * (1 + len(run.spec.output_formats))  # the parts, then each format merged from them
    if need > free:
        where = run.adapters.store.location(run.spec.prefix)
        raise StorageFull(
            f"no space left for this job on the result store at {where}: {free / 2**20:,.1f} MiB free, about "
            f"{need / 2**20:,.1f} MiB needed for {rows:,} rows; free space there or move RETRO_RESULTS_URL"
        )


def resolve(run: JobRun) -> ModelVersionInfo:
    """The exact version the job was created for; never an alias that may have moved since.

    The API records the registry's answer on the job when it accepts the request, and every attempt and helper
    reads that record: a job scores the version its requester was shown, starts at once, and still runs while
    the registry is down. A version's signature and artifacts do not change. A job without the record (accepted
    before it was kept) asks the registry and records the answer, so only its first attempt asks.
    """
    if run.spec.model_info is not None:
        return ModelVersionInfo.from_record(run.spec.model_info)
    model = run.adapters.registry.resolve(name=run.spec.model_name, version=run.spec.model_version)
    run.record_model(model)
    return model


def history_query(run: JobRun, models: list[JobModel]) -> HistoryQuery:
    """The job's period of history: its id and date columns and the models' inputs (each once: the history is read
    once for every model); point-in-time with a population."""
    spec = run.spec
    return HistoryQuery(
        table=spec.source_table,
        date_column=spec.date_column,
        id_columns=spec.id_columns,
        features=compared_inputs([m.model for m in models]) if len(models) > 1 else models[0].model.inputs,
        start=spec.period_start,
        end=spec.period_end,
        population=population_join(run),
    )


def population_join(run: JobRun) -> PopulationJoin | None:
    """The job's population as the point-in-time query reads it: the stored copy, and its staging table's name."""
    record = run.spec.population
    if record is None:
        return None
    return PopulationJoin(
        file=run.adapters.store.local_path(record.path, cache_dir=run.settings.var_dir / "populations"),
        as_of_column=record.as_of_column,
        outcome_column=record.outcome_column,
        lookback_days=record.lookback_days,
        staging_table=staging_table(run.settings.hive_scratch_database, run.job_id),
    )


def extract(run: JobRun, models: list[JobModel]) -> HistoryQuery:
    """Check the source schema (and stage a population), before any model is deployed."""
    query = history_query(run, models)
    source = run.adapters.source
    source.check_schema(query)
    if query.population is not None:
        source.stage(query)  # dropped on every path: run_retro_test's release, else the reaper
    return query


def count_period(run: JobRun, query: HistoryQuery) -> int | None:
    """The period's rows; a period without any is refused.

    A resumed attempt keeps the first attempt's count (a COUNT over a long period can take minutes in Hive);
    publishing compares it with the rows read, so a source that changed in between still fails the job.
    """
    total = run.spec.rows_total if run.spec.rows_total is not None else run.adapters.source.count(query)
    if total == 0:
        raise SourceUnknown(
            f"history table {run.spec.source_table!r} has no rows between {run.spec.period_start} and "
            f"{run.spec.period_end}",
            field="period_start",
        )
    return total


def prepare_environment(run: JobRun, each: JobModel, model_dir: Path, *, plan: Plan) -> ModelEnvironment | None:
    """The model's own environment, from the worker's cache or built now; None with RETRO_MODEL_ENV=worker."""
    environments = run.adapters.environments
    if environments is None:
        return None
    if each.position is None:  # a comparing job entered the stage once for all its models
        run.enter(State.preparing_environment)

    def progress(step: str) -> None:
        run.control.check()
        plan.check()
        run.record_environment(EnvironmentRecord(step=step), position=each.position)

    model = each.model
    requirements = read_requirements(model_dir, what=f"model {model.name!r} version {model.version}")
    environment = environments.prepare(requirements, progress=progress)
    run.record_environment(environment.to_record(), position=each.position)
    return environment


def validate(run: JobRun, *, each: JobModel, reference: Reference | None, scorer: BatchScorer) -> None:
    """The deployment must score the model's reference as the reference says, before any partner row."""
    if reference is None:
        outcome = ValidationRecord(
            passed=None,
            source=None,
            note="not checked: the version has no retro.reference tag and no logged input example",
        )
    else:
        try:
            outcome = check(
                reference, scorer=scorer, features=each.model.inputs, tolerance=run.settings.reference_tolerance
            )
        except ReferenceMismatch as exc:
            failed = ValidationRecord.read(exc.outcome) if exc.outcome else None
            run.record_validation(failed or ValidationRecord(passed=False, note=exc.detail), position=each.position)
            raise
    run.record_validation(outcome, position=each.position)


@dataclass
class Serving:
    """A model's server and its client, inside deployed()."""

    each: JobModel
    deployment: Deployment
    scorer: BatchScorer
    reference: Future[Reference | None]
    warm: bool  # attached to a warm deployment of the pool, not started for this job
    validated: Callable[[], None]  # the reference check passed: other jobs may attach to it (with the pool on)
    stop: Callable[[], None] = lambda: None  # a compared model left out: its server goes at once


@contextlib.contextmanager
def serving_models(run: JobRun, prepared: list[Prepared], *, plan: Plan) -> Iterator[list[Serving]]:
    """A ready server for each model: the job's one model, or every compared model started side by side (at most
    RETRO_MAX_PARALLEL_DEPLOYMENTS at once); all stopped when the block exits, however it exits."""
    if len(prepared) == 1 and prepared[0].each.position is None:
        with deployed(run, prepared[0], plan=plan) as serving:
            yield [serving]
        return
    run.enter(State.deploying)

    def start(p: Prepared) -> tuple[contextlib.ExitStack, Serving]:
        own = contextlib.ExitStack()
        try:
            return own, own.enter_context(deployed(run, p, plan=plan))
        except BaseException:
            own.close()
            raise

    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(run.settings.max_parallel_deployments, thread_name_prefix="deploy") as pool:
            started = [pool.submit(contextvars.copy_context().run, start, p) for p in prepared]
        servings, failures, fatal = [], [], []
        for p, future in zip(prepared, started, strict=True):
            try:
                own, serving = future.result()
            except (DeploymentFailed, ModelServerDown) as exc:
                failures.append((p.each, exc))
                continue
            except BaseException as exc:  # raised once every server that did start is on the stack
                fatal.append(exc)
                continue
            stack.enter_context(own)
            serving.stop = own.close
            servings.append(serving)
        if fatal:
            raise fatal[0]
        for each, failure in failures:
            leave_out(run, each, failure, others=len(servings))
        yield servings


@contextlib.contextmanager
def deployed(run: JobRun, prepared: Prepared, *, plan: Plan) -> Iterator[Serving]:
    """A ready model server for the model: a warm one from the pool (worker/warm.py) or a new one.

    Without the pool (RETRO_WARM_TTL_S=0) it is torn down when the block exits, however it exits. With it, the job
    detaches when the block exits: the deployment stays warm for the next job, unless it went down or failed its
    check (then it is stopped), or the pool lets it go. A job comparing models starts a server of its own for each
    (the pool holds one job per deployment), named after the job and the model's position.
    """
    each, environment, model = prepared.each, prepared.environment, prepared.each.model
    deployer = run.adapters.deployer
    pool = WarmPool(sessions=run.sessions, deployer=deployer, settings=run.settings)
    pooled = pool.enabled and each.position is None
    key = pool_key(model, environment, run.settings)
    if each.position is None:  # a comparing job entered the stage once for all its models
        run.enter(State.deploying)
    deployment = pool.attach(key=key, job_id=run.job_id) if pooled else None
    warm = deployment is not None
    name = deployment.name if deployment is not None else deployment_name(run.job_id, position=each.position)
    # Record the name before creating anything, so a reaper can find it if this process dies.
    if pooled and not warm:
        name = pool.register(name=name, key=key, job_id=run.job_id, model=model)
    run.record_deployment(name, warm=warm, position=each.position)
    alive = DEPLOYMENTS_ALIVE.labels(run.settings.deployer)
    alive.inc()
    broken = False
    try:
        if deployment is None:
            deployment = deployer.start(name=name, job_id=str(run.job_id), model=model, environment=environment)
            try:
                deployer.wait_ready(
                    deployment,
                    timeout_s=run.settings.deploy_ready_timeout_s,
                    should_stop=lambda: run.control.cancel_requested() or plan.refused(),
                )
            except JobCancelled:
                plan.check()  # the count refused the job while its server started: that is why it stopped
                raise
        else:
            log.info("retro test %s: attached to warm deployment %s", run.job_id, name)
        ready = deployment
        with open_scorer(run, deployment=ready, model=model) as scorer:
            run.record_protocol(scorer.protocol, position=each.position)
            yield Serving(
                each=each,
                deployment=ready,
                scorer=scorer,
                reference=prepared.reference,
                warm=warm,
                validated=(lambda: pool.mark_ready(ready)) if pooled else (lambda: None),
            )
    except (ModelServerDown, DeploymentFailed):
        broken = True
        raise
    finally:
        alive.dec()
        _leave(run, pool if pooled else None, name=name, broken=broken)


def _leave(run: JobRun, pool: WarmPool | None, *, name: str, broken: bool) -> None:
    """The job is done with its deployment: detach from the pool, or stop it without one. Never raises: the job's
    outcome stands, and what could not be stopped the reaper stops once the job is terminal."""
    try:
        if pool is not None:
            pool.release(name=name, job_id=run.job_id, broken=broken)
        else:
            run.adapters.deployer.stop(name)
    except Exception:
        log.exception("could not stop or release deployment %s of retro test %s; the reaper will", name, run.job_id)


def open_scorer(run: JobRun, *, deployment: Deployment, model: ModelVersionInfo) -> BatchScorer:
    """A client for the deployment in RETRO_SCORE_PROTOCOL, or the fastest protocol it serves (auto)."""
    return SCORERS[choose_protocol(deployment, run.settings.score_protocol)](
        deployment=deployment,
        features=model.inputs,
        output_names=model.outputs,
        options=ScoringOptions.from_settings(run.settings),
        should_stop=run.control.stop_now,
        server_gone=lambda: run.adapters.deployer.has_exited(deployment.name),
    )


def split_ranges(chunks: list[Chunk], parts: int) -> list[list[Chunk]]:
    """Contiguous runs of chunks, as even as can be, at most `parts` of them."""
    parts = max(1, min(parts, len(chunks)))
    size, extra = divmod(len(chunks), parts)
    ranges, at = [], 0
    for i in range(parts):
        n = size + (1 if i < extra else 0)
        ranges.append(chunks[at : at + n])
        at += n
    return [r for r in ranges if r]


def score_period(run: JobRun, *, query: HistoryQuery, chunks: list[Chunk], servings: list[Serving]) -> None:
    """Score every chunk of the period not yet committed, alone or with RETRO_PARTITIONS - 1 helper workers.

    Helpers each get a date range; this attempt scores the first range, then every chunk still open from the
    end of the period backwards. A helper that never starts or dies costs nothing but its share of the time, and
    a live one meets this attempt inside its range, where at most the chunk both are on is scored twice (the
    first commit wins). When this returns, every chunk is committed. A job comparing models scores each batch
    with every model (app/integrations/scoring/several.py), alone: a helper serves one deployment.
    """
    send = run.adapters.send_partition if not run.spec.models else None
    done = run.committed_keys()
    pending = [c for c in chunks if c.key not in done]
    ranges = split_ranges(pending, run.settings.partitions if send else 1)
    order = ranges[0] if ranges else []
    for part in ranges[1:]:
        assert send is not None
        send(
            PartitionOrder(
                job_id=run.job_id,
                lease=run.control.lease,
                deployment=servings[0].deployment,
                first=part[0].key,
                last=part[-1].key,
            )
        )
        log.info("retro test %s: chunks %s to %s sent to a helper worker", run.job_id, part[0].key, part[-1].key)
    for part in reversed(ranges[1:]):
        order += list(reversed(part))
    with _job_scorer(run, servings) as scorer:
        score_chunks(run, query=query, chunks=order, scorer=scorer, live_progress=len(ranges) <= 1)
    # A helper's commit may have passed the reject budget; its own error went only to its log.
    enforce_reject_budgets(run, run.tally())


@contextlib.contextmanager
def _job_scorer(run: JobRun, servings: list[Serving]) -> Iterator[Scorer]:
    """The job's one model's scorer, or one that scores each batch with every compared model."""
    if not run.spec.models:
        yield servings[0].scorer
        return
    scorer = ModelsScorer(
        [
            ComparedScorer(
                scorer=s.scorer, column_prefix=s.each.column_prefix, label=s.each.short, outputs=s.each.model.outputs
            )
            for s in servings
        ]
    )
    try:
        yield scorer
    finally:
        scorer.close()


def score_partition(
    *, order: PartitionOrder, sessions: sessionmaker[Session], adapters: Adapters, settings: Settings
) -> str:
    """A helper worker's share of a job: score its range while the coordinating attempt holds the lease.

    The helper gives no verdict. Whatever stops it (the lease moved on, a cancel, the model server gone, a
    scoring failure) only ends its share early: the coordinator scores every chunk left open. Returns what
    happened, for the log.
    """
    spec = job_row.partition_spec(sessions=sessions, job_id=order.job_id, lease=order.lease)
    if spec is None:
        return "stale: the job ended or another attempt owns it"
    own = ChunkCounts()
    try:
        with _control(spec, sessions=sessions, lease=order.lease, settings=settings, heartbeat=False) as control:
            run = JobRun(spec=spec, control=control, adapters=adapters, settings=settings, sessions=sessions)
            model = resolve(run)
            query = history_query(run, [JobModel(model)])
            chunks = plan_chunks(run, query)
            mine = [c for c in chunks if order.first <= c.key <= order.last]
            with open_scorer(run, deployment=order.deployment, model=model) as scorer:
                score_chunks(run, query=query, chunks=mine, scorer=scorer, live_progress=False, tally=own)
    except (LeaseLost, JobCancelled) as exc:
        return f"this helper scored {own.read} rows, then stopped: {exc}"
    except AppError as exc:
        # the job ended or moved on while this helper was scoring
        if not job_row.holds_lease(sessions=sessions, job_id=order.job_id, lease=order.lease):
            return f"this helper scored {own.read} rows, then the job moved on ({exc.detail})"
        log.warning(
            "partition %s..%s of retro test %s stopped: %s; its coordinator scores the rest",
            order.first,
            order.last,
            order.job_id,
            exc.detail,
        )
        return f"this helper scored {own.read} rows, then stopped: {exc.detail}"
    return f"this helper scored {own.read} rows, its whole range"
