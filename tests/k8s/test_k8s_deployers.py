"""Seldon Core v1, Seldon Core v2 and KServe deployments through a Kubernetes API emulator and a test operator.

Whole retro tests run in-process (as a worker runs them) with the Kubernetes deployers; the test operator starts
a real MLServer for each resource. Every test ends with no resource in the emulator and no model server left.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from app.core.model_types import ModelVersionInfo
from app.integrations.deployers.kserve import KServeDeployer
from app.integrations.deployers.kubernetes import (
    EXPIRES_AT_LABEL,
    INFERENCE_SERVICE,
    INSTANCE_LABEL,
    JOB_ID_LABEL,
    MANAGED_BY_LABEL,
    SELDON_DEPLOYMENT,
    SELDON_MODEL,
    CustomResources,
    label_value,
)
from app.integrations.deployers.port import deployment_name
from app.integrations.deployers.seldon_v1 import SeldonDeployer
from app.integrations.deployers.seldon_v2 import SeldonV2Deployer
from tests.conftest import HISTORY_DAYS, HISTORY_START, ROWS_PER_DAY
from tests.k8s.conftest import BUCKET, NAMESPACE, job_row, k8s_settings, new_job, results_path, run, wait_for
from tests.k8s_operator import ApiServer, Fail, Hang, TestOperator, artifact_uri

KINDS = {"seldon": SELDON_DEPLOYMENT, "seldon_v2": SELDON_MODEL, "kserve": INFERENCE_SERVICE}
PLACEHOLDER_MODEL = ModelVersionInfo(
    name="churn", version="1", run_id=None, source="", artifact_uri="s3://models/churn/1", inputs=(), outputs=()
)


class WorkerDied(BaseException):
    """Stands for a worker process killed mid-chunk: nothing after it runs, no except clause catches it."""


@pytest.fixture(scope="session")
def expected_scores(registry: dict[str, str], history: Path) -> pd.DataFrame:
    """The churn model's probabilities for every history row, computed in this process."""
    import mlflow

    table = ds.dataset(history / "features" / "customer_daily", format="parquet", partitioning="hive").to_table()
    src = table.to_pandas()
    src["snapshot_date"] = pd.to_datetime(src["snapshot_date"]).dt.date
    model = mlflow.pyfunc.load_model("models:/churn/1")
    features = [c for c in src.columns if c not in ("customer_id", "snapshot_date")]
    probabilities = np.asarray(model.predict(src[features]))
    return src[["customer_id", "snapshot_date"]].assign(e_stay=probabilities[:, 0], e_churn=probabilities[:, 1])


def test_manifests_carry_the_model_version_labels_and_settings() -> None:
    from app.config import Settings

    settings = Settings(
        deployer="seldon",
        k8s_namespace="models",
        k8s_endpoint_template="",
        seldon_v2_mesh_url="http://seldon-mesh.{namespace}.svc.cluster.local",
        k8s_storage_secret="model-storage",
        k8s_image="registry.example/mlserver:1.7.1",
        seldon_parameters={"xtype": "DataFrame"},
        k8s_replicas=2,
        seldon_protocol="seldon",
        deployment_ttl_s=3600,
    )
    job_id = str(uuid.uuid4())
    name = deployment_name(job_id)
    seldon = SeldonDeployer(settings=settings).manifest(name=name, job_id=job_id, model=PLACEHOLDER_MODEL)
    assert seldon["apiVersion"] == "machinelearning.seldon.io/v1" and seldon["kind"] == "SeldonDeployment"
    labels = seldon["metadata"]["labels"]
    assert labels[MANAGED_BY_LABEL] == "retrotest" and labels[JOB_ID_LABEL] == job_id
    assert labels[INSTANCE_LABEL] == settings.queue_name
    assert abs(int(labels[EXPIRES_AT_LABEL]) - (time.time() + 3600)) < 5
    predictor = seldon["spec"]["predictors"][0]
    assert seldon["spec"]["protocol"] == "seldon" and predictor["replicas"] == 2
    assert predictor["graph"] | {"children": []} == {
        "name": name,
        "type": "MODEL",
        "implementation": "MLFLOW_SERVER",
        "modelUri": "s3://models/churn/1",
        "envSecretRefName": "model-storage",
        "parameters": [{"name": "xtype", "value": "DataFrame", "type": "STRING"}],
        "children": [],
    }
    container = predictor["componentSpecs"][0]["spec"]["containers"][0]
    assert container["image"] == "registry.example/mlserver:1.7.1"
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }

    model = SeldonV2Deployer(settings=settings).manifest(name=name, job_id=job_id, model=PLACEHOLDER_MODEL)
    assert model["apiVersion"] == "mlops.seldon.io/v1alpha1" and model["kind"] == "Model"
    assert model["spec"] == {
        "storageUri": "s3://models/churn/1",
        "requirements": ["mlflow"],
        "replicas": 2,
        "memory": "1Gi",
        "secretName": "model-storage",
    }

    isvc = KServeDeployer(settings=settings).manifest(name=name, job_id=job_id, model=PLACEHOLDER_MODEL)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]
    assert predictor["model"]["modelFormat"] == {"name": "mlflow"} and predictor["model"]["protocolVersion"] == "v2"
    assert predictor["model"]["storageUri"] == "s3://models/churn/1"
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["serviceAccountName"]) == (
        2,
        2,
        "model-storage",
    )


