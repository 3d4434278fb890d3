"""Settings: one class, read from environment variables prefixed RETRO_."""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.key_strength import guessable_bits

OutputFormat = Literal["parquet", "csv.gz"]
MEMORY_SIZE = r"^[0-9]+(\.[0-9]+)? ?[KMGT]i?B$"  # a DuckDB memory limit: 512MB, 1.5GB, 256MiB


class Settings(BaseSettings):
    """Everything configurable. Defaults are the embedded, single-machine setup."""

    model_config = SettingsConfigDict(env_prefix="RETRO_", env_file=None, extra="ignore")

    env: Literal["dev", "test", "prod"] = "dev"
    var_dir: Path = Path("var")

    # Storage of jobs. SQLite is the embedded default; Postgres in production.
    database_url: str = ""
    # Database connections of each process. A request holds one only while it runs on a thread (app/db.py), so
    # threads beyond the pool would just wait their turn. No overflow by default: under steady load, connections
    # opened beyond the pool are closed as soon as they are returned and opened again, a new server process each
    # time. Per process: `retrotest serve` runs api_workers of them.
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=0, ge=0)
    db_pool_timeout_s: float = Field(default=30.0, gt=0)
    # Requests one API process serves at once; past it a request gets 503 + Retry-After at once (app/load_shedding.py;
    # /health, /ready and /metrics exempt). 0 turns shedding off.
    api_max_in_flight: int = Field(default=64, ge=0)
    # Reads that wait longer than this for their answer to start make the process serve fewer at once (down to
    # api_threads) and refuse the rest with 503 at once: answers stay within about a second when it is overloaded.
    api_shed_after_s: float = Field(default=0.25, gt=0)
    # Workers and beat ride out a database outage (a restart, a failover) this long: a connection that drops is
    # replaced, and one that cannot be opened is tried again with backoff. Only then does a job fail, as
    # database_unavailable. The API does not wait: it answers 503 with Retry-After at once.
    db_outage_budget_s: float = Field(default=120.0, ge=0)

    # The API: uvicorn worker processes of `retrotest serve` (one Python process uses at most one core), and the
    # threads each runs sync endpoints on; keep db_pool_size at least api_threads.
    api_workers: int = Field(default=2, ge=1)
    api_threads: int = Field(default=8, ge=1)
    # A read (GET, HEAD) whose API token was checked less than this long ago in the same process reuses the check
    # (app/auth/token_checks.py): a revocation made through another process reaches reads this much later. 0: off.
    api_token_cache_s: float = Field(default=10.0, ge=0)
    # Job views an API process keeps encoded, in MB (app/retro_tests/views.py KeptViews; ~4 KB a job and reader):
    # a status read or list page then reads only its jobs' keys. 0: every view is built from its row each time.
    api_view_cache_mb: int = Field(default=48, ge=0)
    # Celery broker. Embedded default: kombu's SQLAlchemy transport on SQLite (no server).
    broker_url: str = ""
    queue_name: str = "retrotest"

    # MLflow registry.
    mlflow_tracking_uri: str = ""
    mlflow_registry_uri: str = ""
    registry_timeout_s: float = 10.0

    # Request validation.
    max_period_days: int = Field(default=366, ge=1)
    # A request comparing models scores every row with each of at most this many (each its own deployment).
    max_models_per_job: int = Field(default=5, ge=1, le=16)
    # Model servers of one such job started at once (each waits for its server to be ready).
    max_parallel_deployments: int = Field(default=3, ge=1)
    # A request's population file (CSV or Parquet of ids, as-of dates and outcomes): the largest accepted, in bytes.
    # The API checks it in memory (pandas), so this bounds a request's memory too: 64 MiB is about 2-3M CSV rows.
    population_max_bytes: int = Field(default=64 * 2**20, ge=1)
    # The quality report's queries over the result files (DuckDB): the memory they may use before spilling to disk
    # (under <var_dir>/duckdb).
    report_memory_limit: str = Field(default="256MB", pattern=MEMORY_SIZE)

    # Where feature history lives: "local" (DuckDB over Parquet) or "hive".
    history_source: Literal["local", "hive"] = "local"
    history_dir: Path | None = None
    # The local source's queries (DuckDB over Parquet; a population's point-in-time join sorts and windows every
    # population row): the memory they may use before spilling to disk (under <var_dir>/duckdb).
    history_memory_limit: str = Field(default="512MB", pattern=MEMORY_SIZE)
    read_batch_rows: int = Field(default=50_000, ge=1)
    # A chunk (the unit of checkpointing, and one query to the source) is consecutive days of about chunk_rows
    # rows, planned from the rows of each day (worker/chunks.py plan_rows). 1,000,000: at 50-250k rows/s it takes
    # 4-20 s to read and score, about a production Hive query's latency, which the next chunk's query (opened
    # while this one is scored) then hides; a crash redoes at most that much; a year is a handful of queries.
    chunk_rows: int = Field(default=1_000_000, ge=1)
    # Kept for compatibility: days per chunk for a source that does not count rows (RETRO_HIVE_COUNT_ROWS=false)
    # and for jobs that committed day chunks before plans were recorded.
    chunk_days: int = Field(default=1, ge=1)
    # Workers that score one job at once: the job's own worker sends partitions (date ranges of whole chunks)
    # to partitions - 1 helpers on the same queue, all against the job's one deployment.
    partitions: int = Field(default=1, ge=1, le=64)

    # Temporary model deployments: "local" starts an MLServer process on this machine; the others create a
    # Seldon Core v1 SeldonDeployment, a Seldon Core v2 Model or a KServe InferenceService on Kubernetes.
    deployer: Literal["local", "seldon", "seldon_v2", "kserve"] = "local"
    mlserver_executable: str = "mlserver"
    # Model environments (app/integrations/environments/cache.py): "model" serves each model version from a virtualenv
    # of its own logged requirements plus the newest MLServer release in env_server_versions that resolves with
    # them, built with uv and cached; "worker" serves it from the worker's own packages.
    model_env: Literal["model", "worker"] = "model"
    env_cache_dir: Path | None = None  # default: <var_dir>/envs
    env_cache_max_gb: float = Field(default=20.0, gt=0)
    env_server_versions: list[str] = ["1.7.1", "1.6.1", "1.5.0", "1.4.0", "1.3.5"]  # newest first
    # Constraints on every environment: mlflow 2.x imports pkg_resources, which setuptools 70 and later break
    # or no longer ship, and no model lists setuptools among its requirements.
    # uvloop 0.22 and later kill MLServer's pool workers at start (mlserver/parallel/worker.py calls
    # asyncio.get_event_loop() after installing it), which a packed environment on Kubernetes runs the model in.
    env_constraints: list[str] = ["setuptools<70", "uvloop<0.22"]
    env_pythons: list[str] = []  # interpreters (paths or globs); empty: those on PATH and pyenv's
    env_nearest_python: bool = False  # no Python of the model's minor version: take the nearest, with a warning
    env_uv: str = "uv"
    env_build_timeout_s: float = Field(default=1800.0, gt=0)
    # The index model environments resolve and install from (uv's default index); empty keeps the worker's uv
    # setting (UV_DEFAULT_INDEX / UV_INDEX_URL), else PyPI. A model's own requirements never name another.
    env_index_url: str = ""
    # Model environments install wheels only: building an sdist runs its setup.py. Packages listed here (names)
    # may be built from source, in the sandbox below.
    env_build_allowed_packages: list[str] = []
    # Processes that read or run a model's code (uv, the in-process reference, the local model server) always start
    # with a minimal environment; "auto" also runs them under bubblewrap where it works, "bwrap" requires it,
    # "none" never uses it (app/integrations/environments/sandbox.py).
    model_sandbox: Literal["auto", "bwrap", "none"] = "auto"
    # Before scoring, the deployment scores the model's reference (a retro.reference artifact, else its input
    # example scored in-process in its own environment); a larger difference fails the job.
    reference_tolerance: float = Field(default=1e-9, ge=0)
    deploy_ready_timeout_s: float = Field(default=180.0, gt=0)
    # Warm deployments (worker/warm.py): a job's model server stays up this long after its last job, for the next
    # job of the same model version, environment and deployer settings, which checks it against the reference again
    # and scores at once; 0 turns the pool off (every job deploys and tears down its own). At most warm_max
    # deployments are kept (idle ones go least recently used first), each shared by at most warm_share jobs at once.
    warm_ttl_s: float = Field(default=900.0, ge=0)
    warm_max: int = Field(default=4, ge=1)
    warm_share: int = Field(default=4, ge=1)
    # Local model servers only: the warm ones of a host may hold this much resident memory in all (MB); over it, idle
    # ones go least recently used first. 0: no budget.
    warm_max_memory_mb: int = Field(default=8192, ge=0)

    # Kubernetes (deployers other than "local").
    k8s_namespace: str = "retrotest-models"
    k8s_in_cluster: bool = False
    k8s_kubeconfig: Path | None = None
    k8s_api_url: str = ""  # overrides kubeconfig/in-cluster with a plain API URL (tests, kubectl proxy)
    k8s_replicas: int = Field(default=1, ge=1)
    k8s_cpu_request: str = "500m"
    k8s_memory_request: str = "1Gi"
    k8s_cpu_limit: str = "2"
    k8s_memory_limit: str = "4Gi"
    k8s_storage_secret: str = ""  # Secret with storage credentials (Seldon envSecretRefName, KServe SA)
    k8s_image: str = ""  # optional model server image override
    # A model's own environment on Kubernetes: an init container with uv builds it from the resolved pins at pod
    # start. The mirrors are for clusters that reach PyPI or python-build-standalone only through a company mirror.
    k8s_env_builder_image: str = "ghcr.io/astral-sh/uv:debian-slim"
    k8s_env_index_url: str = ""  # UV_INDEX_URL in the init container; empty means PyPI
    k8s_env_python_mirror: str = ""  # UV_PYTHON_INSTALL_MIRROR in the init container; empty means GitHub
    # Closed clusters (deploy/README.md "Closed clusters"): what a container that fetches (the init containers we
    # add) needs to get out, and what every pod needs to pull its images. The proxy variables go to those
    # containers as HTTP_PROXY/HTTPS_PROXY/NO_PROXY (and lower case); the CA bundle is a ConfigMap in
    # RETRO_K8S_NAMESPACE, mounted and named by SSL_CERT_FILE (uv, Python's ssl) and REQUESTS_CA_BUNDLE.
    k8s_http_proxy: str = ""
    k8s_https_proxy: str = ""
    k8s_no_proxy: str = ""
    k8s_ca_bundle_configmap: str = ""
    k8s_ca_bundle_key: str = "ca.crt"
    k8s_image_pull_secrets: list[str] = []  # Secret names, for every pod's imagePullSecrets
    # The user an init container we add runs as: Pod Security "restricted" needs runAsNonRoot, and uv's image runs
    # as root unless told otherwise.
    k8s_run_as_user: int = Field(default=1000, ge=1)
    # KServe: the serving.kserve.io/deploymentMode annotation (Serverless, RawDeployment; newer KServe also
    # Knative, Standard); empty leaves the cluster's default (inferenceservice-config, usually Serverless).
    kserve_deployment_mode: Literal["", "Serverless", "RawDeployment", "Knative", "Standard"] = ""
    # How a model's environment reaches the pod: "tarball" packs the environment the worker built and checked as a
    # relocatable tarball (app/integrations/environments/tarball.py), staged beside the model under RETRO_MODEL_STAGING_URL
    # and fetched by the operator's own downloader, so the pod needs no index and no Python download; "install"
    # builds it at pod start in an init container with uv (needs PyPI or the mirrors above).
    k8s_env_delivery: Literal["tarball", "install"] = "tarball"
    # The MLServer release of the cluster's Seldon Core v2 mlserver ServerConfig image (Seldon Core 2.9 ships
    # seldonio/mlserver:1.6.1). An environment holding the same release is loaded by that standard Server through
    # MLServer's environment_tarball; any other gets a Server of its own (docs/kubernetes-environments.md).
    seldon_v2_mlserver_version: str = "1.6.1"
    seldon_protocol: Literal["v2", "seldon"] = "v2"
    # Where to reach a deployment: a template with {name} and {namespace}; empty means the in-cluster service.
    k8s_endpoint_template: str = ""
    seldon_v2_mesh_url: str = "http://seldon-mesh.{namespace}.svc.cluster.local"
    # Where to reach a deployment's V2 gRPC endpoint: host:port, a template with {name} and {namespace}; empty
    # means the in-cluster service (Seldon Core v1 with protocol v2: port 5001; KServe: port 80 with h2c).
    k8s_grpc_endpoint_template: str = ""
    seldon_v2_mesh_grpc: str = "seldon-mesh.{namespace}.svc.cluster.local:80"  # the mesh serves gRPC too
    deployment_ttl_s: int = Field(default=24 * 3600, ge=60)  # expiry label; the reaper deletes after it
    # Where models are copied when the registry's URI is not one the operator fetches (app/integrations/deployers/staging.py):
    # an s3:// or gs:// prefix; fsspec options (JSON, e.g. {"endpoint_url": "http://minio:9000"}); the reaper
    # deletes a copy unused this long.
    model_staging_url: str = ""
    model_staging_storage_options: dict[str, Any] = {}
    model_staging_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    reaper_interval_s: float = Field(default=300.0, gt=0)

    # Hive (history_source = "hive").
    hive_host: str = "127.0.0.1"
    hive_port: int = 10000
    hive_database: str = "default"
    hive_username: str = "retrotest"
    hive_password: SecretStr = SecretStr("")
    hive_auth: Literal["NONE", "NOSASL", "LDAP", "KERBEROS"] = "NONE"
    hive_kerberos_service_name: str = "hive"
    hive_configuration: dict[str, str] = {}  # session settings, e.g. {"mapreduce.job.queuename": "retro"}
    hive_connect_timeout_s: float = Field(default=30.0, gt=0)
    hive_query_timeout_s: float = Field(default=3600.0, gt=0)
    hive_fetch_rows: int = Field(default=50_000, ge=1)
    # A DATE partition column is compared as a date; a STRING one as text in this format.
    hive_date_string_format: Literal["yyyy-MM-dd", "yyyyMMdd"] = "yyyy-MM-dd"
    # Where a population's staging table is created for the point-in-time join (dropped after the job, and by the
    # reaper for jobs that ended without dropping it).
    hive_scratch_database: str = Field(default="retro_scratch", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    hive_count_rows: bool = True  # rows of each day first (one GROUP BY): the chunk plan, progress, reconciliation

    # Scoring: "auto" speaks the fastest protocol the deployment serves: V2 gRPC (binary tensors) where it has a
    # gRPC endpoint (local MLServer, Seldon Core v2, KServe, Seldon Core v1 with protocol v2), else V2 REST; the
    # Seldon protocol for Seldon Core v1 with protocol "seldon".
    score_protocol: Literal["auto", "v2-grpc", "v2-rest", "seldon"] = "auto"
    score_batch_rows: int = Field(default=5_000, ge=1)
    score_concurrency: int = Field(default=4, ge=1)  # requests in flight per job
    # Batches queued for scoring ahead of the one being written (results are written in source order). A
    # slow answer then holds up only its own batch: the others go on scoring until the window is full.
    score_window_batches: int = Field(default=16, ge=1)
    score_timeout_s: float = Field(default=60.0, gt=0)  # the longest a request may take, on any attempt
    # A request is given up after 4x the slowest of the server's last 50 answers (at least this): a hung
    # request costs about a second, not score_timeout_s.
    score_timeout_floor_s: float = Field(default=1.0, gt=0)
    score_retries: int = Field(default=5, ge=0)
    score_backoff_s: float = Field(default=0.5, ge=0)
    max_rejected_rows: int = Field(default=0, ge=0)
    max_rejected_ratio: float = Field(default=0.0, ge=0.0, le=1.0)  # of rows read; the larger budget wins

    # Reliability: leases, redelivery, recovery.
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    stale_after_s: float = Field(default=60.0, gt=0)  # a running job without a heartbeat this long is stranded
    max_attempts: int = Field(default=5, ge=1)  # deliveries of one job before it fails as a poison job
    max_redeploys: int = Field(default=2, ge=0)  # re-created model servers per attempt when one stays down
    job_deadline_s: float = Field(default=24 * 3600.0, gt=0)
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    requeue_queued_after_s: float = Field(default=600.0, gt=0)

    # Results: a local directory or any fsspec URL (s3://bucket/prefix with s3fs installed).
    results_url: str = ""
    output_formats: list[OutputFormat] = ["parquet", "csv.gz"]
    # Before a job writes, it checks the result store has room for about this many bytes per row for its parts
    # and each output format (measured: ~21 per row and file for ids, a date and two scores); 0: no check.
    result_bytes_per_row: int = Field(default=32, ge=0)

    # Public base URL of the API, used in links printed for people.
    public_base_url: str = "http://127.0.0.1:8000"
    secret_key: SecretStr = SecretStr("dev-only-change-me")

    # Seldon Core v1 graph parameters for the model server, e.g. {"xtype": "DataFrame"} (strings).
    seldon_parameters: dict[str, str] = {}
    # Observability: the worker serves Prometheus metrics on this port (0: off); logs as JSON lines or text.
    worker_metrics_port: int = Field(default=9808, ge=0, le=65535)
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
    # The language of pages, messages and reports when nothing else says (a user's profile, a browser's
    # Accept-Language, a partner's report setting, RETRO_LANG for the CLI); app/i18n.py.
    default_language: Literal["en", "ru"] = "en"
    # Worker and beat: a warning or error that repeats (a broker outage) is written once per this many seconds.
    log_repeat_window_s: float = Field(default=60.0, gt=0)

    # Sign-in. The session cookie is HttpOnly and SameSite=Lax; Secure by default when the public URL is https.
    session_cookie_secure: bool | None = None
    # A session ends this long after sign-in (absolute) or after its last request (idle), whichever comes first.
    session_max_age_s: int = Field(default=12 * 3600, ge=60)
    session_idle_s: int = Field(default=2 * 3600, ge=60)
    # Personal API tokens: how long a new one lives unless told, and the longest allowed.
    api_token_default_days: int = Field(default=90, ge=1)
    api_token_max_days: int = Field(default=365, ge=1)
    # Password sign-in throttling: this many failures in sign_in_window_s lock further tries for a while (doubling
    # with each failure beyond, at most sign_in_lock_max_s), counted per account from one address, per address and,
    # with a higher bar, per account from anywhere. Locks always run out: an attacker can delay a user, not lock
    # them out for good.
    sign_in_max_failures: int = Field(default=5, ge=1)
    sign_in_address_max_failures: int = Field(default=20, ge=1)
    sign_in_account_max_failures: int = Field(default=50, ge=1)
    sign_in_window_s: int = Field(default=900, ge=1)
    sign_in_lock_max_s: int = Field(default=900, ge=1)
    # Request bodies: every route refuses a larger one (413) before reading it; the routes that take a population
    # file (app/request_guard.py lists them) take population_max_bytes more.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # --- Bounded uploads (issue 26) ---
    # An upload route (app/request_guard.py) takes more than max_body_bytes only after it has authenticated the
    # caller and checked CSRF. A population may have at most this many rows, checked from a Parquet file's footer
    # before its data is read, and while a CSV is read. The API checks a population a chunk at a time and keeps
    # its checked columns as Arrow: measured, 5M integer-id Parquet rows peak about 125 MB above the file, a 59 MB
    # CSV of 3M text ids about 200 MB.
    population_max_rows: int = Field(default=5_000_000, ge=1)
    # --- end of bounded uploads ---
    # Result retention: a job's result files and download links are deleted this many days after it finished
    # (by beat, recorded in the audit trail); 0 keeps them for ever.
    result_retention_days: int = Field(default=90, ge=0)
    # Partner download links: how long a new link lives unless told, and the longest allowed.
    download_link_default_days: int = Field(default=7, ge=1)
    download_link_max_days: int = Field(default=30, ge=1)
    # Optional OpenID Connect sign-in (authorization-code flow), e.g. Keycloak: https://kc/realms/<realm>.
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_client_secret: SecretStr = SecretStr("")
    oidc_scopes: str = "openid profile email"
    oidc_username_claim: str = "preferred_username"
    oidc_create_users: bool = True  # first sign-in creates an account manager with no partners
    oidc_timeout_s: float = Field(default=10.0, gt=0)

    # --- issue 26: proxies and sign-in throttling (app/client_address.py, app/auth/throttle.py) ----------------
    # Our own reverse proxies / ingress (addresses or CIDRs, a JSON list such as ["10.0.0.0/8"]): only their
    # X-Forwarded-For is believed, read from the right. Empty: the header is ignored, the peer is the client.
    trusted_proxies: list[str] = []
    # Past sign_in_address_max_failures from one address, its wrong guesses are refused for this long (doubled for
    # each further bar's worth in the window, at most sign_in_lock_max_s); a right password for an account with no
    # failures of its own still gets in (a shared proxy must not lock everyone out).
    sign_in_address_lock_s: int = Field(default=60, ge=1)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
        return entries

    # --- end of issue 26 (proxies, throttling) --------------------------------------------------------------------

    def resolved_session_cookie_secure(self) -> bool:
        if self.session_cookie_secure is not None:
            return self.session_cookie_secure
        return self.public_base_url.startswith("https://")

    def oidc_enabled(self) -> bool:
        return bool(self.oidc_issuer and self.oidc_client_id)

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.var_dir.resolve() / 'retrotest.db'}"

    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.var_dir.resolve() / 'broker.db'}"

    def resolved_tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.var_dir.resolve() / 'mlflow.db'}"

    def resolved_spill_dir(self) -> Path:
        """Where DuckDB writes what does not fit in its memory limit (the history source's and the report's)."""
        return (self.var_dir / "duckdb").resolve()

    def resolved_env_cache_dir(self) -> Path:
        return (self.env_cache_dir or self.var_dir / "envs").resolve()

    def resolved_registry_uri(self) -> str:
        return self.mlflow_registry_uri or self.resolved_tracking_uri()

    def resolved_history_dir(self) -> Path:
        return (self.history_dir or self.var_dir / "history").resolve()

    def resolved_results_url(self) -> str:
        return self.results_url or str((self.var_dir / "results").resolve())

    def check_secrets(self) -> None:
        """Fail fast on a weak or placeholder secret in prod."""
        if self.env != "prod":
            return
        problem = secret_key_problem(self.secret_key.get_secret_value())
        if problem is not None:
            raise RuntimeError(
                f"RETRO_SECRET_KEY {problem} (RETRO_ENV=prod); make one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
            )


