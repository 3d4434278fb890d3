"""Warm deployments: a job's model server outlives the job, and the next job of the same model attaches to it.

What makes two deployments the same is the pool key: the model version and its artifacts, the environment it runs
from, the deployer and every setting that shapes what the deployer creates. A job looks for a ready deployment of
its key with room for it (RETRO_WARM_SHARE jobs at once) and attaches; otherwise it starts one under its own name
(deployment_name(job id), as without the pool), registered in the pool before it is created. Either way the job
checks the deployment against the model's reference before scoring (worker/validation.py): a warm deployment that
fails that check or goes down is taken out of the pool and stopped, and the job starts a new one. A deployment
becomes ready for other jobs only once its first job's check has passed.

When a job ends (success, failure, cancel) it detaches; the deployment stays warm for RETRO_WARM_TTL_S after its
last job left, unless the pool holds more than RETRO_WARM_MAX deployments (idle ones go least recently used
first). Nothing of a job lives in a deployment: it serves the model, and every job's rows travel only in its own
requests. The rows are in app/retro_tests/warm_pool.py; beat's reaper (worker/reaper.py) expires idle deployments,
detaches jobs whose worker was killed, and stops deployments the pool no longer knows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from sqlalchemy.orm import Session, sessionmaker

from app.clock import utcnow
from app.config import Settings
from app.core.model_types import ModelVersionInfo
from app.integrations.deployers.local import LocalMLServerDeployer
from app.integrations.deployers.port import Deployer, Deployment, deployment_name
from app.integrations.environments.cache import ModelEnvironment
from app.metrics import WARM_POOL
from app.retro_tests import warm_pool

log = logging.getLogger(__name__)

# Settings that shape what a deployer creates or where it is reached: a deployment started under other values is
# another deployment. (Scoring settings such as batch size or timeouts only shape the client, so they are not here.)
_DEPLOYMENT_SETTINGS = ("deployer", "mlserver_executable", "model_env", "model_sandbox", "seldon_parameters")
_DEPLOYMENT_PREFIXES = ("k8s_", "seldon_", "kserve_", "model_staging_")


def pool_key(model: ModelVersionInfo, environment: ModelEnvironment | None, settings: Settings) -> str:
    """What makes two deployments the same, as a sha256: model version and artifacts, environment, deployer settings."""
    shaping = {
        name: value
        for name, value in settings.model_dump(mode="json").items()
        if name in _DEPLOYMENT_SETTINGS or name.startswith(_DEPLOYMENT_PREFIXES)
    }
    identity = {
        "model": [model.name, model.version, model.run_id, model.artifact_uri],
        "environment": environment.key if environment else None,
        "settings": shaping,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def pool_host(settings: Settings) -> str:
    """Where a deployment can be reached from: a local server only from its own host; a cluster's from anywhere."""
    return socket.gethostname() if settings.deployer == "local" else ""