def test_endpoints_are_in_cluster_services_unless_a_template_is_set() -> None:
    from app.config import Settings

    base = {"k8s_namespace": "models", "seldon_v2_mesh_url": "http://seldon-mesh.{namespace}.svc.cluster.local"}
    plain = Settings(k8s_endpoint_template="", **base)  # type: ignore[arg-type]
    name = "retro-0123456789abcdef01234567"
    seldon = SeldonDeployer(settings=plain).deployment(name)
    assert seldon.base_url == f"http://{name}-default.models.svc.cluster.local:8000" and seldon.protocol == "v2"
    assert (
        KServeDeployer(settings=plain).deployment(name).base_url == f"http://{name}-predictor.models.svc.cluster.local"
    )
    mesh = SeldonV2Deployer(settings=plain).deployment(name)
    assert mesh.base_url == "http://seldon-mesh.models.svc.cluster.local"
    assert mesh.headers == {"Seldon-Model": name} and mesh.model_name == name

    gateway = Settings(k8s_endpoint_template="https://models.example.com/seldon/{namespace}/{name}/", **base)  # type: ignore[arg-type]
    assert (
        SeldonDeployer(settings=gateway).deployment(name).base_url == f"https://models.example.com/seldon/models/{name}"
    )
    with pytest.raises(ValueError, match="RETRO_K8S_ENDPOINT_TEMPLATE"):
        KServeDeployer(settings=Settings(k8s_endpoint_template="http://{host}/{name}"))


def test_label_values_are_valid_whatever_the_queue_is_called() -> None:
    from app.config import Settings

    manifest = KServeDeployer(settings=Settings(queue_name="jobs:prod/1.")).manifest(
        name="retro-x", job_id=str(uuid.uuid4()), model=PLACEHOLDER_MODEL
    )
    assert manifest["metadata"]["labels"][INSTANCE_LABEL] == "jobs-prod-1"
    assert label_value("-" + "a" * 70) == "a" * 62


def test_calls_outside_the_declared_rbac_rules_are_refused() -> None:
    with pytest.raises(RuntimeError, match="not declared in API_RULES"):
        CustomResources._allow(SELDON_DEPLOYMENT, "patch")


