"""What a real cluster refuses or keeps, through the test operator's rules (tests/k8s_operator.py, each citing its
upstream source): Pod Security "restricted", the kubelet's termination message, KServe's runtime ports and
deployment modes with Knative's init-container flag, Seldon v2's per-Server volume claims, and `retrotest k8s check`
reporting those settings.

Models are placeholders wherever the operator refuses or crashes the pod before fetching anything; a whole job runs
only for the gRPC port (the churn model, in the worker's own packages: no environment is built).
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from app.core.model_types import ModelVersionInfo
from app.errors import DeploymentFailed
from app.integrations.deployers import kserve as kserve_module
from app.integrations.deployers import kubernetes as k8s_deployers
from app.integrations.deployers.kserve import KServeDeployer
from app.integrations.deployers.kubernetes import INFERENCE_SERVICE, SELDON_DEPLOYMENT
from app.integrations.deployers.port import deployment_name
from app.integrations.deployers.seldon_v1 import SeldonDeployer
from app.integrations.deployers.seldon_v2 import SeldonV2Deployer
from tests.k8s.conftest import NAMESPACE, job_row, new_job, run, wait_for
from tests.k8s.conftest import k8s_settings as cluster_settings
from tests.k8s.test_environments import ENVIRONMENT, nothing_left, stageable_model
from tests.k8s_operator import ApiServer, Crash, Hang, TestOperator, pod_of, restricted_violations

MODEL = ModelVersionInfo(
    name="churn", version="3", run_id=None, source="", artifact_uri="s3://models/churn/3", inputs=(), outputs=()
)
DEPLOYERS = {"seldon": SeldonDeployer, "seldon_v2": SeldonV2Deployer, "kserve": KServeDeployer}
# KServe in RawDeployment where a test is about something other than Knative's init-container flag.
RAW = {"kserve_deployment_mode": "RawDeployment"}


def k8s_settings(kind: str, **overrides: Any) -> Any:
    """The deployer's settings with the environment built at pod start (RETRO_K8S_ENV_DELIVERY=install): the rules
    here are about the containers we add, and that is the delivery that adds an init container (a tarball adds
    none; tests/k8s/test_env_tarball.py runs those pods)."""
    return cluster_settings(kind, **{"k8s_env_delivery": "install", **overrides})


def model_for(deployer: Any) -> ModelVersionInfo:
    """Seldon v2's deployer stages a folder with a model-settings.json for a model with an environment, so its
    model must be one it can fetch; the others are given the operator's own URI."""
    return stageable_model() if isinstance(deployer, SeldonV2Deployer) else MODEL


def deployer_for(kind: str, **overrides: Any) -> Any:
    return DEPLOYERS[kind](settings=k8s_settings(kind, **(RAW if kind == "kserve" else {}), **overrides))


def new_name() -> tuple[str, str]:
    job_id = str(uuid.uuid4())
    return deployment_name(job_id), job_id


def failure_of(deployer: Any, name: str, job_id: str, *, timeout_s: float = 120) -> tuple[str, float]:
    """Start with the model environment (so an init container of ours is there), wait; the failure and how long."""
    deployment = deployer.start(name=name, job_id=job_id, model=model_for(deployer), environment=ENVIRONMENT)
    started = time.monotonic()
    try:
        with pytest.raises(DeploymentFailed) as failed:
            deployer.wait_ready(deployment, timeout_s=timeout_s, should_stop=lambda: False)
        return str(failed.value.detail), time.monotonic() - started
    finally:
        deployer.stop(name)


