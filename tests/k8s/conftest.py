"""Session fixtures for the Kubernetes deployers: an API emulator, a test operator, settings pointing at them.

Nothing here needs a cluster: kmock's KubernetesEmulator is the API server (real HTTP, real `kubernetes`
client), tests/k8s_operator.py plays Seldon Core v1, Seldon Core v2 and KServe with local MLServers.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _TMP, HISTORY_DAYS, HISTORY_START
from tests.k8s_operator import ApiServer, TestOperator

NAMESPACE = "retro-models-test"
BUCKET = "retro-models"
# The storage credentials each operator takes, in its own format (deploy/README.md): RETRO_K8S_STORAGE_SECRET.
STORAGE_SECRETS = {"seldon": "retro-rclone-env", "seldon_v2": "retro-rclone-config", "kserve": "retro-kserve"}
WRONG_SECRETS = {"seldon": "wrong-rclone-env", "seldon_v2": "wrong-rclone-config", "kserve": "wrong-kserve"}
END = HISTORY_START + timedelta(days=HISTORY_DAYS - 1)


@pytest.fixture(scope="session")
def cluster() -> Iterator[ApiServer]:
    """The Kubernetes API emulator, once per session."""
    server = ApiServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """moto's S3 server on loopback with an empty bucket; its URL."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


def storage_secrets(s3_url: str) -> list[dict[str, Any]]:
    """The Secrets and the ServiceAccount deploy/README.md tells an operator to create, for the loopback S3."""
    keys = {"access_key_id": "testing", "secret_access_key": "testing"}
    rclone = {"provider": "Other", "env_auth": "false", "endpoint": s3_url, **keys}
    v1_env = {f"RCLONE_CONFIG_S3_{k.upper()}": v for k, v in {"type": "s3", **rclone}.items()}
    v2_config = {"type": "s3", "name": "s3", "parameters": rclone}
    endpoint = s3_url.removeprefix("http://")
    kserve_annotations = {"serving.kserve.io/s3-endpoint": endpoint, "serving.kserve.io/s3-usehttps": "0"}
    return [
        secret(STORAGE_SECRETS["seldon"], v1_env),
        secret(STORAGE_SECRETS["seldon_v2"], {"s3": json.dumps(v2_config)}),
        secret(
            "retro-kserve-s3",
            {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
            annotations=kserve_annotations,
        ),
        service_account(STORAGE_SECRETS["kserve"], "retro-kserve-s3"),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}},  # as in every namespace
        # Wrong ones: an rclone remote named other than the URI's scheme; S3 settings without keys.
        secret(WRONG_SECRETS["seldon"], {k.replace("_S3_", "_MINIO_"): v for k, v in v1_env.items()}),
        secret(WRONG_SECRETS["seldon_v2"], {"s3": json.dumps({**v2_config, "name": "minio"})}),
        secret("retro-kserve-nokeys", {"AWS_DEFAULT_REGION": "us-east-1"}, annotations=kserve_annotations),
        service_account(WRONG_SECRETS["kserve"], "retro-kserve-nokeys"),
    ]


def service_account(name: str, secret_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name},
        "secrets": [{"name": secret_name}],
    }


