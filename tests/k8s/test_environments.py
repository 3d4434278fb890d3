"""Kubernetes deployments that serve a model from its own environment, through the API emulator and test operator.

Each deployer is given a ModelEnvironment made by hand (no uv, no index); the objects are read back from the
emulator as the operator would see them: the init container that builds the environment from the pins, the shared
volume, the server container running the environment's mlserver, the annotations naming the environment, and for
Seldon Core v2 the deployment's own Server. The init container's script runs here against a stand-in `uv`. These are
the install-at-start deliveries (RETRO_K8S_ENV_DELIVERY=install); tests/k8s/test_env_tarball.py has the tarball.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from app.core.model_types import ModelVersionInfo
from app.errors import DeploymentFailed
from app.integrations.deployers.kserve import KServeDeployer
from app.integrations.deployers.kubernetes import (
    INFERENCE_SERVICE,
    JOB_ID_LABEL,
    MANAGED_BY_LABEL,
    SELDON_DEPLOYMENT,
    SELDON_MODEL,
    SELDON_SERVER,
    WATCH_WINDOW_S,
    CustomResources,
    ResourceKind,
)
from app.integrations.deployers.port import deployment_name
from app.integrations.deployers.seldon_v1 import SeldonDeployer
from app.integrations.deployers.seldon_v2 import SeldonV2Deployer
from app.integrations.environments.cache import ModelEnvironment
from tests.conftest import _TMP
from tests.k8s.conftest import BUCKET, NAMESPACE, STORAGE_SECRETS, k8s_settings, wait_for
from tests.k8s_operator import ApiServer, Hang, TestOperator

# What uv pip compile prints, and a marker line whose quotes must reach the lock file untouched.
LOCK = (
    "mlflow==2.9.2\n"
    "mlserver==1.6.1\n"
    "mlserver-mlflow==1.6.1\n"
    "numpy==1.26.4\n"
    "scikit-learn==1.3.2\n"
    'pywin32==306 ; sys_platform == "win32"\n'
)
ENVIRONMENT = ModelEnvironment(
    key="5be0c2a9d41f7e63",
    python="3.11.7",
    python_requested="3.11.4",
    server_version="1.6.1",
    lock=LOCK,
)
MODEL = ModelVersionInfo(
    name="churn", version="3", run_id=None, source="", artifact_uri="s3://models/churn/3", inputs=(), outputs=()
)
RESOURCES = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
MOUNT = {"name": "retro-env", "mountPath": "/opt/retro-env"}
VOLUME = {"name": "retro-env", "emptyDir": {}}
ANNOTATIONS = {
    "retrotest.io/environment": "5be0c2a9d41f7e63",
    "retrotest.io/python": "3.11.7",
    "retrotest.io/mlserver": "1.6.1",
}
# Pod Security "restricted" on every container we add, and its log's end as its termination message.
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
HARDENED = {"securityContext": RESTRICTED, "terminationMessagePolicy": "FallbackToLogsOnError"}
BASE_ENV = [
    {"name": "RETRO_PYTHON", "value": "3.11.7"},
    {"name": "RETRO_REQUIREMENTS_LOCK", "value": LOCK},
    {"name": "UV_PYTHON_INSTALL_DIR", "value": "/opt/retro-env/python"},
    {"name": "UV_CACHE_DIR", "value": "/opt/retro-env/cache"},
]


def install_settings(deployer: str, **overrides: Any) -> Any:
    """Settings that build the environment at pod start."""
    return k8s_settings(deployer, k8s_env_delivery="install", **overrides)


def stageable_model() -> ModelVersionInfo:
    """A model folder the deployer can stage: Seldon v2's staged folder carries a model-settings.json beside it."""
    folder = _TMP / "stageable-model"
    folder.mkdir(exist_ok=True)
    (folder / "MLmodel").write_text("flavors: {}\n")
    return ModelVersionInfo(
        name="churn", version="3", run_id=None, source="", artifact_uri=str(folder), inputs=(), outputs=()
    )


def custom_objects(cluster: ApiServer) -> Any:
    """The emulator's custom-objects API, through the official client."""
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = cluster.url
    return client.CustomObjectsApi(client.ApiClient(cfg))