def test_every_container_we_add_passes_restricted_and_a_closed_clusters_settings_reach_it() -> None:
    """Manifests only: restricted by the operator's own admission rule; proxy and CA bundle in the containers that
    fetch (our init containers); image pull secrets on every pod."""
    closed = {
        "k8s_http_proxy": "http://proxy.corp:3128",
        "k8s_https_proxy": "http://proxy.corp:3128",
        "k8s_no_proxy": ".svc,.cluster.local,10.0.0.0/8",
        "k8s_ca_bundle_configmap": "corp-ca",
        "k8s_ca_bundle_key": "bundle.pem",
        "k8s_image_pull_secrets": ["corp-registry"],
    }
    for kind, cls in DEPLOYERS.items():
        deployer = cls(settings=k8s_settings(kind, **closed))
        name, job_id = new_name()
        if kind == "seldon_v2":
            server = deployer.server_manifest(name=name, job_id=job_id, environment=ENVIRONMENT)
            pod, ours = server["spec"]["podSpec"], server["spec"]["podSpec"]["containers"]
        else:
            obj = deployer.manifest(name=name, job_id=job_id, model=MODEL, environment=ENVIRONMENT)
            pod, ours = pod_of(SELDON_DEPLOYMENT if kind == "seldon" else INFERENCE_SERVICE, obj)
        assert restricted_violations(pod, ours) == "", kind
        for container in [*pod["initContainers"], *ours]:
            assert container["terminationMessagePolicy"] == "FallbackToLogsOnError", (kind, container["name"])
        [init] = pod["initContainers"]
        env = {e["name"]: e["value"] for e in init["env"]}
        assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://proxy.corp:3128"
        assert env["NO_PROXY"] == ".svc,.cluster.local,10.0.0.0/8"
        assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == "/etc/retro-ca/ca.crt"
        assert {"name": "retro-ca", "mountPath": "/etc/retro-ca", "readOnly": True} in init["volumeMounts"]
        ca = {"name": "corp-ca", "items": [{"key": "bundle.pem", "path": "ca.crt"}]}
        assert {"name": "retro-ca", "configMap": ca} in pod["volumes"]
        assert pod["imagePullSecrets"] == [{"name": "corp-registry"}]
        assert not any("PROXY" in str(c.get("env")) for c in ours), "the server container fetches nothing"
    # Without a model environment there is no init container, and nothing closed-cluster is added but pull secrets.
    plain = KServeDeployer(settings=k8s_settings("kserve", **closed)).manifest(name="retro-x", job_id="j", model=MODEL)
    predictor = plain["spec"]["predictor"]
    assert "initContainers" not in predictor and "volumes" not in predictor
    assert restricted_violations(*pod_of(INFERENCE_SERVICE, plain)) == ""


def test_the_admission_rule_names_what_each_container_misses() -> None:
    """The rule can fail: a bare container breaks all four checks, a pod-level runAsNonRoot covers one."""
    bare = {"name": "c"}
    message = restricted_violations({"containers": [bare]}, [bare])
    assert message.startswith('violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false')
    for check in ("unrestricted capabilities", "runAsNonRoot != true", "seccompProfile (pod or container"):
        assert check in message
    covered = restricted_violations({"containers": [bare], "securityContext": {"runAsNonRoot": True}}, [bare])
    assert "runAsNonRoot" not in covered and "seccompProfile" in covered