def secret(name: str, data: dict[str, str], *, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Secret manifest with data base64-encoded."""
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    meta: dict[str, Any] = {"name": name, "annotations": annotations or {}}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": encoded}


def create_core(api_url: str, body: dict[str, Any]) -> None:
    """Create a Secret or ServiceAccount in the test namespace."""
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = api_url
    core = client.CoreV1Api(client.ApiClient(cfg))
    if body["kind"] == "Secret":
        core.create_namespaced_secret(NAMESPACE, body)
    else:
        core.create_namespaced_service_account(NAMESPACE, body)


@pytest.fixture(scope="session")
def operator(cluster: ApiServer, s3: str) -> Iterator[TestOperator]:
    """The test operator and its gateway; RETRO_K8S_* settings point the deployers at them, models stage to S3."""
    op = TestOperator(api_url=cluster.url, work_dir=_TMP / "operator-model-servers")
    for body in storage_secrets(s3):
        create_core(cluster.url, body)
    op.install_cluster(NAMESPACE)  # KServe's and Knative's settings, Seldon v2's mlserver ServerConfig
    env = {
        "RETRO_MODEL_STAGING_URL": f"s3://{BUCKET}/staging",
        "RETRO_MODEL_STAGING_STORAGE_OPTIONS": json.dumps(
            # A short read timeout: werkzeug's server behind moto can leave a pooled connection unanswered.
            {"endpoint_url": s3, "key": "testing", "secret": "testing", "config_kwargs": {"read_timeout": 10}}
        ),
        "RETRO_K8S_API_URL": cluster.url,
        "RETRO_K8S_NAMESPACE": NAMESPACE,
        "RETRO_K8S_ENDPOINT_TEMPLATE": op.gateway.url + "/gateway/{namespace}/{name}",
        "RETRO_SELDON_V2_MESH_URL": op.gateway.url + "/mesh/{namespace}",
        "RETRO_K8S_GRPC_ENDPOINT_TEMPLATE": op.grpc_ingress.target,
        "RETRO_SELDON_V2_MESH_GRPC": op.grpc_mesh.target,
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield op
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    op.close()


@pytest.fixture(autouse=True)
def nothing_left_behind(cluster: ApiServer, operator: TestOperator) -> Iterator[None]:
    """Every test starts and ends with no resource in the emulator and no model server running."""
    assert cluster.objects() == [], "a previous test left resources behind"
    yield
    # Pods go a moment after their deployment, as Kubernetes' garbage collector deletes them.
    deadline = time.monotonic() + 10
    while cluster.objects() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.objects() == [], "resources were left in the emulator"
    assert operator.wait_idle() == [], "model servers were left running"
    operator.scripts.clear()


@pytest.fixture()
def retro_data(database_url: str, registry: dict[str, str], history: Path) -> None:
    """The job database, the registered churn model and its history: what an in-process job needs."""


def k8s_settings(deployer: str, **overrides: Any) -> Any:
    """Settings for one Kubernetes deployer, from the environment the fixtures set, plus overrides."""
    from app.config import Settings

    if deployer in STORAGE_SECRETS:
        overrides.setdefault("k8s_storage_secret", STORAGE_SECRETS[deployer])
    return Settings(deployer=deployer, **overrides)  # type: ignore[arg-type]


def new_job(*, period_end: Any = END, output_formats: tuple[str, ...] = ("parquet",)) -> uuid.UUID:
    """A queued retro test of the churn model, created directly in the database; returns its id."""
    from app.db import get_session_factory
    from tests.factories import make_retro_test

    with get_session_factory()() as s, s.begin():
        return make_retro_test(
            s, start=HISTORY_START, end=period_end, output_formats=output_formats, partner_prefix="k8s"
        )


def wait_for(check: Any, *, timeout_s: float, what: str) -> Any:
    """Poll check() until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def job_row(job_id: uuid.UUID) -> Any:
    from app.core.jobs import RetroTest
    from app.db import get_session_factory

    with get_session_factory()() as s:
        return s.get(RetroTest, job_id)


def results_path(location: str) -> Path:
    return Path(location.removeprefix("file://"))


def adapters(settings: Any, *, deployer: Any = None, source: Any = None) -> Any:
    from app.integrations.wiring import make_deployer, make_history_source, make_registry, make_result_store
    from worker.pipeline import Adapters

    return Adapters(
        registry=make_registry(settings),
        source=source or make_history_source(settings),
        deployer=deployer or make_deployer(settings),
        store=make_result_store(settings),
    )


def run(job_id: uuid.UUID, settings: Any, **kw: Any) -> Any:
    from app.db import get_session_factory
    from worker.pipeline import run_retro_test

    return run_retro_test(
        job_id=job_id, sessions=get_session_factory(), adapters=adapters(settings, **kw), settings=settings
    )