def read_back(cluster: ApiServer, kind: ResourceKind, name: str) -> dict[str, Any]:
    """The object as stored by the emulator."""
    obj: dict[str, Any] = custom_objects(cluster).get_namespaced_custom_object(
        kind.group, kind.version, NAMESPACE, kind.plural, name
    )
    return obj


def patch_status(cluster: ApiServer, kind: ResourceKind, name: str, status: dict[str, Any]) -> None:
    """What the object's operator reports."""
    custom_objects(cluster).patch_namespaced_custom_object_status(
        kind.group, kind.version, NAMESPACE, kind.plural, name, {"status": status}
    )


def assert_builds_the_environment(init_container: dict[str, Any], *, env: list[dict[str, str]] = BASE_ENV) -> None:
    """The init container: uv's image, the pins and the interpreter version inline, the shared volume."""
    script = init_container.pop("command")
    assert init_container == {
        "name": "retro-env",
        "image": "ghcr.io/astral-sh/uv:debian-slim",
        "env": env,
        "resources": RESOURCES,
        "volumeMounts": [MOUNT],
        # uv's image runs as root: the init container names a user, as "restricted" needs.
        "securityContext": RESTRICTED | {"runAsUser": 1000},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    assert script[:2] == ["sh", "-c"]
    assert 'uv venv --clear --managed-python --python "$RETRO_PYTHON" /opt/retro-env/venv' in script[2]
    assert "uv pip sync --compile-bytecode --python /opt/retro-env/venv/bin/python " in script[2]


def nothing_left(cluster: ApiServer) -> None:
    """Nothing of the deployment is left; a Server's volume claims go a moment after it, as the StatefulSet
    controller deletes them (the test operator's work for one name runs in order, so on a loaded machine the
    teardown may wait behind the provisioning: a full CI run once took over 10 s)."""
    wait_for(lambda: not cluster.objects(), timeout_s=30, what=f"nothing left, not {cluster.objects()}")


def new_name() -> tuple[str, str]:
    job_id = str(uuid.uuid4())
    return deployment_name(job_id), job_id


def test_kserve_builds_the_environment_in_the_predictor_and_runs_its_mlserver(
    cluster: ApiServer, operator: TestOperator
) -> None:
    settings = install_settings(
        "kserve",
        k8s_env_index_url="https://pypi.corp.example/simple",
        k8s_env_python_mirror="https://mirror.corp.example/python-build-standalone",
    )
    deployer = KServeDeployer(settings=settings)
    name, job_id = new_name()
    operator.scripts[name] = Hang()
    deployer.start(name=name, job_id=job_id, model=MODEL, environment=ENVIRONMENT)
    try:
        isvc = read_back(cluster, INFERENCE_SERVICE, name)
    finally:
        deployer.stop(name)
    assert isvc["metadata"]["annotations"] == ANNOTATIONS
    assert isvc["metadata"]["labels"][JOB_ID_LABEL] == job_id
    predictor = isvc["spec"]["predictor"]
    [init_container] = predictor["initContainers"]
    mirrors = [
        {"name": "UV_INDEX_URL", "value": "https://pypi.corp.example/simple"},
        {"name": "UV_PYTHON_INSTALL_MIRROR", "value": "https://mirror.corp.example/python-build-standalone"},
    ]
    assert_builds_the_environment(init_container, env=BASE_ENV + mirrors)
    assert predictor["volumes"] == [VOLUME]
    model = predictor["model"]
    assert model["command"] == ["/opt/retro-env/venv/bin/mlserver", "start", "/mnt/models"]
    assert model["volumeMounts"] == [MOUNT]
    # Everything else is as without an environment.
    assert model["storageUri"] == "s3://models/churn/3" and model["modelFormat"] == {"name": "mlflow"}
    assert model["resources"] == RESOURCES
    nothing_left(cluster)


def test_seldon_v1_with_mlserver_builds_the_environment_in_the_graph_nodes_pod(
    cluster: ApiServer, operator: TestOperator
) -> None:
    deployer = SeldonDeployer(settings=install_settings("seldon", seldon_protocol="v2"))
    name, job_id = new_name()
    operator.scripts[name] = Hang()
    deployer.start(name=name, job_id=job_id, model=MODEL, environment=ENVIRONMENT)
    try:
        sdep = read_back(cluster, SELDON_DEPLOYMENT, name)
    finally:
        deployer.stop(name)
    assert sdep["metadata"]["annotations"] == ANNOTATIONS
    [predictor] = sdep["spec"]["predictors"]
    pod = predictor["componentSpecs"][0]["spec"]
    [init_container] = pod["initContainers"]
    assert_builds_the_environment(init_container)
    assert pod["volumes"] == [VOLUME]
    # The container Seldon fills in as MLServer is the one named after the graph node.
    assert pod["containers"] == [
        {
            "name": name,
            "resources": RESOURCES,
            "command": ["/opt/retro-env/venv/bin/mlserver", "start", "/mnt/models"],
            "volumeMounts": [MOUNT],
            **HARDENED,
        }
    ]
    assert predictor["graph"]["name"] == name and predictor["graph"]["implementation"] == "MLFLOW_SERVER"


def test_seldon_v1_with_the_seldon_protocol_keeps_its_manifest_and_names_the_environment() -> None:
    """Seldon's own MLflow server builds the model's conda environment itself: only the annotations change."""
    from app.config import Settings

    deployer = SeldonDeployer(settings=Settings(seldon_protocol="seldon", k8s_env_delivery="install"))
    name, job_id = new_name()
    with_env = deployer.manifest(name=name, job_id=job_id, model=MODEL, environment=ENVIRONMENT)
    without = deployer.manifest(name=name, job_id=job_id, model=MODEL)
    assert with_env["spec"] == without["spec"]
    assert "initContainers" not in with_env["spec"]["predictors"][0]["componentSpecs"][0]["spec"]
    assert with_env["metadata"]["annotations"] == ANNOTATIONS
    assert "annotations" not in without["metadata"]


def test_seldon_v2_puts_the_model_on_a_server_of_its_own_and_stop_deletes_both(
    cluster: ApiServer, operator: TestOperator
) -> None:
    deployer = SeldonV2Deployer(settings=install_settings("seldon_v2"))
    name, job_id = new_name()
    operator.scripts[name] = Hang()
    deployer.start(name=name, job_id=job_id, model=stageable_model(), environment=ENVIRONMENT)
    try:
        created = sorted(plural for plural, _, n in cluster.objects() if n == name)
        model = read_back(cluster, SELDON_MODEL, name)
        server = read_back(cluster, SELDON_SERVER, name)
        managed = [(m.name, m.job_id) for m in deployer.list_managed()]
    finally:
        deployer.stop(name)
    nothing_left(cluster)
    deployer.stop(name)  # both already gone: fine
    assert created == ["models", "servers"]
    # One deployment for the reaper, not two.
    assert managed == [(name, job_id)]
    # Staged with a model-settings.json, without which the agent refuses a requirement it does not know.
    assert model["spec"].pop("storageUri").startswith(f"s3://{BUCKET}/staging/models/")
    assert model["spec"] == {
        "requirements": [name],
        "replicas": 1,
        "memory": "1Gi",
        "secretName": STORAGE_SECRETS["seldon_v2"],
        "server": name,
    }
    assert model["metadata"]["annotations"] == server["metadata"]["annotations"] == ANNOTATIONS
    assert server["metadata"]["labels"][MANAGED_BY_LABEL] == "retrotest"
    assert server["metadata"]["labels"][JOB_ID_LABEL] == job_id
    spec = server["spec"]
    [init_container] = spec["podSpec"].pop("initContainers")
    assert_builds_the_environment(init_container)
    assert spec == {
        "serverConfig": "mlserver",
        "replicas": 1,
        "capabilities": [name],
        "podSpec": {
            "volumes": [VOLUME],
            "containers": [
                {
                    "name": "mlserver",
                    "resources": RESOURCES,
                    "command": ["/opt/retro-env/venv/bin/mlserver", "start", "/mnt/agent/models"],
                    "volumeMounts": [MOUNT],
                    **HARDENED,
                }
            ],
        },
        # Its volume claims go with it: no 1Gi claim left per job.
        "statefulSetPersistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Delete"},
    }