@dataclass
class WarmPool:
    """The pool as one job sees it; every call is a short transaction of its own."""

    sessions: sessionmaker[Session]
    deployer: Deployer
    settings: Settings

    @property
    def enabled(self) -> bool:
        return self.settings.warm_ttl_s > 0

    def attach(self, *, key: str, job_id: uuid.UUID) -> Deployment | None:
        """A ready deployment of the key, with this job attached to it; None when the pool has none for it."""
        with self.sessions.begin() as s:
            endpoint = warm_pool.attach(
                s,
                key=key,
                host=pool_host(self.settings),
                job_id=job_id,
                share=self.settings.warm_share,
                now=utcnow(),
            )
        WARM_POOL.labels("hit" if endpoint else "miss").inc()
        return Deployment(**endpoint) if endpoint else None

    def register(self, *, name: str, key: str, job_id: uuid.UUID, model: ModelVersionInfo) -> str:
        """Record a deployment this job is about to create; returns its name.

        The name is the job's own (deployment_name), and a leftover row of it, an earlier attempt's that was killed
        while starting it, is replaced (the deployer replaces that deployment too). But when an earlier attempt's
        deployment of that name serves other jobs now (it was full for this one), the job gets a name of its own.
        """
        with self.sessions.begin() as s:
            warm_pool.detach_job(s, job_id)
            if warm_pool.serves_jobs(s, name=name):
                name = deployment_name(uuid.uuid4())
            else:
                warm_pool.remove(s, name=name)
            new = warm_pool.NewWarm(
                name=name,
                key=key,
                deployer=self.settings.deployer,
                host=pool_host(self.settings),
                model_name=model.name,
                model_version=model.version,
            )
            warm_pool.register(s, new=new, job_id=job_id, now=utcnow())
        return name

    def mark_ready(self, deployment: Deployment) -> None:
        with self.sessions.begin() as s:
            warm_pool.mark_ready(s, name=deployment.name, endpoint=asdict(deployment))

    def release(self, *, name: str, job_id: uuid.UUID, broken: bool) -> None:
        """Detach the job; stop the deployment when it is broken, never became ready, or the pool lets it go."""
        if broken:
            with self.sessions.begin() as s:
                warm_pool.remove(s, name=name)
            WARM_POOL.labels("removed").inc()
            keep = False
        else:
            with self.sessions.begin() as s:
                keep = warm_pool.release(s, name=name, job_id=job_id, ttl_s=self.settings.warm_ttl_s, now=utcnow())
        if not keep:
            self._stop(name, "down or failed its check: out of the pool" if broken else "released by its last job")
        self.evict()

    def evict(self) -> list[tuple[str, str]]:
        """Stop idle deployments that expired or that the pool has no room for; returns (name, reason) of each."""
        with self.sessions.begin() as s:
            gone = warm_pool.evict(s, host=pool_host(self.settings), max_count=self.settings.warm_max, now=utcnow())
        for name, reason in gone:
            WARM_POOL.labels("evicted" if reason == "evicted" else "expired").inc()
            self._stop(name, reason)
        return gone + self._evict_over_memory()

    def _evict_over_memory(self) -> list[tuple[str, str]]:
        """Local servers: stop idle ones, least recently used first, while this host's warm servers hold more
        resident memory than RETRO_WARM_MAX_MEMORY_MB."""
        budget = self.settings.warm_max_memory_mb * 2**20
        if not isinstance(self.deployer, LocalMLServerDeployer) or not budget:
            return []
        host = pool_host(self.settings)
        with self.sessions() as s:
            held = {e.name: self.deployer.memory_bytes(e.name) for e in warm_pool.entries(s) if e.host == host}
            idle = warm_pool.idle_names(s, host=host)
        gone: list[tuple[str, str]] = []
        for name in idle:
            if sum(held.values()) <= budget:
                break
            with self.sessions.begin() as s:
                if not warm_pool.take_idle(s, name=name):
                    continue
            WARM_POOL.labels("evicted").inc()
            self._stop(name, f"over RETRO_WARM_MAX_MEMORY_MB ({held.pop(name, 0) / 2**20:,.0f} MB freed)")
            gone.append((name, "evicted"))
        return gone

    def drain(self, *, host_only: bool = False) -> list[tuple[str, str]]:
        """No job attaches to any deployment now (with host_only, to this host's local ones); idle ones stop at
        once, the others when their last job leaves. Returns what stopped now."""
        with self.sessions.begin() as s:
            warm_pool.drain(s, host=pool_host(self.settings) if host_only else None)
        return self.evict()

    def _stop(self, name: str, why: str) -> None:
        try:
            self.deployer.stop(name)
            log.info("warm pool: stopped deployment %s (%s)", name, why)
        except Exception:
            # Its row is gone: the reaper stops a deployment the pool does not know once its job is terminal.
            log.exception("warm pool: could not stop deployment %s (%s); the reaper will", name, why)


def maintain(
    *, sessions: sessionmaker[Session], deployer: Deployer, settings: Settings, live: Callable[[], set[str]]
) -> list[tuple[str, str]]:
    """Beat's share of the pool: detach jobs that ended without detaching, forget ready deployments that are gone
    (`live()`: the names the deployer still has), then stop the expired and the surplus. Returns what was stopped."""
    with sessions.begin() as s:
        detached = warm_pool.detach_ended_jobs(s, ttl_s=settings.warm_ttl_s, now=utcnow())
        known = warm_pool.names(s)
    if detached:
        log.info("warm pool: detached %d job(s) that ended while attached", detached)
    if known:
        alive = live()
        with sessions.begin() as s:
            for name in known - alive:
                if warm_pool.forget_if_ready(s, name=name):
                    log.info("warm pool: deployment %s is gone; removed from the pool", name)
    return WarmPool(sessions=sessions, deployer=deployer, settings=settings).evict()
