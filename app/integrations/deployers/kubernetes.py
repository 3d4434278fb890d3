"""Temporary model deployments on Kubernetes: a Seldon Core v1 SeldonDeployment, a Seldon Core v2 Model or a KServe
InferenceService serving exactly one MLflow model version from its artifact URI.

Each deployment is one custom resource named after the job and labelled with the job id, the managing app and an
expiry time, so the reaper can find what a killed worker left behind. Readiness is watched, never polled: each
watch request lasts a couple of seconds, so a cancel is noticed between events, and a Failed state or failing
condition ends the wait at once with the operator's own message.

With a model environment (app/integrations/environments/cache.py) the model server runs from the model's own packages,
delivered as RETRO_K8S_ENV_DELIVERY says:
- tarball (the default): the worker packs the environment it built and checked (app/integrations/environments/tarball.py)
  and stages it beside the model (app/integrations/deployers/staging.py), so the operator's own downloader fetches both with
  the credentials it already has; no init container, no index, no Python download. Seldon Core v1 and KServe run
  MLServer from the extracted environment (`<env>/bin/python -m mlserver.cli.main start`, an emptyDir to extract
  into); Seldon Core v2's standard mlserver Server loads it through MLServer's own `environment_tarball`, named in
  the staged folder's model-settings.json, when the environment holds the cluster's MLServer release
  (RETRO_SELDON_V2_MLSERVER_VERSION); an environment with another release gets a Server of its own, as below.
- install: an init container builds the environment with uv from the resolved pins (passed inline) into an
  emptyDir volume, and the server container runs that environment's `mlserver`. Seldon Core v2 has no pod settings
  on a Model, so there the deployment is a Model on a Server of its own, of the same name.

Every call to the API goes through CustomResources, which refuses any verb not declared in API_RULES; the RBAC
Role in deploy/base/rbac.yaml grants exactly API_RULES (tests/test_deploy_manifests.py checks both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, ClassVar, ParamSpec, TypeVar

from app.config import Settings
from app.core.model_types import ModelVersionInfo
from app.errors import DeploymentFailed, JobCancelled
from app.integrations.deployers.port import Deployment, ManagedDeployment
from app.integrations.deployers.staging import ModelStaging
from app.integrations.environments.cache import ModelEnvironment, environment_cache
from app.integrations.environments.tarball import TARBALL, EnvironmentPacker, PackedEnvironment

log = logging.getLogger(__name__)

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "retrotest"
INSTANCE_LABEL = "app.kubernetes.io/instance"  # which retrotest installation (its queue name) owns it
JOB_ID_LABEL = "retrotest.io/job-id"
EXPIRES_AT_LABEL = "retrotest.io/expires-at"  # unix seconds
# On a deployment serving from a model environment: which one, so an operator can tell what a server runs.
ENVIRONMENT_ANNOTATION = "retrotest.io/environment"  # the environment's key
PYTHON_ANNOTATION = "retrotest.io/python"
MLSERVER_ANNOTATION = "retrotest.io/mlserver"  # the MLServer (and mlserver-mlflow) release in it

# The environment is built into this volume, mounted at the same path in the init and the server container: the
# venv's interpreter links point into it.
ENV_VOLUME = "retro-env"
ENV_DIR = "/opt/retro-env"
# Writes the pins, creates the venv on a python-build-standalone interpreter installed inside the volume (so it runs
# in the server container whatever that image holds), then installs exactly the pins.
ENV_BUILD_SCRIPT = f"""set -eu
printf '%s\\n' "$RETRO_REQUIREMENTS_LOCK" > {ENV_DIR}/requirements.lock
uv venv --clear --managed-python --python "$RETRO_PYTHON" {ENV_DIR}/venv
uv pip sync --compile-bytecode --python {ENV_DIR}/venv/bin/python {ENV_DIR}/requirements.lock
"""
# With tarball delivery the server container extracts the environment, fetched with the model, into the volume and
# runs MLServer from it; the model itself is given as MLServer's default model (MLSERVER_MODEL_*), as KServe's MLServer
# runtime does, so the staged folder needs no model-settings.json. Its pool stays off (MLSERVER_PARALLEL_WORKERS=0):
# the whole server already runs in the environment.
ENV_RUN_SCRIPT = f"""set -eu
mkdir -p {ENV_DIR}/env
tar -xzf "$RETRO_MODELS_DIR/{TARBALL}" -C {ENV_DIR}/env
exec {ENV_DIR}/env/bin/python -m mlserver.cli.main start "$RETRO_MODELS_DIR"
"""
MLFLOW_RUNTIME = "mlserver_mlflow.MLflowRuntime"
# Where each platform puts the model for MLServer: KServe's and Seldon Core v1's storage initializers download it
# to /mnt/models (MLSERVER_MODEL_URI); Seldon Core v2's agent to MLSERVER_MODELS_DIR of the mlserver ServerConfig.
KSERVE_MODELS_DIR = "/mnt/models"
SELDON_V1_MODELS_DIR = "/mnt/models"
SELDON_V2_MODELS_DIR = "/mnt/agent/models"
SELDON_V2_SERVER_CONFIG = "mlserver"  # the ServerConfig a Seldon Core v2 install ships for MLServer

WATCH_WINDOW_S = 2  # one watch request lasts this long: should_stop() is checked at least this often
REPLACE_TIMEOUT_S = 60.0  # how long start() waits for a leftover of the same name to go away
CAPACITY_BACKOFF_MAX_S = 30.0  # the longest pause between looks at pods that wait for room in the cluster
# Container waiting reasons that no retry cures: a bad image, a missing Secret or ConfigMap.
FATAL_WAITING_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError")
# Warning events that say a deployment's pods will never exist, whatever the wait: KServe's reconcile error (an
# InternalError event on the InferenceService, kserve/kserve pkg/controller/v1beta1/inferenceservice/controller.go),
# and a controller refused a pod or revision (FailedCreate on a ReplicaSet or StatefulSet, with the admission
# controller's message: Pod Security, a webhook). A quota's FailedCreate ("exceeded quota") is waiting for room.
FATAL_EVENT_REASONS = ("InternalError", "FailedCreate")
CAPACITY_EVENT_WORDS = ("exceeded quota",)

# Pod Security "restricted" (kubernetes.io/docs/concepts/security/pod-security-standards, and the admission
# checks in kubernetes/pod-security-admission policy/check_*.go): what every container we add sets. On the
# container, not the pod: Knative refuses pod-level securityContext fields by default
# (config-features kubernetes.podspec-securitycontext), and the operators merge our containers into theirs.
RESTRICTED_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
# A failing container's status carries the end of its log (kubelet: the last 80 lines, at most 2048 bytes),
# not just "Error": that is what a job reports.
TERMINATION_MESSAGE_POLICY = "FallbackToLogsOnError"
# The CA bundle ConfigMap (RETRO_K8S_CA_BUNDLE_CONFIGMAP), mounted in the containers that fetch.
CA_VOLUME = "retro-ca"
CA_DIR = "/etc/retro-ca"
# KServe's MLServer runtime (kserve/kserve config/runtimes/kserve-mlserver.yaml, v0.15.2 to v0.20.0) starts
# MLServer with MLSERVER_HTTP_PORT=8080 and MLSERVER_GRPC_PORT=9000: a predictor's h2c port must be 9000.
KSERVE_MLSERVER_GRPC_PORT = 9000
KSERVE_DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
# Seldon Core v2 labels a Server's pods with its name (operator/controllers/reconcilers/server).
SELDON_SERVER_LABEL = "seldon-server-name"


@dataclass(frozen=True)
class ResourceKind:
    """A custom resource type, and what its operator calls being ready."""

    group: str
    version: str
    plural: str
    kind: str
    ready_word: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


SELDON_DEPLOYMENT = ResourceKind(
    "machinelearning.seldon.io", "v1", "seldondeployments", "SeldonDeployment", "Available"
)
SELDON_MODEL = ResourceKind("mlops.seldon.io", "v1alpha1", "models", "Model", "Ready")
SELDON_SERVER = ResourceKind("mlops.seldon.io", "v1alpha1", "servers", "Server", "Ready")
SELDON_SERVER_CONFIG = ResourceKind("mlops.seldon.io", "v1alpha1", "serverconfigs", "ServerConfig", "")
INFERENCE_SERVICE = ResourceKind("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService", "Ready")


@dataclass(frozen=True)
class ApiRule:
    """One RBAC rule: the verbs this service calls on one resource."""

    group: str
    resource: str
    verbs: tuple[str, ...]
    # Granted only on the objects the settings name (resourceNames), never the whole namespace.
    named: bool = False


# Every Kubernetes API call the deployers and the reaper make: create (start), delete (stop, replace, reaper),
# list (list_managed), watch (wait_ready, replace); list pods (wait_ready reads Seldon v1's, KServe's and a Seldon
# v2 Server's pods, whose statuses alone say a container crashed); list events (a pod or revision refused by an
# admission controller never exists: only a Warning event says why); get the storage Secret and ServiceAccount and
# Seldon v2's ServerConfig (`retrotest k8s check`), each by name. Nothing else; deploy/base/rbac.yaml must grant
# exactly this.
DEPLOYER_VERBS = ("create", "delete", "list", "watch")
PODS = ResourceKind("", "v1", "pods", "Pod", "Ready")
EVENTS = ResourceKind("", "v1", "events", "Event", "")
SECRETS = ResourceKind("", "v1", "secrets", "Secret", "")
SERVICE_ACCOUNTS = ResourceKind("", "v1", "serviceaccounts", "ServiceAccount", "")
CONFIG_MAPS = ResourceKind("", "v1", "configmaps", "ConfigMap", "")
API_RULES: tuple[ApiRule, ...] = (
    *(
        ApiRule(group=k.group, resource=k.plural, verbs=DEPLOYER_VERBS)
        for k in (SELDON_DEPLOYMENT, SELDON_MODEL, SELDON_SERVER, INFERENCE_SERVICE)
    ),
    ApiRule(group="", resource="pods", verbs=("list",)),
    ApiRule(group="", resource="events", verbs=("list",)),
    ApiRule(group="", resource="secrets", verbs=("get",), named=True),
    ApiRule(group="", resource="serviceaccounts", verbs=("get",), named=True),
    ApiRule(group=SELDON_SERVER_CONFIG.group, resource=SELDON_SERVER_CONFIG.plural, verbs=("get",), named=True),
)
# Read by `retrotest k8s check` only, outside the models namespace, where deploy/optional/rbac-check-config.yaml
# grants it: KServe's and Knative's settings. (namespace, ConfigMap name)
CLUSTER_CONFIG_MAPS: tuple[tuple[str, str], ...] = (
    ("kserve", "inferenceservice-config"),
    ("knative-serving", "config-features"),
)


class ResourceExists(Exception):
    """create() found an object of the same name."""


P = ParamSpec("P")
R = TypeVar("R")


def _retry_transient(fn: Callable[P, R]) -> Callable[P, R]:
    """Retry an API call on 429, 5xx and connection errors, three times with jittered backoff."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        for attempt in range(4):
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if attempt == 3 or not (exc.status == 429 or (exc.status or 0) >= 500):
                    raise
            except urllib3.exceptions.HTTPError:
                if attempt == 3:
                    raise
            time.sleep(random.uniform(0.5, 1.0) * 2**attempt)
        raise AssertionError("unreachable")

    return wrapper