def test_a_seldon_v2_server_whose_model_is_gone_is_reaped(
    cluster: ApiServer, operator: TestOperator, database_url: str
) -> None:
    """A worker killed between creating the Server and the Model leaves the Server alone: the reaper finds it."""
    from app.db import get_session_factory
    from worker.reaper import reap_deployments

    settings = install_settings("seldon_v2")
    deployer = SeldonV2Deployer(settings=settings)
    name, job_id = new_name()  # a job the database does not know
    server = deployer.server_manifest(name=name, job_id=job_id, environment=ENVIRONMENT)
    CustomResources(settings=settings).create(SELDON_SERVER, server)  # and then the worker died
    try:
        assert [(plural, n) for plural, _, n in cluster.objects()] == [("servers", name)]
        assert [(m.name, m.job_id) for m in deployer.list_managed()] == [(name, job_id)]
        assert reap_deployments(deployer=deployer, sessions=get_session_factory()) == [name]
        nothing_left(cluster)
    finally:
        deployer.stop(name)


def test_a_failing_seldon_v2_server_ends_the_wait_with_its_message(cluster: ApiServer, operator: TestOperator) -> None:
    deployer = SeldonV2Deployer(settings=install_settings("seldon_v2"))
    name, job_id = new_name()
    operator.scripts[name] = Hang()
    deployment = deployer.start(name=name, job_id=job_id, model=stageable_model(), environment=ENVIRONMENT)
    try:
        message = "failed to create StatefulSet: exceeded quota: models, requested: limits.memory=4Gi"
        condition = {"type": "StatefulSetOrDeploymentReady", "status": "False", "reason": "StatefulSetFailed"}
        patch_status(cluster, SELDON_SERVER, name, {"conditions": [condition | {"message": message}]})
        started = time.monotonic()
        with pytest.raises(DeploymentFailed) as failed:
            deployer.wait_ready(deployment, timeout_s=120, should_stop=lambda: False)
        assert time.monotonic() - started < 60  # the Server's condition, not the wait's end
        assert str(failed.value.detail) == (
            f"the Model {name} in namespace {NAMESPACE} failed: the Server {name}: {message}"
        )
    finally:
        deployer.stop(name)
    nothing_left(cluster)