@pytest.mark.parametrize(
    ("deployer", "protocol"),
    # Seldon v1 with the (default) V2 protocol scores through the same gateway path in the killed-worker test.
    [("seldon", "seldon"), ("seldon_v2", "v2"), ("kserve", "v2")],
    ids=["seldon-v1-seldonprotocol", "seldon-v2", "kserve"],
)
def test_a_retro_test_runs_end_to_end_through_each_kind(
    deployer: str,
    protocol: str,
    cluster: ApiServer,
    operator: TestOperator,
    retro_data: None,
    expected_scores: pd.DataFrame,
) -> None:
    from app.core.jobs import State
    from app.integrations.wiring import make_registry

    settings = k8s_settings(deployer, seldon_protocol=protocol)
    job_id = new_job()
    name = deployment_name(job_id)
    operator.mesh_requests.clear()

    state = run(job_id, settings)

    job = job_row(job_id)
    assert state == State.succeeded, (job.error_code, job.error_message)
    assert job.rows_read == job.rows_scored == HISTORY_DAYS * ROWS_PER_DAY
    # The resource the deployer created, as the operator saw it.
    obj = operator.seen[name]
    assert obj["metadata"]["namespace"] == NAMESPACE
    assert obj["metadata"]["labels"][JOB_ID_LABEL] == str(job_id)
    assert obj["metadata"]["labels"][MANAGED_BY_LABEL] == "retrotest"
    # The registry's URI is a local path no operator fetches: the deployer staged the model to S3.
    model = make_registry(settings).resolve(name="churn", version="1")
    assert not model.artifact_uri.startswith("s3://")
    assert artifact_uri(KINDS[deployer], obj).startswith(f"s3://{BUCKET}/staging/models/")
    if deployer == "seldon":
        assert obj["spec"]["protocol"] == protocol
    if deployer == "seldon_v2":
        # Every request went through the mesh, which routes by the Seldon-Model header alone.
        assert len(operator.mesh_requests) >= HISTORY_DAYS
        assert {header for _, header in operator.mesh_requests} == {name}
    else:
        assert operator.mesh_requests == []
    # The scores are the model's, row for row.
    scores = pq.read_table(results_path(job.result_location) / "scores.parquet").to_pandas()
    assert list(scores.columns) == ["customer_id", "snapshot_date", "p_stay", "p_churn"]
    merged = expected_scores.merge(scores, on=["customer_id", "snapshot_date"], how="outer", indicator=True)
    assert (merged["_merge"] == "both").all() and len(merged) == len(expected_scores)
    assert max(np.abs(merged.e_stay - merged.p_stay).max(), np.abs(merged.e_churn - merged.p_churn).max()) <= 1e-9
    assert cluster.objects() == []


@pytest.mark.parametrize("deployer", KINDS)
def test_a_failed_deployment_ends_the_job_within_seconds_with_the_operators_message(
    deployer: str, cluster: ApiServer, operator: TestOperator, retro_data: None
) -> None:
    from app.core.jobs import State

    job_id = new_job()
    name = deployment_name(job_id)
    message = f"back-off pulling image mlserver:0.0-missing for {deployer}"
    operator.scripts[name] = Fail(message)
    started = time.monotonic()
    state = run(job_id, k8s_settings(deployer))
    elapsed = time.monotonic() - started
    job = job_row(job_id)
    assert state == State.failed and job.error_code == "deployment_failed", job.error_message
    assert message in job.error_message and f"{KINDS[deployer].kind} {name}" in job.error_message
    assert elapsed < 60, elapsed  # the operator's message, not the 180-s deploy timeout (seconds when quiet)
    assert "scoring" not in job.stage_started
    assert cluster.objects() == []


@pytest.mark.parametrize("deployer", KINDS)
def test_the_readiness_timeout_says_what_it_waited_for(
    deployer: str, cluster: ApiServer, operator: TestOperator, retro_data: None
) -> None:
    from app.core.jobs import State

    job_id = new_job()
    name = deployment_name(job_id)
    operator.scripts[name] = Hang()
    state = run(job_id, k8s_settings(deployer, deploy_ready_timeout_s=1))
    job = job_row(job_id)
    kind = KINDS[deployer]
    assert state == State.failed and job.error_code == "deployment_failed"
    assert job.error_message.startswith(
        f"the {kind.kind} {name} in namespace {NAMESPACE} was not {kind.ready_word} within 1 s; last state: "
    ), job.error_message
    assert ("Creating" if deployer == "seldon" else "Ready=False") in job.error_message
    assert cluster.objects() == []


