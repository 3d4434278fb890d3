"""A retrotest Celery worker whose model servers sit behind a fault-injecting proxy (the chaos suite's worker).

    python -m tests.chaos.worker        # RETRO_CHAOS_FAULTS=1 turns the faults on; RETRO_CHAOS_WORKER_NAME names it

The proxy runs inside this process, so killing the worker kills the proxy too, as a crashed node would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from app.core.model_types import ModelVersionInfo
from app.integrations import wiring
from app.integrations.deployers.port import Deployer, Deployment, ManagedDeployment
from app.integrations.environments.cache import ModelEnvironment
from tests.chaos.fault_proxy import FaultProxy, Faults


class FaultyDeployer:
    """Wraps a real deployer; every deployment is reached through its own FaultProxy."""

    def __init__(self, inner: Deployer, faults: Callable[[], Faults]) -> None:
        self._inner = inner
        self._faults = faults
        self._proxies: dict[str, FaultProxy] = {}

    def start(
        self, *, name: str, job_id: str, model: ModelVersionInfo, environment: ModelEnvironment | None = None
    ) -> Deployment:
        deployment = self._inner.start(name=name, job_id=job_id, model=model, environment=environment)
        old = self._proxies.pop(name, None)
        if old is not None:
            old.stop()
        proxy = FaultProxy(deployment.base_url, self._faults()).start()
        self._proxies[name] = proxy
        # The proxy speaks HTTP: the job scores over V2 REST through it (no gRPC endpoint offered).
        return replace(deployment, base_url=proxy.url, grpc_target=None)

    def wait_ready(self, deployment: Deployment, *, timeout_s: float, should_stop: Callable[[], bool]) -> None:
        # Readiness is asked of the real server: the faults are for inference requests.
        real = replace(deployment, base_url=self._proxies[deployment.name].target)
        self._inner.wait_ready(real, timeout_s=timeout_s, should_stop=should_stop)

    def stop(self, name: str) -> None:
        proxy = self._proxies.pop(name, None)
        if proxy is not None:
            proxy.stop()
        self._inner.stop(name)

    def list_managed(self) -> list[ManagedDeployment]:
        return self._inner.list_managed()

    def has_exited(self, name: str) -> bool:
        return self._inner.has_exited(name)


def faults_from_env() -> Faults:
    return Faults(
        unavailable=float(os.environ.get("RETRO_CHAOS_P_503", "0.05")),
        hang=float(os.environ.get("RETRO_CHAOS_P_HANG", "0.01")),
        reset=float(os.environ.get("RETRO_CHAOS_P_RESET", "0.01")),
        hang_s=float(os.environ.get("RETRO_CHAOS_HANG_S", "8")),
        seed=os.getpid(),
    )


def main() -> None:
    if os.environ.get("RETRO_CHAOS_FAULTS") == "1":
        real = wiring.make_deployer

        def make_deployer(settings: Any) -> Deployer:
            return FaultyDeployer(real(settings), faults_from_env)

        wiring.make_deployer = make_deployer  # before worker.tasks imports it
    from app.cli import app as cli

    cli(
        [
            "worker",
            "--concurrency",
            os.environ.get("RETRO_CHAOS_CONCURRENCY", "1"),
            "--name",
            os.environ.get("RETRO_CHAOS_WORKER_NAME", "retrotest"),
        ]
    )


if __name__ == "__main__":
    main()