def test_the_seldon_v2_readiness_timeout_says_how_the_server_is(cluster: ApiServer, operator: TestOperator) -> None:
    deployer = SeldonV2Deployer(settings=install_settings("seldon_v2"))
    name, job_id = new_name()
    operator.scripts[name] = Hang()
    deployment = deployer.start(name=name, job_id=job_id, model=stageable_model(), environment=ENVIRONMENT)
    try:
        not_ready = "StatefulSet replicas does not match desired replicas"
        condition = {"type": "StatefulSetOrDeploymentReady", "status": "False", "reason": not_ready}
        patch_status(cluster, SELDON_SERVER, name, {"conditions": [condition]})
        with pytest.raises(DeploymentFailed) as failed:
            deployer.wait_ready(deployment, timeout_s=3, should_stop=lambda: False)
        assert str(failed.value.detail).endswith(
            f"; the Server {name}: StatefulSetOrDeploymentReady=False ({not_ready})"
        ), failed.value.detail
        assert "last state: ModelReady=False (ModelProgressing)" in str(failed.value.detail)
    finally:
        deployer.stop(name)
    nothing_left(cluster)


def test_a_seldon_v2_model_waits_for_its_own_server_then_serves_and_stops(
    cluster: ApiServer, operator: TestOperator, registry: dict[str, str]
) -> None:
    """With a real model: ScheduleFailed while its Server builds the environment is no failure; once the Server is
    Ready the Model is served, and stop() deletes both."""
    import httpx

    from app.integrations.wiring import make_registry

    settings = install_settings("seldon_v2")
    deployer = SeldonV2Deployer(settings=settings)
    model = make_registry(settings).resolve(name="churn", version="1")
    name, job_id = new_name()
    deployment = deployer.start(name=name, job_id=job_id, model=model, environment=ENVIRONMENT)
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(deployer.wait_ready, deployment, timeout_s=120, should_stop=lambda: False)
            wait_for(
                lambda: "ScheduleFailed" in str(read_back(cluster, SELDON_MODEL, name).get("status")),
                timeout_s=30,
                what="the Model to be ScheduleFailed",
            )
            time.sleep(2 * WATCH_WINDOW_S)  # the wait has seen it, and goes on
            assert not waiting.done(), waiting.exception()
            ready = [{"type": "StatefulSetOrDeploymentReady", "status": "True"}, {"type": "Ready", "status": "True"}]
            patch_status(cluster, SELDON_SERVER, name, {"conditions": ready})
            waiting.result(timeout=120)
        answer = httpx.get(f"{deployment.base_url}/v2/models/{name}/ready", headers=deployment.headers)
        assert answer.status_code == 200
        assert operator.seen[name]["spec"]["server"] == name
    finally:
        deployer.stop(name)
    nothing_left(cluster)