@pytest.mark.parametrize("deployer", KINDS)
def test_cancel_while_the_deployment_starts_stops_the_job_and_deletes_the_resource(
    deployer: str, cluster: ApiServer, operator: TestOperator, retro_data: None
) -> None:
    from app.core.jobs import RetroTest, State
    from app.db import get_session_factory

    job_id = new_job()
    name = deployment_name(job_id)
    operator.scripts[name] = Hang()
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(run, job_id, k8s_settings(deployer))
        wait_for(lambda: any(n == name for _, _, n in cluster.objects()), timeout_s=30, what="the resource")
        with get_session_factory()() as s, s.begin():
            s.get(RetroTest, job_id).cancel_requested = True  # what POST .../cancel does
        cancelled_at = time.monotonic()
        assert outcome.result(timeout=30) == State.cancelled
    # Seconds, not the 600 s deploy timeout; generous because a loaded 2-core machine took 6.9 s here alone.
    assert time.monotonic() - cancelled_at < 20
    assert job_row(job_id).error_message == "cancelled while the model server was starting"
    assert cluster.objects() == []


class KilledWorker:
    """The deployer as a killed worker leaves it: the stop in deployed()'s finally never happens."""

    def __init__(self, deployer: Any, *, die_when_ready_is_awaited: bool = False) -> None:
        self._deployer = deployer
        self._die = die_when_ready_is_awaited

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._deployer, attr)

    def wait_ready(self, deployment: Any, **kw: Any) -> None:
        if self._die:
            raise WorkerDied()  # killed while its deployment was starting
        self._deployer.wait_ready(deployment, **kw)

    def stop(self, name: str) -> None:
        pass


def reap_after_a_killed_worker(job_id: uuid.UUID, deployer: Any, cluster: ApiServer) -> None:
    """The reaper keeps the deployment while the job is active, deletes it once the job is terminal."""
    from app.core.jobs import RetroTest, State
    from app.core.transitions import advance
    from app.db import get_session_factory
    from worker.reaper import reap_deployments

    name = deployment_name(job_id)
    sessions = get_session_factory()
    # The job is still active (it may be redelivered): its deployment stays.
    assert reap_deployments(deployer=deployer, sessions=sessions) == []
    assert [n for _, _, n in cluster.objects()] == [name]
    # Once the job is terminal, the deployment goes; a second run finds nothing.
    with sessions() as s, s.begin():
        advance(s.get(RetroTest, job_id), State.failed, error_code="worker_lost", error_message="the worker died")
    assert reap_deployments(deployer=deployer, sessions=sessions) == [name]
    assert reap_deployments(deployer=deployer, sessions=sessions) == []
    assert cluster.objects() == []


def test_a_worker_killed_while_scoring_leaves_a_deployment_that_the_reaper_deletes(
    cluster: ApiServer, operator: TestOperator, retro_data: None
) -> None:
    from app.core.jobs import State
    from app.integrations.wiring import make_deployer, make_history_source

    # A window of 4 batches makes the writer reach the end of the first day before the source dies on the
    # second; with a wider window the death could outrun the first day's commit (as it could in a real crash).
    settings = k8s_settings("seldon", seldon_protocol="v2", score_window_batches=4)
    deployer = make_deployer(settings)
    real_source = make_history_source(settings)
    second_day = (HISTORY_START + timedelta(days=1)).isoformat()

    class DiesOnTheSecondDay:
        def __getattr__(self, attr: str) -> Any:
            return getattr(real_source, attr)

        def batches(self, query: Any, *, batch_rows: int) -> Any:
            yield from real_source.batches(query, batch_rows=500)
            if query.start.isoformat() == second_day:
                raise WorkerDied()

    job_id = new_job()
    with pytest.raises(WorkerDied):
        run(job_id, settings, deployer=KilledWorker(deployer), source=DiesOnTheSecondDay())
    crashed = job_row(job_id)
    assert (crashed.state, crashed.chunks_done, crashed.rows_scored) == (State.scoring, 1, ROWS_PER_DAY)
    assert operator.seen[deployment_name(job_id)]["spec"]["protocol"] == "v2"
    assert operator.backend(deployment_name(job_id)) is not None, "its model server should still be up"
    reap_after_a_killed_worker(job_id, deployer, cluster)


