"""One attempt at one job, as every stage sees it: what the job asks (JobSpec), the lease, the adapters, the
settings, and short transactions on the job's row (app/retro_tests/runs.py does the writing); and the order that
hands a helper worker its share of a job (PartitionOrder)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.integrations.deployers.port import Deployer, Deployment
from app.integrations.environments.cache import EnvironmentCache
from app.integrations.history.port import HistorySource
from app.integrations.registry.mlflow import MlflowRegistry
from app.integrations.storage.results import ResultStore
from app.retro_tests.runs import JobSpec
from worker.control import JobControl


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

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A short transaction on the database: never held across a call to an outside system."""
        with self.sessions() as session, session.begin():
            yield session