@pytest.mark.parametrize("deployer", ["seldon", "seldon_v2", "kserve"])
def test_without_an_environment_the_manifests_are_as_before(
    deployer: str, cluster: ApiServer, operator: TestOperator
) -> None:
    from app.integrations.wiring import make_deployer

    k8s = make_deployer(k8s_settings(deployer))
    name, job_id = new_name()
    operator.scripts[name] = Hang()
    k8s.start(name=name, job_id=job_id, model=MODEL)
    kind = {"seldon": SELDON_DEPLOYMENT, "seldon_v2": SELDON_MODEL, "kserve": INFERENCE_SERVICE}[deployer]
    try:
        assert [(plural, n) for plural, _, n in cluster.objects()] == [(kind.plural, name)]  # no Server
        obj = read_back(cluster, kind, name)
    finally:
        k8s.stop(name)
    assert "annotations" not in obj["metadata"]
    text = str(obj["spec"])
    assert "initContainers" not in text and "retro-env" not in text and "command" not in text
    assert str(HARDENED)[1:-1] in text or deployer == "seldon_v2"  # a Model has no container
    if deployer == "seldon_v2":
        assert obj["spec"]["requirements"] == ["mlflow"] and "server" not in obj["spec"]


def test_the_init_containers_script_writes_the_pins_and_builds_the_venv_with_uv(tmp_path: Path) -> None:
    """The script, run by sh with a stand-in uv that records its calls: the pins land intact, uv runs twice."""
    from app.config import Settings

    manifest = KServeDeployer(settings=Settings(k8s_env_delivery="install")).manifest(
        name="retro-x", job_id="j", model=MODEL, environment=ENVIRONMENT
    )
    [init_container] = manifest["spec"]["predictor"]["initContainers"]
    env_dir, bin_dir, calls = tmp_path / "retro-env", tmp_path / "bin", tmp_path / "calls"
    env_dir.mkdir()
    bin_dir.mkdir()
    uv = bin_dir / "uv"
    uv.write_text(f'#!/bin/sh\necho "$UV_PYTHON_INSTALL_DIR | $*" >> {calls}\n[ "$1" != "${{FAIL_ON:-}}" ]\n')
    uv.chmod(0o755)

    def run_script(**extra: str) -> subprocess.CompletedProcess[bytes]:
        script = init_container["command"][2].replace("/opt/retro-env", str(env_dir))
        env = {e["name"]: e["value"].replace("/opt/retro-env", str(env_dir)) for e in init_container["env"]}
        env |= {"PATH": f"{bin_dir}:{os.environ['PATH']}", **extra}
        return subprocess.run([*init_container["command"][:2], script], env=env, capture_output=True, check=False)

    assert run_script().returncode == 0
    assert (env_dir / "requirements.lock").read_text().strip() == LOCK.strip()
    assert calls.read_text().splitlines() == [
        f"{env_dir}/python | venv --clear --managed-python --python 3.11.7 {env_dir}/venv",
        f"{env_dir}/python | pip sync --compile-bytecode --python {env_dir}/venv/bin/python "
        f"{env_dir}/requirements.lock",
    ]
    # A venv that cannot be made fails the init container before anything is installed.
    calls.unlink()
    assert run_script(FAIL_ON="venv").returncode != 0
    assert [line.split(" | ")[1].split()[0] for line in calls.read_text().splitlines()] == ["venv"]