@pytest.mark.parametrize("kind", DEPLOYERS)
def test_a_pod_restricted_refuses_fails_the_deployment_with_the_admission_message(
    kind: str, cluster: ApiServer, operator: TestOperator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Containers as they were before issue 27: no securityContext.
    monkeypatch.setattr(k8s_deployers, "RESTRICTED_SECURITY_CONTEXT", {})
    monkeypatch.setattr(k8s_deployers, "_restricted", lambda container, run_as_user=None: None)
    name, job_id = new_name()
    message, took = failure_of(deployer_for(kind), name, job_id)
    assert 'is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false' in message
    assert "FailedCreate" in message and ("StatefulSet" if kind == "seldon_v2" else "ReplicaSet") in message
    assert took < 60, took
    nothing_left(cluster)


@pytest.mark.parametrize("kind", DEPLOYERS)
def test_a_crashing_container_fails_the_deployment_within_60_s_with_its_logs_last_lines(
    kind: str, cluster: ApiServer, operator: TestOperator
) -> None:
    name, job_id = new_name()
    log = "\n".join(f"uv: step {i}" for i in range(200)) + "\nerror: Failed to fetch: https://pypi.org/simple/mlflow/"
    operator.scripts[name] = Crash(log=log, exit_code=2)
    message, took = failure_of(deployer_for(kind), name, job_id)
    assert took < 60, took
    assert "container retro-env: exited with code 2: " in message, message
    assert message.endswith("error: Failed to fetch: https://pypi.org/simple/mlflow/"), message
    assert "uv: step 199" in message and "uv: step 100\n" not in message  # the log's end, not all of it
    nothing_left(cluster)


def test_without_fallback_to_logs_a_crash_says_only_error(
    cluster: ApiServer, operator: TestOperator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the kubelet rule depends on the manifest, so the policy is what carries the log."""
    monkeypatch.setattr(k8s_deployers, "TERMINATION_MESSAGE_POLICY", "File")
    name, job_id = new_name()
    operator.scripts[name] = Crash(log="error: Failed to fetch", exit_code=2)
    message, _ = failure_of(deployer_for("kserve"), name, job_id)
    assert message.endswith("container retro-env: exited with code 2: Error"), message
    nothing_left(cluster)


@pytest.mark.parametrize(
    ("mode", "flag", "refused"),
    [
        ("", "disabled", True),
        ("Serverless", "disabled", True),
        ("", "enabled", False),
        ("RawDeployment", "disabled", False),
    ],
    ids=["default-serverless", "serverless", "serverless-flag-on", "raw-deployment"],
)
def test_kserve_serverless_refuses_init_containers_unless_knative_allows_them(
    mode: str, flag: str, refused: bool, cluster: ApiServer, operator: TestOperator
) -> None:
    deployer = KServeDeployer(settings=k8s_settings("kserve", kserve_deployment_mode=mode))
    name, job_id = new_name()
    operator.scripts[name] = Hang()  # admitted, never ready
    operator.set_cluster_config("knative-serving", "config-features", {"kubernetes.podspec-init-containers": flag})
    try:
        # Where nothing refuses it, the deployment waits out its timeout: 10 s shows no refusal came (a refusal
        # arrives within a few seconds, as the refused cases show against a 30 s timeout).
        message, took = failure_of(deployer, name, job_id, timeout_s=30 if refused else 10)
    finally:
        operator.set_cluster_config(
            "knative-serving", "config-features", {"kubernetes.podspec-init-containers": "disabled"}
        )
    obj = operator.seen[name]
    assert (obj["metadata"].get("annotations") or {}).get("serving.kserve.io/deploymentMode") == (mode or None)
    if refused:
        assert (
            "InferenceService " + name + ": InternalError: fails to reconcile predictor: admission webhook" in message
        )
        assert message.endswith("must not set the field(s): spec.template.spec.initContainers"), message
        assert took < 20, took  # the event, not the deploy timeout (30 s here)
    else:
        assert "was not Ready within 10 s" in message and "InternalError" not in message
    nothing_left(cluster)


def test_kserve_grpc_reaches_mlserver_only_on_the_runtimes_port(
    cluster: ApiServer, operator: TestOperator, retro_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLServer listens where KServe's runtime says (MLSERVER_GRPC_PORT=9000): the declared h2c port must be it."""
    import grpc

    from app.core.jobs import State
    from app.integrations.scoring.codecs import GRPC_MODEL_INFER
    from app.integrations.scoring.v2_grpc import inference_pb2
    from app.integrations.wiring import make_registry

    settings = k8s_settings("kserve", score_protocol="v2-grpc")
    job_id = new_job()
    assert run(job_id, settings) == State.succeeded, job_row(job_id).error_message
    assert operator.seen[deployment_name(job_id)]["spec"]["predictor"]["model"]["ports"][0]["containerPort"] == 9000

    # The port the deployer declared before: MLServer, started with the runtime's environment, is not there.
    monkeypatch.setattr(kserve_module, "KSERVE_MLSERVER_GRPC_PORT", 8081)
    deployer = KServeDeployer(settings=settings)
    model = make_registry(settings).resolve(name="churn", version="1")
    name, job_id = new_name()
    deployment = deployer.start(name=name, job_id=job_id, model=model)
    try:
        deployer.wait_ready(deployment, timeout_s=120, should_stop=lambda: False)
        with grpc.insecure_channel(operator.grpc_ingress.target) as channel:
            infer = channel.unary_unary(GRPC_MODEL_INFER)
            request = inference_pb2.ModelInferRequest(model_name=name).SerializeToString()
            with pytest.raises(grpc.RpcError) as refused:
                infer(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    finally:
        deployer.stop(name)
    nothing_left(cluster)


def test_after_20_seldon_v2_deployments_no_volume_claim_or_server_is_left(
    cluster: ApiServer, operator: TestOperator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each per-job Server gets the ServerConfig's 1Gi claim; its retention policy deletes it with the Server."""

    def cycle(deployer: SeldonV2Deployer) -> str:
        name, job_id = new_name()
        operator.scripts[name] = Hang()
        deployer.start(name=name, job_id=job_id, model=model_for(deployer), environment=ENVIRONMENT)
        claim = f"mlserver-models-{name}-0"
        try:
            wait_for(
                lambda: ("persistentvolumeclaims", NAMESPACE, claim) in cluster.objects(),
                timeout_s=10,
                what="the Server's volume claim",
            )
        finally:
            deployer.stop(name)
        return claim

    deployer = SeldonV2Deployer(settings=k8s_settings("seldon_v2"))
    with ThreadPoolExecutor(4) as pool:  # four workers' jobs at a time
        claims = list(pool.map(lambda _: cycle(deployer), range(20)))
    assert len(set(claims)) == 20
    nothing_left(cluster)
    assert not [o for o in cluster.objects() if o[0] in ("servers", "persistentvolumeclaims")]

    # The control: without the retention policy, Kubernetes keeps the claim.
    monkeypatch.setattr(SeldonV2Deployer, "claim_retention", staticmethod(lambda: {}))
    claim = cycle(deployer)
    time.sleep(1)
    assert [n for plural, _, n in cluster.objects()] == [claim]
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = cluster.url
    client.CoreV1Api(client.ApiClient(cfg)).delete_namespaced_persistent_volume_claim(claim, NAMESPACE)


def test_a_model_on_a_shared_seldon_v2_server_never_reads_other_servers_pods(operator: TestOperator) -> None:
    """Pods are read by the deployment's own Server name: the shared mlserver's pods are no job's business."""
    deployer = SeldonV2Deployer(settings=k8s_settings("seldon_v2"))
    assert deployer.pod_readiness(deployment_name(uuid.uuid4())) is None


def test_k8s_check_reports_kserves_mode_knatives_flag_and_seldons_server_config(
    cluster: ApiServer, operator: TestOperator
) -> None:
    from app.integrations.deployers import kubernetes_check as k8s_check
    from app.integrations.deployers.kubernetes import CustomResources

    steps = {"deployment mode": "_kserve_mode", "server config": "_server_config", "images": "_images"}

    def check(kind: str, name: str, **overrides: Any) -> Any:
        """One step of `retrotest k8s check` (run_checks runs them all; the staging step is another test's)."""
        settings = k8s_settings(kind, **overrides)
        step = getattr(k8s_check, steps[name])
        args = {"_kserve_mode": (settings, CustomResources(settings=settings))}.get(steps[name])
        args = args or ((CustomResources(settings=settings),) if name == "server config" else (settings,))
        try:
            return k8s_check.CheckResult(name, True, step(*args))
        except k8s_check.CheckFailed as exc:
            return k8s_check.CheckResult(name, False, str(exc))

    refused = check("kserve", "deployment mode")
    assert not refused.ok and "Serverless (the cluster's default Serverless)" in refused.detail
    assert "kubernetes.podspec-init-containers: disabled" in refused.detail and "RawDeployment" in refused.detail
    raw = check("kserve", "deployment mode", kserve_deployment_mode="RawDeployment")
    assert raw.ok and raw.detail.startswith("RawDeployment (serving.kserve.io/deploymentMode=RawDeployment")
    assert check("kserve", "deployment mode", model_env="worker").ok  # no init container: Serverless is fine
    operator.set_cluster_config("knative-serving", "config-features", {"kubernetes.podspec-init-containers": "enabled"})
    try:
        assert check("kserve", "deployment mode").ok
    finally:
        operator.set_cluster_config(
            "knative-serving", "config-features", {"kubernetes.podspec-init-containers": "disabled"}
        )

    server = check("seldon_v2", "server config")
    assert server.ok and "mlserver=mlserver:latest" in server.detail and "mlserver-models 1Gi" in server.detail
    images = check("seldon", "images", k8s_image="registry.corp/mlserver:1.6.1", env="prod", secret_key="x" * 64)
    assert not images.ok and "RETRO_K8S_IMAGE=registry.corp/mlserver:1.6.1" in images.detail
    pinned = "registry.corp/uv@sha256:" + "0" * 64
    assert check("seldon", "images", k8s_env_builder_image=pinned).ok
