"""One attempt at one job, as every stage sees it: what the job asks (JobSpec), the lease, the adapters, the
settings; and the order that hands a helper worker its share of a job (PartitionOrder).

This module is the one writer of a running job. Stages call JobRun's methods (`run.enter(state)`,
`run.record_environment(...)`, `run.commit_chunk(...)`, `run.succeed(...)`), and the attempt's claim, heartbeat
and verdict go through the functions below; each is one short transaction of its own, never held across a call
to an outside system. The SQL is app/retro_tests/runs.py's (one owner per row); no other worker module opens a
transaction on the job or calls runs' functions (scripts/check_layers.py holds that).

Where the lease is checked is runs.py's: a chunk commit (the job row locked, so a chunk is recorded exactly once),
the verdict and success, the heartbeat; entering a stage and recording a fact check a cancel, not the lease (an
attempt that lost its lease finds out at its next heartbeat, checkpoint or verdict, and writes no verdict).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.core.jobs import State
from app.core.model_types import ModelVersionInfo
from app.core.records import ChunkPlanRecord, EnvironmentRecord, ValidationRecord
from app.db import once_more_if_dropped
from app.integrations.deployers.port import Deployer, Deployment
from app.integrations.environments.cache import EnvironmentCache
from app.integrations.history.port import HistorySource
from app.integrations.registry.mlflow import MlflowRegistry
from app.integrations.storage.results import ResultStore
from app.retro_tests import runs
from app.retro_tests.runs import (
    Beat,
    ChunkRecord,
    Claim,
    Counts,
    JobSpec,
    LeaseLost,
    ModelFacts,
    ResultFileRecord,
    Tally,
)
from worker.control import JobControl, holder_is_dead, this_process

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class PartitionOrder:
    """A helper's share of a job: the chunks from `first` to `last` (chunk keys), against `deployment`."""

    job_id: uuid.UUID
    lease: str
    deployment: Deployment
    first: str
    last: str

    def to_message(self) -> dict[str, Any]:
        return {
            "job_id": str(self.job_id),
            "lease": self.lease,
            "deployment": asdict(self.deployment),
            "first": self.first,
            "last": self.last,
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> PartitionOrder:
        return cls(
            job_id=uuid.UUID(message["job_id"]),
            lease=message["lease"],
            deployment=Deployment(**message["deployment"]),
            first=message["first"],
            last=message["last"],
        )


@dataclass(frozen=True)
class JobModel:
    """A model the job scores every row with: the job's one model (position None: its facts are on the job row), or
    one of the models it compares (position 0, 1, ...: on that model's row; its columns start with the prefix)."""

    model: ModelVersionInfo
    position: int | None = None
    column_prefix: str = ""

    @property
    def label(self) -> str:
        """As messages name it: model churn version 7."""
        return f"model {self.model.name} version {self.model.version}"

    @property
    def short(self) -> str:
        """As the rejects and the report name it: churn v7."""
        return f"{self.model.name} v{self.model.version}"


@dataclass
class Adapters:
    """The outside systems one job talks to."""

    registry: MlflowRegistry
    source: HistorySource
    deployer: Deployer
    store: ResultStore
    # Sends a partition of a job to another worker; None: this job's worker scores every chunk itself.
    send_partition: Callable[[PartitionOrder], None] | None = None
    # Builds and keeps each model's own environment; None: models are served from the worker's packages.
    environments: EnvironmentCache | None = None


@dataclass(frozen=True)
class JobRun:
    """An attempt (or a partition helper) at a job: every stage takes one of these."""

    spec: JobSpec
    control: JobControl
    adapters: Adapters
    settings: Settings
    sessions: sessionmaker[Session]

    @property
    def job_id(self) -> uuid.UUID:
        return self.spec.id

    def _write(self, write: Callable[..., T], **fact: Any) -> T:
        """One of runs' functions on this job, in a short transaction of its own."""
        return self._transact(lambda s: write(session=s, job_id=self.job_id, **fact))

    def _transact(self, work: Callable[[Session], T]) -> T:
        return _transact(self.sessions, work, job_id=self.job_id)

    # --- the job's stages and the facts an attempt learns (a cancel asked meanwhile stops the attempt) ---

    def enter(self, state: State) -> None:
        """Move the job to its next stage; a cancel asked meanwhile stops it here (JobCancelled)."""
        self._write(runs.enter_stage, state=state)
        log.info("retro test %s: %s", self.job_id, state.value)  # the log's timestamps show each stage's time

    def record_model(self, model: ModelVersionInfo) -> None:
        self._write(runs.record_model, model=model)

    def record_plan(self, *, rows_total: int | None, chunks_total: int) -> None:
        self._write(runs.record_plan, rows_total=rows_total, chunks_total=chunks_total)

    def record_days_without_history(self, days: list[date]) -> None:
        self._write(runs.record_days_without_history, days=days)

    def keep_chunk_plan(self, plan: ChunkPlanRecord) -> ChunkPlanRecord:
        """Keep the plan unless the job has one already; returns the plan the job has (the first one wins)."""
        return self._write(runs.record_chunk_plan, plan=plan)

    # A fact of one model: of the job's one model on the job row (position None), or of one model of a job that
    # compares several (position 0, 1, ...) on that model's row.

    def record_deployment(self, name: str, *, warm: bool | None = None, position: int | None = None) -> None:
        if position is None:
            self._write(runs.record_deployment, name=name, warm=warm)
        else:
            self._model_facts(position, ModelFacts(deployment_name=name))

    def record_environment(self, environment: EnvironmentRecord, *, position: int | None = None) -> None:
        if position is None:
            self._write(runs.record_environment, environment=environment)
        else:
            self._model_facts(position, ModelFacts(environment=environment))

    def record_validation(self, validation: ValidationRecord, *, position: int | None = None) -> None:
        if position is None:
            self._write(runs.record_validation, validation=validation)
        else:
            self._model_facts(position, ModelFacts(validation=validation))

    def record_protocol(self, protocol: str, *, position: int | None = None) -> None:
        if position is None:
            self._write(runs.record_protocol, protocol=protocol)
        else:
            self._model_facts(position, ModelFacts(score_protocol=protocol))

    def record_left_out(self, position: int, *, code: str, message: str) -> None:
        """One model of a comparing job failed, and the job goes on without it (allow_partial)."""
        self._model_facts(position, ModelFacts(error=(code, message)))

    def _model_facts(self, position: int, facts: ModelFacts) -> None:
        self._write(runs.record_model_facts, position=position, facts=facts)

    # --- chunks: the checkpoint ---

    def committed_keys(self) -> set[str]:
        """The keys of the job's chunks already committed, by any attempt or helper."""
        return self._write(runs.committed_keys)

    def committed(self) -> tuple[set[str], Counts]:
        """The committed chunks' keys and their rows added up, as one snapshot."""
        return self._transact(
            lambda s: (
                runs.committed_keys(session=s, job_id=self.job_id),
                runs.committed_counts(session=s, job_id=self.job_id),
            )
        )

    def commit_chunk(self, chunk: ChunkRecord) -> Tally | None:
        """Record a finished chunk and the job's totals (the checkpoint), if this attempt still holds the lease.

        None when another copy of the chunk was committed first; LeaseLost when another attempt owns the job.
        """
        return self._write(runs.record_chunk, lease=self.control.lease, chunk=chunk)

    def tally(self) -> Tally:
        return self._write(runs.tally)

    def to_publish(self) -> tuple[list[ChunkRecord], Tally]:
        """The committed chunks in the order of the period and the job's tally, as one snapshot."""
        return self._transact(
            lambda s: (runs.committed_chunks(session=s, job_id=self.job_id), runs.tally(session=s, job_id=self.job_id))
        )

    # --- the verdict ---

    def succeed(self, *, files: list[ResultFileRecord], location: str) -> None:
        """The result files and the verdict in one transaction; LeaseLost when another attempt owns the job."""

        def record(s: Session) -> State:
            runs.record_results(session=s, job_id=self.job_id, files=files, location=location)
            return runs.finish(session=s, job_id=self.job_id, lease=self.control.lease, state=State.succeeded)

        if self._transact(record) != State.succeeded:
            raise LeaseLost(f"retro test {self.job_id} was taken over by another attempt while publishing")


def _transact(sessions: sessionmaker[Session], work: Callable[[Session], T], *, job_id: uuid.UUID) -> T:
    """work(session) in a short transaction of its own, sent once more if the database dropped the connection
    under it (app/db.py once_more_if_dropped). Every write here may go twice: a chunk is recorded once, a stage may
    be entered again, results are replaced, a verdict on a finished job is kept."""

    def once() -> T:
        with _transaction(sessions) as s:
            return work(s)

    return once_more_if_dropped(once, what=f"retro test {job_id}")


@contextlib.contextmanager
def _transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A short transaction on the database: never held across a call to an outside system."""
    with sessions() as session, session.begin():
        yield session


# --- what an attempt writes before it has a JobRun, or without one ---


def claim(*, sessions: sessionmaker[Session], job_id: uuid.UUID, settings: Settings) -> Claim | None:
    """Take the job's lease for this attempt, unless it is finished or another live attempt holds it."""
    with _transaction(sessions) as s:
        return runs.claim(
            session=s,
            job_id=job_id,
            holder=this_process(),
            stale_after_s=settings.stale_after_s,
            holder_is_dead=holder_is_dead,
        )


def finish(
    *, sessions: sessionmaker[Session], job_id: uuid.UUID, lease: str, state: State, error: tuple[str, str] | None
) -> State:
    """Record the verdict, if `lease` still holds the job, and release the lease; returns the job's state."""
    return _transact(
        sessions, lambda s: runs.finish(session=s, job_id=job_id, lease=lease, state=state, error=error), job_id=job_id
    )


def beat(
    *, sessions: sessionmaker[Session], job_id: uuid.UUID, lease: str, progress: Counts | None, heartbeat: bool
) -> Beat:
    """Renew the heartbeat (if `heartbeat`) and the live counters while `lease` still holds the job."""
    with _transaction(sessions) as s:
        return runs.beat(session=s, job_id=job_id, lease=lease, progress=progress, heartbeat=heartbeat)


def holds_lease(*, sessions: sessionmaker[Session], job_id: uuid.UUID, lease: str) -> bool:
    with sessions() as s:
        return runs.holds_lease(session=s, job_id=job_id, lease=lease)


def partition_spec(*, sessions: sessionmaker[Session], job_id: uuid.UUID, lease: str) -> JobSpec | None:
    """The job a helper was sent a share of, or None when `lease` no longer holds it (the job ended or moved on)."""
    with sessions() as s:
        if not runs.holds_lease(session=s, job_id=job_id, lease=lease):
            return None
        return runs.load_spec(session=s, job_id=job_id)


def mark_requeued(session: Session, job_id: uuid.UUID, *, at: datetime) -> None:
    """The reconciler's one write: a stranded job sent to the workers again, in the reconciler's own transaction
    (the one that found the job and locked its row)."""
    runs.mark_requeued(session=session, job_id=job_id, at=at)
