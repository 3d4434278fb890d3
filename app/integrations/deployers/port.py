"""Temporary model deployments: start exactly one model version, wait until it serves, stop it.

Each deployment has a name derived from the job, so any process (the worker, a cancel, the reaper)
can stop it by name, and stop is idempotent. Each also records its job id and an expiry time, so the
reaper can find deployments whose job ended without them (a worker killed mid-job).

Implementations: LocalMLServerDeployer in local.py (an MLServer process on this machine); Seldon Core v1,
Seldon Core v2 and KServe in seldon_v1.py, seldon_v2.py and kserve.py (on kubernetes.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from app.core.model_types import ModelVersionInfo
from app.integrations.environments.cache import ModelEnvironment


@dataclass(frozen=True)
class Deployment:
    """A running model server that accepts inference requests."""

    name: str
    base_url: str  # its REST endpoint
    model_name: str
    protocol: str = "v2"  # what its REST endpoint speaks: "v2" (Open Inference Protocol) or "seldon"
    headers: dict[str, str] = field(default_factory=dict)
    grpc_target: str | None = None  # host:port of its V2 gRPC endpoint, where it serves one

    @property
    def protocols(self) -> tuple[str, ...]:
        """The protocols a scorer can speak to it (RETRO_SCORE_PROTOCOL values), fastest first."""
        if self.protocol == "seldon":
            return ("seldon",)
        return ("v2-grpc", "v2-rest") if self.grpc_target else ("v2-rest",)


@dataclass(frozen=True)
class ManagedDeployment:
    """A deployment this service created, as the reaper sees it."""

    name: str
    job_id: str | None  # None when it cannot be told (then the reaper treats the job as missing)
    expires_at: float | None  # unix seconds; None: never expires on its own


class Deployer(Protocol):
    """Starts and stops temporary model deployments."""

    def start(
        self, *, name: str, job_id: str, model: ModelVersionInfo, environment: ModelEnvironment | None = None
    ) -> Deployment:
        """Create the deployment for the job; return at once, before it is ready.

        With an environment, the model server runs from the model's own packages (app/integrations/environments/cache.py);
        without, from the server's default ones.
        """

    def wait_ready(self, deployment: Deployment, *, timeout_s: float, should_stop: Callable[[], bool]) -> None:
        """Block until the deployment serves, it fails, should_stop() is true, or the deadline passes."""

    def stop(self, name: str) -> None:
        """Tear the deployment down; a deployment that is already gone is fine."""

    def list_managed(self) -> list[ManagedDeployment]:
        """Every deployment this service created that still exists."""

    def has_exited(self, name: str) -> bool:
        """True when the deployment is known to be gone for good (its process exited); False when alive or unsure.

        Asked when a request to it fails, so it must be quick: a deployer that cannot tell at once says False,
        and retries decide.
        """


_DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def deployment_name(job_id: object, *, position: int | None = None) -> str:
    """A DNS-1123 label (<= 63 characters) unique to the job: 96 bits of its id (and, for one of the models a job
    compares, its position: -m0, -m1, ...)."""
    name = f"retro-{str(job_id).replace('-', '').lower()[:24]}"
    if position is not None:
        name += f"-m{position}"
    if not _DNS_1123_LABEL.fullmatch(name):
        raise ValueError(f"cannot derive a deployment name from job id {job_id!r}")
    return name