class CustomResources:
    """The custom-objects API in one namespace, through the official client, limited to API_RULES."""

    def __init__(self, *, settings: Settings) -> None:
        self._settings = settings
        self.namespace = settings.k8s_namespace
        self._api: Any = None
        self._core: Any = None
        self._lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        """The settings it was made with."""
        return self._settings

    @property
    def where(self) -> str:
        """The API server, for messages."""
        return self._settings.k8s_api_url or ("in-cluster" if self._settings.k8s_in_cluster else "kubeconfig")

    def _client(self) -> Any:
        """A CustomObjectsApi, built once: RETRO_K8S_API_URL, else in-cluster, else the kubeconfig."""
        with self._lock:
            if self._api is None:
                from kubernetes import client, config

                cfg = client.Configuration()
                s = self._settings
                if s.k8s_api_url:
                    cfg.host = s.k8s_api_url.rstrip("/")
                elif s.k8s_in_cluster:
                    config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
                else:
                    config_file = str(s.k8s_kubeconfig) if s.k8s_kubeconfig else None
                    config.load_kube_config(  # type: ignore[no-untyped-call]
                        config_file=config_file, client_configuration=cfg
                    )
                self._api = client.CustomObjectsApi(client.ApiClient(cfg))
                self._core = client.CoreV1Api(self._api.api_client)
            return self._api

    def core(self) -> Any:
        """A CoreV1Api on the same connection."""
        self._client()
        return self._core

    @staticmethod
    def _allow(kind: ResourceKind, verb: str) -> None:
        if not any(r.group == kind.group and r.resource == kind.plural and verb in r.verbs for r in API_RULES):
            raise RuntimeError(
                f"{verb} on {kind.plural}.{kind.group} is not declared in API_RULES; "
                "declare it there and grant it in deploy/base/rbac.yaml"
            )

    @_retry_transient
    def create(self, kind: ResourceKind, body: dict[str, Any]) -> None:
        """Create an object; raise ResourceExists when one of the same name is there."""
        from kubernetes.client.exceptions import ApiException

        self._allow(kind, "create")
        try:
            self._client().create_namespaced_custom_object(kind.group, kind.version, self.namespace, kind.plural, body)
        except ApiException as exc:
            if exc.status == 409:
                raise ResourceExists(body["metadata"]["name"]) from exc
            raise

    @_retry_transient
    def delete(self, kind: ResourceKind, name: str) -> bool:
        """Delete an object (its dependents in the background); False when it was already gone."""
        from kubernetes.client.exceptions import ApiException

        self._allow(kind, "delete")
        try:
            self._client().delete_namespaced_custom_object(
                kind.group, kind.version, self.namespace, kind.plural, name, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    @_retry_transient
    def list_labelled(self, kind: ResourceKind, *, label_selector: str) -> list[dict[str, Any]]:
        """Objects matching the label selector."""
        self._allow(kind, "list")
        result = self._client().list_namespaced_custom_object(
            kind.group, kind.version, self.namespace, kind.plural, label_selector=label_selector
        )
        return list((result or {}).get("items") or [])

    @_retry_transient
    def list_pods(self, *, label_selector: str) -> list[dict[str, Any]]:
        """Pods matching the label selector, as plain dicts."""
        self._allow(PODS, "list")
        pods = self.core().list_namespaced_pod(self.namespace, label_selector=label_selector)
        return [self.core().api_client.sanitize_for_serialization(p) for p in pods.items or []]

    @_retry_transient
    def list_warning_events(self) -> list[dict[str, Any]]:
        """The namespace's Warning events, as plain dicts."""
        self._allow(EVENTS, "list")
        events = self.core().list_namespaced_event(self.namespace, field_selector="type=Warning")
        items = [self.core().api_client.sanitize_for_serialization(e) for e in events.items or []]
        return [e for e in items if e.get("type") == "Warning"]  # also when a server ignores the fieldSelector

    def get_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A cluster setting's ConfigMap (CLUSTER_CONFIG_MAPS) from its own namespace; None when it does not exist."""
        from kubernetes.client.exceptions import ApiException

        if (namespace, name) not in CLUSTER_CONFIG_MAPS:
            raise RuntimeError(f"ConfigMap {namespace}/{name} is not declared in CLUSTER_CONFIG_MAPS")
        try:
            obj = self.core().read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        result: dict[str, Any] = self.core().api_client.sanitize_for_serialization(obj)
        return result

    def get_custom(self, kind: ResourceKind, name: str) -> dict[str, Any] | None:
        """One custom object by name (Seldon v2's ServerConfig); None when it does not exist."""
        from kubernetes.client.exceptions import ApiException

        self._allow(kind, "get")
        try:
            obj: dict[str, Any] = self._client().get_namespaced_custom_object(
                kind.group, kind.version, self.namespace, kind.plural, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def get_core(self, kind: ResourceKind, name: str) -> dict[str, Any] | None:
        """A Secret or ServiceAccount as a plain dict; None when it does not exist."""
        from kubernetes.client.exceptions import ApiException

        self._allow(kind, "get")
        read = {SECRETS: "read_namespaced_secret", SERVICE_ACCOUNTS: "read_namespaced_service_account"}[kind]
        try:
            obj = getattr(self.core(), read)(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        result: dict[str, Any] = self.core().api_client.sanitize_for_serialization(obj)
        return result

    def watch(
        self, kind: ResourceKind, name: str, *, window_s: float
    ) -> Generator[tuple[str, dict[str, Any]], None, None]:
        """(event type, object) for one object during one watch window: its current state first, then changes.

        The window ends when the server closes the watch (timeoutSeconds) or, for a server that keeps it open,
        when nothing arrives for a little longer than that.
        """
        import urllib3
        from kubernetes import watch

        self._allow(kind, "watch")
        w = watch.Watch()  # type: ignore[no-untyped-call]
        stream = w.stream(  # type: ignore[no-untyped-call]
            self._client().list_namespaced_custom_object,
            kind.group,
            kind.version,
            self.namespace,
            kind.plural,
            field_selector=f"metadata.name={name}",
            timeout_seconds=max(1, round(window_s)),
            _request_timeout=(10, window_s + 1),
        )
        try:
            for event in stream:
                obj = event.get("raw_object") or {}
                if (obj.get("metadata") or {}).get("name") == name:  # also when a server ignores the fieldSelector
                    yield str(event.get("type")), obj
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError):
            return  # the window ended with no news
        finally:
            w.stop()  # type: ignore[no-untyped-call]
            stream.close()


@dataclass(frozen=True)
class EnvironmentParts:
    """What makes a pod's model server run from a model environment."""

    init_container: dict[str, Any]  # builds the environment into the volume
    volume: dict[str, Any]
    server: dict[str, Any]  # for the server container: its command and the volume's mount


@dataclass(frozen=True)
class Readiness:
    """How the operator reports a resource right now."""

    state: str  # the operator's words, for messages
    ready: bool = False
    failure: str | None = None  # the operator's message when it has given up
    capacity: bool = False  # waiting for room in the cluster: the wait goes on, up to the deploy timeout


class KubernetesDeployer:
    """One custom resource per deployment; subclasses say what the resource is and how its operator reports it."""

    kind: ClassVar[ResourceKind]
    # Kinds of objects start() may create beside the resource, under the same name (Seldon v2's own Server):
    # stop() deletes them and list_managed() lists them too, so the reaper finds them when the resource is gone.
    companion_kinds: ClassVar[tuple[ResourceKind, ...]] = ()
    # The URI schemes the operator's own downloader fetches; any other model is staged (app/integrations/deployers/staging.py).
    fetch_schemes: ClassVar[tuple[str, ...]] = ("s3", "gs")
    operator: ClassVar[str] = ""

    def __init__(self, *, settings: Settings, resources: CustomResources | None = None) -> None:
        self._settings = settings
        self._resources = resources or CustomResources(settings=settings)
        self._staging = ModelStaging(settings=settings)
        self._packer: EnvironmentPacker | None = None
        self._namespace = settings.k8s_namespace
        self._instance = label_value(settings.queue_name)
        check_template(settings.k8s_endpoint_template, "RETRO_K8S_ENDPOINT_TEMPLATE")
        check_template(settings.k8s_grpc_endpoint_template, "RETRO_K8S_GRPC_ENDPOINT_TEMPLATE")

    # What each kind defines.
    def spec(self, *, name: str, model: ModelVersionInfo, environment: ModelEnvironment | None) -> dict[str, Any]:
        raise NotImplementedError

    def readiness(self, obj: dict[str, Any]) -> Readiness:
        raise NotImplementedError

    def companion_readiness(self, obj: dict[str, Any]) -> Readiness | None:
        """How an object the resource runs on is doing (Seldon v2's own Server), or None when there is none."""
        return None

    def pod_readiness(self, name: str) -> Readiness | None:
        """What the resource's pods say when its status does not (Seldon v1), or None."""
        return None

    def deployment(self, name: str) -> Deployment:
        raise NotImplementedError

    def event_readiness(self, name: str, *, since: str | None = None) -> Readiness | None:
        """A Warning event since the resource was created that says its pods or revision will never exist."""
        return readiness_from_events(self._resources.list_warning_events(), name, since=since)

    # Every container we add: Pod Security "restricted", its log's end as its termination message; the ones that
    # fetch (our init containers) get the proxy and the CA bundle; every pod the image pull secrets.
    def _secure_pod(self, pod: dict[str, Any], *, containers: list[dict[str, Any]]) -> None:
        """Harden `containers` (merged by the operator into its own) and pod's initContainers, in place."""
        s = self._settings
        for container in containers:
            _restricted(container)
        init_containers = pod.get("initContainers") or []
        for container in init_containers:
            # Its image's user is not ours to rely on (uv's runs as root), so it is named.
            _restricted(container, run_as_user=s.k8s_run_as_user)
            container.setdefault("env", []).extend(self._egress_env())
            if s.k8s_ca_bundle_configmap:
                container.setdefault("volumeMounts", []).append(
                    {"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True}
                )
        if init_containers and s.k8s_ca_bundle_configmap:
            pod.setdefault("volumes", []).append(
                {
                    "name": CA_VOLUME,
                    "configMap": {
                        "name": s.k8s_ca_bundle_configmap,
                        "items": [{"key": s.k8s_ca_bundle_key, "path": "ca.crt"}],
                    },
                }
            )
        if s.k8s_image_pull_secrets:
            pod["imagePullSecrets"] = [{"name": secret} for secret in s.k8s_image_pull_secrets]

    def _egress_env(self) -> list[dict[str, str]]:
        """The proxy and CA bundle variables for a container that fetches (closed clusters)."""
        s = self._settings
        env: list[dict[str, str]] = []
        for names, value in (
            (("HTTP_PROXY", "http_proxy"), s.k8s_http_proxy),
            (("HTTPS_PROXY", "https_proxy"), s.k8s_https_proxy),
            (("NO_PROXY", "no_proxy"), s.k8s_no_proxy),
        ):
            if value:
                env.extend({"name": n, "value": value} for n in names)
        if s.k8s_ca_bundle_configmap:
            bundle = f"{CA_DIR}/ca.crt"
            env += [{"name": "SSL_CERT_FILE", "value": bundle}, {"name": "REQUESTS_CA_BUNDLE", "value": bundle}]
        return env

    # The shared life cycle.
    def _what(self, name: str, kind: ResourceKind | None = None) -> str:
        return f"the {(kind or self.kind).kind} {name} in namespace {self._namespace}"

    @property
    def _selector(self) -> str:
        """The label selector of every object this installation manages."""
        return f"{MANAGED_BY_LABEL}={MANAGED_BY},{INSTANCE_LABEL}={self._instance}"

    def _base_url(self, name: str, *, in_cluster: str) -> str:
        template = self._settings.k8s_endpoint_template
        url = template.format(name=name, namespace=self._namespace) if template else in_cluster
        return url.rstrip("/")

    def _grpc_target(self, name: str, *, in_cluster: str) -> str:
        template = self._settings.k8s_grpc_endpoint_template
        return template.format(name=name, namespace=self._namespace) if template else in_cluster

    def _resources_spec(self) -> dict[str, dict[str, str]]:
        s = self._settings
        return {
            "requests": {"cpu": s.k8s_cpu_request, "memory": s.k8s_memory_request},
            "limits": {"cpu": s.k8s_cpu_limit, "memory": s.k8s_memory_limit},
        }

    def _environment_parts(self, environment: ModelEnvironment, *, models_dir: str) -> EnvironmentParts:
        """An init container building the environment from its pins into a shared volume, and the server's command.

        The pins travel inline in an environment variable, so the deployment needs no other object. The
        interpreter is a python-build-standalone build uv installs into the volume, so the server container
        runs the environment whatever its image's own Python is.
        """
        s = self._settings
        env = [
            {"name": "RETRO_PYTHON", "value": environment.python},
            {"name": "RETRO_REQUIREMENTS_LOCK", "value": environment.lock},
            {"name": "UV_PYTHON_INSTALL_DIR", "value": f"{ENV_DIR}/python"},
            # In the volume: writable whatever user the pod runs as, and on the venv's file system, so uv links.
            {"name": "UV_CACHE_DIR", "value": f"{ENV_DIR}/cache"},
        ]
        if s.k8s_env_index_url:
            env.append({"name": "UV_INDEX_URL", "value": s.k8s_env_index_url})
        if s.k8s_env_python_mirror:
            env.append({"name": "UV_PYTHON_INSTALL_MIRROR", "value": s.k8s_env_python_mirror})
        mount = {"name": ENV_VOLUME, "mountPath": ENV_DIR}
        return EnvironmentParts(
            init_container={
                "name": ENV_VOLUME,
                "image": s.k8s_env_builder_image,
                "command": ["sh", "-c", ENV_BUILD_SCRIPT],
                "env": env,
                "resources": self._resources_spec(),
                "volumeMounts": [mount],
            },
            volume={"name": ENV_VOLUME, "emptyDir": {}},
            server={"command": [f"{ENV_DIR}/venv/bin/mlserver", "start", models_dir], "volumeMounts": [mount]},
        )

    def _metadata(self, *, name: str, job_id: str, environment: ModelEnvironment | None) -> dict[str, Any]:
        """Name, labels (managed-by, instance, job id, expiry) and, with an environment, annotations naming it."""
        expires_at = int(time.time()) + self._settings.deployment_ttl_s
        labels = {
            MANAGED_BY_LABEL: MANAGED_BY,
            INSTANCE_LABEL: self._instance,
            JOB_ID_LABEL: label_value(job_id),
            EXPIRES_AT_LABEL: str(expires_at),
        }
        metadata: dict[str, Any] = {"name": name, "namespace": self._namespace, "labels": labels}
        if environment is not None:
            metadata["annotations"] = {
                ENVIRONMENT_ANNOTATION: environment.key,
                PYTHON_ANNOTATION: environment.python,
                MLSERVER_ANNOTATION: environment.server_version,
            }
        return metadata

    def manifest(
        self, *, name: str, job_id: str, model: ModelVersionInfo, environment: ModelEnvironment | None = None
    ) -> dict[str, Any]:
        """The whole object: kind, metadata and spec."""
        return {
            "apiVersion": self.kind.api_version,
            "kind": self.kind.kind,
            "metadata": self._metadata(name=name, job_id=job_id, environment=environment),
            "spec": self.spec(name=name, model=model, environment=environment),
        }

    def objects(
        self, *, name: str, job_id: str, model: ModelVersionInfo, environment: ModelEnvironment | None
    ) -> list[tuple[ResourceKind, dict[str, Any]]]:
        """What start() creates, in order: anything the resource runs on first, then the resource."""
        return [(self.kind, self.manifest(name=name, job_id=job_id, model=model, environment=environment))]

    def start(
        self, *, name: str, job_id: str, model: ModelVersionInfo, environment: ModelEnvironment | None = None
    ) -> Deployment:
        model = self._servable(model, environment)
        for kind, body in self.objects(name=name, job_id=job_id, model=model, environment=environment):
            self._create(kind, body)
        log.info(
            "created %s for model %s version %s%s",
            self._what(name),
            model.name,
            model.version,
            f" in environment {environment.key}" if environment else "",
        )
        return self.deployment(name)

    # The environment as an artifact.
    def uses_tarball(self, environment: ModelEnvironment | None) -> bool:
        """Whether the pod gets the environment as a tarball fetched with the model (RETRO_K8S_ENV_DELIVERY)."""
        return environment is not None and self._settings.k8s_env_delivery == "tarball"

    def bundle_settings(self, environment: ModelEnvironment) -> dict[str, Any] | None:
        """The model-settings.json the staged folder carries, or None (the container names the model itself)."""
        return None

    def _servable(self, model: ModelVersionInfo, environment: ModelEnvironment | None) -> ModelVersionInfo:
        """The model with a URI the operator fetches: with a packed environment or model-settings, a staged bundle."""
        packed = self.pack(environment) if environment is not None and self.uses_tarball(environment) else None
        settings = self.bundle_settings(environment) if environment is not None else None
        if packed is None and settings is None:
            return self._staging.servable(model, schemes=self.fetch_schemes, operator=self.operator)
        if not self._staging.enabled:
            raise DeploymentFailed(
                f"{self.operator} fetches the model's environment with the model from one staged folder; set "
                "RETRO_MODEL_STAGING_URL to an s3:// or gs:// prefix its storage credentials can read "
                "(or RETRO_K8S_ENV_DELIVERY=install to build the environment at pod start from an index)"
            )
        uri = self._staging.stage_bundle(
            model,
            tarball=packed.path if packed else None,
            tarball_sha256=packed.sha256 if packed else "",
            model_settings=settings,
        )
        return dataclasses.replace(model, artifact_uri=uri)

    def pack(self, environment: ModelEnvironment) -> PackedEnvironment:
        """The environment's relocatable tarball, packed on this worker once per environment."""
        if not environment.path:
            raise DeploymentFailed(
                f"the environment {environment.key} was not built on this worker, so it cannot be packed; "
                "set RETRO_K8S_ENV_DELIVERY=install to build it at pod start"
            )
        if self._packer is None:
            cache = environment_cache(self._settings)
            if cache is None:
                raise DeploymentFailed("RETRO_MODEL_ENV=worker builds no model environment to pack")
            self._packer = EnvironmentPacker(cache=cache)
        return self._packer.pack(environment)

    def _tarball_server(self, *, name: str, models_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The volume the environment is extracted into, and the server container's command, env and mount."""
        mount = {"name": ENV_VOLUME, "mountPath": ENV_DIR}
        env = [
            {"name": "RETRO_MODELS_DIR", "value": models_dir},
            {"name": "MLSERVER_MODEL_NAME", "value": name},
            {"name": "MLSERVER_MODEL_IMPLEMENTATION", "value": MLFLOW_RUNTIME},
            {"name": "MLSERVER_MODEL_URI", "value": models_dir},
            {"name": "MLSERVER_PARALLEL_WORKERS", "value": "0"},
        ]
        server = {"command": ["sh", "-c", ENV_RUN_SCRIPT], "env": env, "volumeMounts": [mount]}
        return {"name": ENV_VOLUME, "emptyDir": {}}, server

    def _create(self, kind: ResourceKind, body: dict[str, Any]) -> None:
        """Create the object, replacing one of the same name an earlier attempt left."""
        name = body["metadata"]["name"]
        try:
            try:
                self._resources.create(kind, body)
            except ResourceExists:
                log.info("%s already exists, left by an earlier attempt; replacing it", self._what(name, kind))
                self._replace(kind, body)
        except DeploymentFailed:
            raise
        except Exception as exc:
            raise DeploymentFailed(f"cannot create {self._what(name, kind)}: {_describe_error(exc)}") from exc

    def _replace(self, kind: ResourceKind, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        self._resources.delete(kind, name)
        deadline = time.monotonic() + REPLACE_TIMEOUT_S
        while True:
            try:
                self._resources.create(kind, body)
                return
            except ResourceExists:
                if time.monotonic() >= deadline:
                    raise DeploymentFailed(
                        f"{self._what(name, kind)} was left by an earlier attempt and is still being deleted"
                    ) from None
            # Still terminating (finalizers): wait until its deletion goes by or a window passes.
            with contextlib.closing(self._resources.watch(kind, name, window_s=WATCH_WINDOW_S)) as events:
                for event, _ in events:
                    if event == "DELETED":
                        break

    def wait_ready(self, deployment: Deployment, *, timeout_s: float, should_stop: Callable[[], bool]) -> None:
        name = deployment.name
        deadline = time.monotonic() + timeout_s
        last, beside = "not seen yet", ""  # the resource's state; what it runs on, if anything
        current: dict[str, Any] | None = None
        empty_windows = 0
        next_pod_check, pod_wait, waiting_logged = 0.0, float(WATCH_WINDOW_S), False
        while True:
            if should_stop():
                raise JobCancelled("cancelled while the model server was starting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeploymentFailed(
                    f"{self._what(name)} was not {self.kind.ready_word} within {timeout_s:.0f} s; "
                    f"last state: {last}{beside}"
                )
            seen = False
            window = self._resources.watch(self.kind, name, window_s=min(WATCH_WINDOW_S, remaining))
            try:
                for event, obj in window:
                    seen = True
                    if event == "DELETED":
                        raise DeploymentFailed(f"{self._what(name)} was deleted while starting")
                    status = self.readiness(obj)
                    last, current = status.state, obj
                    if status.failure is not None:
                        raise DeploymentFailed(f"{self._what(name)} failed: {status.failure}")
                    if status.ready:
                        log.info("%s is %s", self._what(name), self.kind.ready_word)
                        return
                    if should_stop() or time.monotonic() >= deadline:
                        break
                companion = self.companion_readiness(current) if current is not None else None
                if companion is not None and companion.failure is not None:
                    raise DeploymentFailed(f"{self._what(name)} failed: {companion.failure}")
                beside = f"; {companion.state}" if companion is not None else ""
                if current is not None and time.monotonic() >= next_pod_check:
                    created = (current.get("metadata") or {}).get("creationTimestamp")
                    refused = self.event_readiness(name, since=str(created) if created else None)
                    if refused is not None and refused.failure is not None:
                        raise DeploymentFailed(f"{self._what(name)} failed: {refused.failure}")
                    pods = self.pod_readiness(name)
                    if pods is not None and pods.failure is not None:
                        raise DeploymentFailed(f"{self._what(name)} failed: {pods.failure}")
                    if pods is not None:
                        beside += f"; {pods.state}"
                    # Backoff while the cluster has no room: nothing changes until capacity frees.
                    pod_wait = min(pod_wait * 2, CAPACITY_BACKOFF_MAX_S) if pods and pods.capacity else WATCH_WINDOW_S
                    next_pod_check = time.monotonic() + pod_wait
                if "waiting for capacity" in last + beside and not waiting_logged:
                    log.info("%s is waiting for capacity: %s%s", self._what(name), last, beside)
                    waiting_logged = True
            except DeploymentFailed:
                raise
            except Exception as exc:
                if not _transient(exc):
                    raise DeploymentFailed(f"cannot watch {self._what(name)}: {_describe_error(exc)}") from exc
                last = f"{last} (the API server did not answer: {_describe_error(exc)})"
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            finally:
                window.close()
            # A watch opens with the object's current state: two windows without it mean it no longer exists.
            empty_windows = 0 if seen else empty_windows + 1
            if empty_windows >= 2:
                raise DeploymentFailed(f"{self._what(name)} no longer exists")

    def stop(self, name: str) -> None:
        for kind in (self.kind, *self.companion_kinds):
            try:
                if self._resources.delete(kind, name):
                    log.info("deleted %s", self._what(name, kind))
            except Exception as exc:
                raise DeploymentFailed(f"cannot delete {self._what(name, kind)}: {_describe_error(exc)}") from exc

    def has_exited(self, name: str) -> bool:
        """Never known at once here: the operator restarts a crashed pod, and retries, then readiness, decide."""
        return False

    def list_managed(self) -> list[ManagedDeployment]:
        """Every deployment this installation manages: its resource, or a companion the resource is gone from."""
        managed: dict[str, ManagedDeployment] = {}
        for kind in (self.kind, *self.companion_kinds):
            try:
                items = self._resources.list_labelled(kind, label_selector=self._selector)
            except Exception as exc:
                raise DeploymentFailed(
                    f"cannot list {kind.plural} in {self._namespace}: {_describe_error(exc)}"
                ) from exc
            for obj in items:
                meta = obj.get("metadata") or {}
                labels = meta.get("labels") or {}
                if labels.get(MANAGED_BY_LABEL) != MANAGED_BY or labels.get(INSTANCE_LABEL) != self._instance:
                    continue  # a server that ignores the label selector
                if meta.get("deletionTimestamp"):
                    continue  # already being deleted
                managed.setdefault(
                    str(meta.get("name")),
                    ManagedDeployment(
                        name=str(meta.get("name")),
                        job_id=labels.get(JOB_ID_LABEL),
                        expires_at=_to_float(labels.get(EXPIRES_AT_LABEL)),
                    ),
                )
        return list(managed.values())


def readiness_from_conditions(obj: dict[str, Any]) -> Readiness:
    """Ready when the Ready condition is True; failed when any condition is False for a reason naming a failure."""
    conditions = [c for c in (obj.get("status") or {}).get("conditions") or [] if isinstance(c, dict)]
    state = (
        ", ".join(
            f"{c.get('type')}={c.get('status')}"
            + (f" ({c.get('reason')}{': ' + str(c['message']) if c.get('message') else ''})" if c.get("reason") else "")
            for c in conditions
        )
        or "no conditions yet"
    )
    for c in conditions:
        if c.get("status") == "False" and "fail" in str(c.get("reason") or "").lower():
            return Readiness(state=state, failure=str(c.get("message") or c.get("reason")))
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return Readiness(state=state, ready=ready)


def readiness_from_pods(pods: list[dict[str, Any]]) -> Readiness | None:
    """A failure when a pod's container cannot run (crashed, bad image, missing Secret); capacity when unschedulable."""
    waiting_for_room = ""
    for pod in pods:
        pod_name = (pod.get("metadata") or {}).get("name")
        status = pod.get("status") or {}
        for c in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            problem = _container_problem(c)
            if problem:
                return Readiness(state="failing", failure=f"pod {pod_name}, container {c.get('name')}: {problem}")
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                waiting_for_room = f"pod {pod_name}: {cond.get('message') or 'Unschedulable'}"
    if waiting_for_room:
        return Readiness(state=f"waiting for capacity ({waiting_for_room})", capacity=True)
    return None


def readiness_from_events(events: list[dict[str, Any]], name: str, *, since: str | None = None) -> Readiness | None:
    """A failure when a Warning event on the resource, or on an object named after it (its ReplicaSet, StatefulSet,
    Knative revision), says its pods will never exist; capacity when it is a quota. Events from before `since` (an
    earlier attempt's object of the same name) do not count."""
    waiting = ""
    for event in events:
        involved = event.get("involvedObject") or {}
        involved_name = str(involved.get("name") or "")
        if involved_name != name and not involved_name.startswith(f"{name}-"):
            continue
        if since and _event_time(event) and _event_time(event) < _parse_time(since) - 1:  # stamps are in seconds
            continue
        reason, message = str(event.get("reason") or ""), str(event.get("message") or "").strip()
        if reason not in FATAL_EVENT_REASONS:
            continue
        what = f"{involved.get('kind') or 'object'} {involved_name}: {reason}: {message[-1500:]}"
        if any(word in message for word in CAPACITY_EVENT_WORDS):
            waiting = what
            continue
        return Readiness(state="refused", failure=what)
    if waiting:
        return Readiness(state=f"waiting for capacity ({waiting})", capacity=True)
    return None


def _event_time(event: dict[str, Any]) -> float:
    stamp = event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
    return _parse_time(str(stamp)) if stamp else 0.0


def _parse_time(stamp: str) -> float:
    """RFC 3339 as the API server writes it (2026-01-02T03:04:05Z, maybe with fractions) to unix seconds; 0 if not."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _restricted(container: dict[str, Any], *, run_as_user: int | None = None) -> None:
    """Pod Security "restricted" on one container, and its log's end as its termination message, in place."""
    context = {**RESTRICTED_SECURITY_CONTEXT, **(container.get("securityContext") or {})}
    context.update(RESTRICTED_SECURITY_CONTEXT)  # ours win: these are the profile's requirements
    if run_as_user is not None:
        context.setdefault("runAsUser", run_as_user)
    container["securityContext"] = json.loads(json.dumps(context))  # a copy: manifests never share dicts
    container["terminationMessagePolicy"] = TERMINATION_MESSAGE_POLICY


def labelled(obj: dict[str, Any], selector: str) -> bool:
    """Whether obj carries the one label key=value selector names (for a server that ignores selectors)."""
    key, _, value = selector.partition("=")
    return bool(((obj.get("metadata") or {}).get("labels") or {}).get(key) == value)


def _container_problem(c: dict[str, Any]) -> str | None:
    """Why a container cannot run, in its own words; None while it may still come up."""
    state = c.get("state") or {}
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in FATAL_WAITING_REASONS:
        return f"{waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
    terminated = state.get("terminated") or (c.get("lastState") or {}).get("terminated") or {}
    if terminated and terminated.get("exitCode") not in (None, 0):
        message = str(terminated.get("message") or terminated.get("reason") or "").strip()
        return f"exited with code {terminated['exitCode']}: {message[-1000:]}"
    return None


def only_schedule_failed(obj: dict[str, Any]) -> bool:
    """Whether every failing condition is Seldon v2's ScheduleFailed (no server replica to place the Model on)."""
    conditions = [c for c in (obj.get("status") or {}).get("conditions") or [] if isinstance(c, dict)]
    failing = [c for c in conditions if c.get("status") == "False" and "fail" in str(c.get("reason") or "").lower()]
    return bool(failing) and all(c.get("reason") == "ScheduleFailed" for c in failing)


_LABEL_VALUE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def label_value(text: str) -> str:
    """text as a valid label value: letters, digits, '-', '_', '.'; at most 63; alphanumeric at both ends."""
    return _LABEL_VALUE_CHARS.sub("-", text)[:63].strip("-_.")


def check_template(template: str, setting: str) -> None:
    try:
        template.format(name="n", namespace="ns")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{setting} may only use {{name}} and {{namespace}}: {template!r} ({exc})") from None


def _to_float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _transient(exc: Exception) -> bool:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        return exc.status == 429 or (exc.status or 0) >= 500
    return isinstance(exc, urllib3.exceptions.HTTPError)


def _describe_error(exc: Exception) -> str:
    """The API server's own message when it sent one."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        message = ""
        try:
            message = str(json.loads(exc.body or "{}").get("message") or "")
        except (ValueError, AttributeError):
            message = str(exc.body or "")[:300]
        return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")
    import urllib3

    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        # urllib3's text repeats the whole URL and the pool; the API server's address and the cause are what help.
        cause = str(exc.reason).rsplit("] ", 1)[-1].rstrip("')\"")
        return f"cannot reach the Kubernetes API at {exc.pool.scheme}://{exc.pool.host}:{exc.pool.port} ({cause})"
    return f"{type(exc).__name__}: {exc}"