@pytest.mark.parametrize("deployer", KINDS)
def test_a_worker_killed_while_deploying_leaves_a_deployment_that_the_reaper_deletes(
    deployer: str, cluster: ApiServer, operator: TestOperator, retro_data: None
) -> None:
    from app.core.jobs import State
    from app.integrations.wiring import make_deployer

    real = make_deployer(k8s_settings(deployer))
    job_id = new_job()
    operator.scripts[deployment_name(job_id)] = Hang()
    with pytest.raises(WorkerDied):
        run(job_id, k8s_settings(deployer), deployer=KilledWorker(real, die_when_ready_is_awaited=True))
    assert job_row(job_id).state == State.deploying
    reap_after_a_killed_worker(job_id, real, cluster)


def test_the_reaper_deletes_orphaned_and_expired_deployments_and_nothing_it_does_not_manage(
    cluster: ApiServer, operator: TestOperator, retro_data: None
) -> None:
    from kubernetes import client

    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer
    from worker.reaper import reap_deployments

    settings = k8s_settings("kserve")
    deployer = make_deployer(settings)
    active, orphan = new_job(), uuid.uuid4()  # a queued job, and a job id the database does not know
    for job_id in (active, orphan):
        operator.scripts[deployment_name(job_id)] = Hang()
        deployer.start(name=deployment_name(job_id), job_id=str(job_id), model=PLACEHOLDER_MODEL)
    cfg = client.Configuration()
    cfg.host = cluster.url
    api = client.CustomObjectsApi(client.ApiClient(cfg))
    kind = INFERENCE_SERVICE
    foreign = {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": {"name": "someone-elses"}, "spec": {}}
    operator.scripts["someone-elses"] = Hang()
    api.create_namespaced_custom_object(kind.group, kind.version, NAMESPACE, kind.plural, foreign)
    try:
        sessions = get_session_factory()
        assert reap_deployments(deployer=deployer, sessions=sessions) == [deployment_name(orphan)]
        later = time.time() + settings.deployment_ttl_s + 1
        assert reap_deployments(deployer=deployer, sessions=sessions, now=later) == [deployment_name(active)]
        assert [n for _, _, n in cluster.objects()] == ["someone-elses"]
    finally:
        api.delete_namespaced_custom_object(kind.group, kind.version, NAMESPACE, kind.plural, "someone-elses")


def test_start_replaces_a_leftover_of_the_same_name_and_stop_is_idempotent(
    cluster: ApiServer, operator: TestOperator
) -> None:
    from app.integrations.wiring import make_deployer

    deployer = make_deployer(k8s_settings("seldon_v2"))
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    name = deployment_name(first)
    operator.scripts[name] = Hang()
    deployer.start(name=name, job_id=first, model=PLACEHOLDER_MODEL)
    deployment = deployer.start(name=name, job_id=second, model=PLACEHOLDER_MODEL)  # a redelivered attempt
    assert deployment.name == name
    managed = deployer.list_managed()
    assert [(m.name, m.job_id) for m in managed] == [(name, second)]
    deployer.stop(name)
    deployer.stop(name)  # already gone: fine
    assert cluster.objects() == []


def test_a_deleted_resource_ends_the_wait(cluster: ApiServer, operator: TestOperator) -> None:
    from app.errors import DeploymentFailed
    from app.integrations.wiring import make_deployer

    deployer = make_deployer(k8s_settings("seldon"))
    name = deployment_name(uuid.uuid4())
    operator.scripts[name] = Hang()
    deployment = deployer.start(name=name, job_id=str(uuid.uuid4()), model=PLACEHOLDER_MODEL)
    threading.Timer(0.5, deployer.stop, args=(name,)).start()
    with pytest.raises(DeploymentFailed, match=r"(was deleted while starting|no longer exists)"):
        deployer.wait_ready(deployment, timeout_s=30, should_stop=lambda: False)
    assert cluster.objects() == []