# Secrets seen in examples and docs: never accepted in prod, whatever their length.
KNOWN_PLACEHOLDER_SECRETS = frozenset(
    {"dev-only-change-me", "change-me", "changeme", "secret", "please-change-me", "retrotest", "insecure"}
)
MIN_SECRET_BITS = 256  # 32 bytes of entropy


def _estimated_bits(secret: str) -> float:
    """An upper estimate of the secret's entropy: its length times the Shannon entropy of its characters."""
    counts = Counter(secret)
    per_char = -sum(n / len(secret) * math.log2(n / len(secret)) for n in counts.values())
    return per_char * len(secret)


def secret_key_problem(secret: str) -> str | None:
    """Why secret may not sign prod sessions, or None when it may."""
    if secret.strip().lower() in KNOWN_PLACEHOLDER_SECRETS or "change-me" in secret.lower():
        return "is a known placeholder"
    if len(secret.encode()) < 32:
        return f"is {len(secret.encode())} bytes long; at least 32 random bytes are needed"
    # The estimate reads short random strings low: token_urlsafe(32) (256 random bits in 43 characters) scores
    # about 205 by it, token_hex(32) about 245; a repeated word of 32 characters about 100.
    if _estimated_bits(secret) < MIN_SECRET_BITS * 0.6:
        return "has too little entropy (repeated or few distinct characters); use at least 32 random bytes"
    # Issue 26 (N15): many distinct characters are not enough; abcdef..., qwerty..., a1b2a1b2 and words are guessed.
    if guessable_bits(secret) < MIN_SECRET_BITS * 0.6:
        return "is guessable (sequences, keyboard runs, repeated parts or common words); use at least 32 random bytes"
    return None


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
