"""Settings: one class, read from environment variables prefixed RETRO_."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

OutputFormat = Literal["parquet", "csv.gz"]


class Settings(BaseSettings):
    """Everything configurable. Defaults are the embedded, single-machine setup."""

    model_config = SettingsConfigDict(env_prefix="RETRO_", env_file=None, extra="ignore")

    env: Literal["dev", "test", "prod"] = "dev"
    var_dir: Path = Path("var")

    # Storage of jobs. SQLite is the embedded default; Postgres in production.
    database_url: str = ""
    # Celery broker. Embedded default: kombu's SQLAlchemy transport on SQLite (no server).
    broker_url: str = ""
    queue_name: str = "retrotest"

    # MLflow registry.
    mlflow_tracking_uri: str = ""
    mlflow_registry_uri: str = ""
    registry_timeout_s: float = 10.0

    # Request validation.
    max_period_days: int = Field(default=366, ge=1)

    # Where feature history lives: "local" (DuckDB over Parquet) or "hive".
    history_source: Literal["local", "hive"] = "local"
    history_dir: Path | None = None
    read_batch_rows: int = Field(default=50_000, ge=1)
    chunk_days: int = Field(default=1, ge=1)

    # Temporary model deployments: "local" starts an MLServer process on this machine.
    deployer: Literal["local"] = "local"
    mlserver_executable: str = "mlserver"
    deploy_ready_timeout_s: float = Field(default=180.0, gt=0)

    # Scoring over the Open Inference Protocol (V2).
    score_batch_rows: int = Field(default=5_000, ge=1)
    score_concurrency: int = Field(default=4, ge=1)
    score_timeout_s: float = Field(default=60.0, gt=0)
    score_retries: int = Field(default=5, ge=0)
    score_backoff_s: float = Field(default=0.5, ge=0)
    max_rejected_rows: int = Field(default=0, ge=0)

    # Results: a local directory or any fsspec URL (s3://bucket/prefix with s3fs installed).
    results_url: str = ""
    output_formats: list[OutputFormat] = ["parquet", "csv.gz"]

    # Public base URL of the API, used in links printed for people.
    public_base_url: str = "http://127.0.0.1:8000"
    secret_key: SecretStr = SecretStr("dev-only-change-me")

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.var_dir.resolve() / 'retrotest.db'}"

    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.var_dir.resolve() / 'broker.db'}"

    def resolved_tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.var_dir.resolve() / 'mlflow.db'}"

    def resolved_registry_uri(self) -> str:
        return self.mlflow_registry_uri or self.resolved_tracking_uri()

    def resolved_history_dir(self) -> Path:
        return (self.history_dir or self.var_dir / "history").resolve()

    def resolved_results_url(self) -> str:
        return self.results_url or str((self.var_dir / "results").resolve())

    def check_secrets(self) -> None:
        """Fail fast on placeholder secrets outside dev and test."""
        if self.env == "prod" and self.secret_key.get_secret_value() == "dev-only-change-me":
            raise RuntimeError("RETRO_SECRET_KEY must be set to a real secret when RETRO_ENV=prod")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
