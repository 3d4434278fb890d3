"""Build each outside-system adapter from settings, once per process."""

from __future__ import annotations

from functools import lru_cache

from app.config import Settings, get_settings
from app.integrations.deployers.local import LocalMLServerDeployer
from app.integrations.deployers.port import Deployer
from app.integrations.environments.cache import EnvironmentCache, environment_cache
from app.integrations.environments.sandbox import ModelSandbox
from app.integrations.history.local import LocalParquetSource
from app.integrations.history.port import HistorySource
from app.integrations.registry.mlflow import MlflowRegistry
from app.integrations.storage.results import ResultStore


def make_registry(settings: Settings) -> MlflowRegistry:
    return MlflowRegistry(tracking_uri=settings.resolved_tracking_uri(), registry_uri=settings.resolved_registry_uri())


def make_history_source(settings: Settings) -> HistorySource:
    if settings.history_source == "hive":
        from app.integrations.history.hive import HiveSource, settings_from

        return HiveSource(settings_from(settings))
    return LocalParquetSource(
        root=settings.resolved_history_dir(),
        memory_limit=settings.history_memory_limit,
        spill_dir=settings.resolved_spill_dir(),
    )


def make_deployer(settings: Settings) -> Deployer:
    if settings.deployer == "local":
        return LocalMLServerDeployer(
            work_dir=(settings.var_dir / "deployments").resolve(),
            executable=settings.mlserver_executable,
            ttl_s=settings.deployment_ttl_s,
            sandbox=ModelSandbox(settings.model_sandbox),
        )
    from app.integrations.deployers.operators import KUBERNETES_DEPLOYERS

    return KUBERNETES_DEPLOYERS[settings.deployer](settings=settings)


def make_environments(settings: Settings) -> EnvironmentCache | None:
    """The worker's cache of model environments; None when models are served from the worker's own packages."""
    return environment_cache(settings)


def make_result_store(settings: Settings) -> ResultStore:
    return ResultStore(settings.resolved_results_url())


@lru_cache
def get_registry() -> MlflowRegistry:
    """The process-wide registry client."""
    return make_registry(get_settings())


@lru_cache
def get_history_source() -> HistorySource:
    """The process-wide history source (the API asks it which days have history)."""
    return make_history_source(get_settings())


@lru_cache
def get_result_store() -> ResultStore:
    """The process-wide result store."""
    return make_result_store(get_settings())
