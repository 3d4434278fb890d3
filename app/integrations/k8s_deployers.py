"""Temporary model deployments on Kubernetes: a Seldon Core v1 SeldonDeployment, a Seldon Core v2 Model or a KServe
InferenceService serving exactly one MLflow model version from its artifact URI.

Each deployment is one custom resource named after the job and labelled with the job id, the managing app and an
expiry time, so the reaper can find what a killed worker left behind. Readiness is watched, never polled: each
watch request lasts a couple of seconds, so a cancel is noticed between events, and a Failed state or failing
condition ends the wait at once with the operator's own message.

Every call to the API goes through CustomResources, which refuses any verb not declared in API_RULES; the RBAC
Role in deploy/base/rbac.yaml grants exactly API_RULES (tests/test_deploy_manifests.py checks both).
"""

from __future__ import annotations

import contextlib
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
from app.errors import DeploymentFailed, JobCancelled
from app.integrations.deployers import Deployment, ManagedDeployment
from app.integrations.registry import ModelVersionInfo

log = logging.getLogger(__name__)

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "retrotest"
INSTANCE_LABEL = "app.kubernetes.io/instance"  # which retrotest installation (its queue name) owns it
JOB_ID_LABEL = "retrotest.io/job-id"
EXPIRES_AT_LABEL = "retrotest.io/expires-at"  # unix seconds

WATCH_WINDOW_S = 2  # one watch request lasts this long: should_stop() is checked at least this often
REPLACE_TIMEOUT_S = 60.0  # how long start() waits for a leftover of the same name to go away


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
INFERENCE_SERVICE = ResourceKind("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService", "Ready")


@dataclass(frozen=True)
class ApiRule:
    """One RBAC rule: the verbs this service calls on one resource."""

    group: str
    resource: str
    verbs: tuple[str, ...]


# Every Kubernetes API call the deployers and the reaper make: create (start), delete (stop, replace, reaper),
# list (list_managed), watch (wait_ready, replace). Nothing else; deploy/base/rbac.yaml must grant exactly this.
DEPLOYER_VERBS = ("create", "delete", "list", "watch")
API_RULES: tuple[ApiRule, ...] = tuple(
    ApiRule(group=k.group, resource=k.plural, verbs=DEPLOYER_VERBS)
    for k in (SELDON_DEPLOYMENT, SELDON_MODEL, INFERENCE_SERVICE)
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
        self._lock = threading.Lock()

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
            return self._api

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
class Readiness:
    """How the operator reports a resource right now."""

    state: str  # the operator's words, for messages
    ready: bool = False
    failure: str | None = None  # the operator's message when it has given up


class KubernetesDeployer:
    """One custom resource per deployment; subclasses say what the resource is and how its operator reports it."""

    kind: ClassVar[ResourceKind]

    def __init__(self, *, settings: Settings, resources: CustomResources | None = None) -> None:
        self._settings = settings
        self._resources = resources or CustomResources(settings=settings)
        self._namespace = settings.k8s_namespace
        self._instance = label_value(settings.queue_name)
        _check_template(settings.k8s_endpoint_template, "RETRO_K8S_ENDPOINT_TEMPLATE")
        _check_template(settings.k8s_grpc_endpoint_template, "RETRO_K8S_GRPC_ENDPOINT_TEMPLATE")

    # What each kind defines.
    def spec(self, *, name: str, model: ModelVersionInfo) -> dict[str, Any]:
        raise NotImplementedError

    def readiness(self, obj: dict[str, Any]) -> Readiness:
        raise NotImplementedError

    def deployment(self, name: str) -> Deployment:
        raise NotImplementedError

    # The shared life cycle.
    def _what(self, name: str) -> str:
        return f"the {self.kind.kind} {name} in namespace {self._namespace}"

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

    def manifest(self, *, name: str, job_id: str, model: ModelVersionInfo) -> dict[str, Any]:
        """The whole object: kind, name, labels (managed-by, instance, job id, expiry) and spec."""
        expires_at = int(time.time()) + self._settings.deployment_ttl_s
        labels = {
            MANAGED_BY_LABEL: MANAGED_BY,
            INSTANCE_LABEL: self._instance,
            JOB_ID_LABEL: label_value(job_id),
            EXPIRES_AT_LABEL: str(expires_at),
        }
        return {
            "apiVersion": self.kind.api_version,
            "kind": self.kind.kind,
            "metadata": {"name": name, "namespace": self._namespace, "labels": labels},
            "spec": self.spec(name=name, model=model),
        }

    def start(self, *, name: str, job_id: str, model: ModelVersionInfo) -> Deployment:
        body = self.manifest(name=name, job_id=job_id, model=model)
        try:
            try:
                self._resources.create(self.kind, body)
            except ResourceExists:
                log.info("%s already exists, left by an earlier attempt; replacing it", self._what(name))
                self._replace(name, body)
        except DeploymentFailed:
            raise
        except Exception as exc:
            raise DeploymentFailed(f"cannot create {self._what(name)}: {_describe_error(exc)}") from exc
        log.info("created %s for model %s version %s", self._what(name), model.name, model.version)
        return self.deployment(name)

    def _replace(self, name: str, body: dict[str, Any]) -> None:
        self._resources.delete(self.kind, name)
        deadline = time.monotonic() + REPLACE_TIMEOUT_S
        while True:
            try:
                self._resources.create(self.kind, body)
                return
            except ResourceExists:
                if time.monotonic() >= deadline:
                    raise DeploymentFailed(
                        f"{self._what(name)} was left by an earlier attempt and is still being deleted"
                    ) from None
            # Still terminating (finalizers): wait until its deletion goes by or a window passes.
            with contextlib.closing(self._resources.watch(self.kind, name, window_s=WATCH_WINDOW_S)) as events:
                for event, _ in events:
                    if event == "DELETED":
                        break

    def wait_ready(self, deployment: Deployment, *, timeout_s: float, should_stop: Callable[[], bool]) -> None:
        name = deployment.name
        deadline = time.monotonic() + timeout_s
        last = "not seen yet"
        empty_windows = 0
        while True:
            if should_stop():
                raise JobCancelled("cancelled while the model server was starting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeploymentFailed(
                    f"{self._what(name)} was not {self.kind.ready_word} within {timeout_s:.0f} s; last state: {last}"
                )
            seen = False
            window = self._resources.watch(self.kind, name, window_s=min(WATCH_WINDOW_S, remaining))
            try:
                for event, obj in window:
                    seen = True
                    if event == "DELETED":
                        raise DeploymentFailed(f"{self._what(name)} was deleted while starting")
                    status = self.readiness(obj)
                    last = status.state
                    if status.failure is not None:
                        raise DeploymentFailed(f"{self._what(name)} failed: {status.failure}")
                    if status.ready:
                        log.info("%s is %s", self._what(name), self.kind.ready_word)
                        return
                    if should_stop() or time.monotonic() >= deadline:
                        break
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
        try:
            if self._resources.delete(self.kind, name):
                log.info("deleted %s", self._what(name))
        except Exception as exc:
            raise DeploymentFailed(f"cannot delete {self._what(name)}: {_describe_error(exc)}") from exc

    def list_managed(self) -> list[ManagedDeployment]:
        selector = f"{MANAGED_BY_LABEL}={MANAGED_BY},{INSTANCE_LABEL}={self._instance}"
        try:
            items = self._resources.list_labelled(self.kind, label_selector=selector)
        except Exception as exc:
            raise DeploymentFailed(
                f"cannot list {self.kind.plural} in {self._namespace}: {_describe_error(exc)}"
            ) from exc
        managed = []
        for obj in items:
            meta = obj.get("metadata") or {}
            labels = meta.get("labels") or {}
            if labels.get(MANAGED_BY_LABEL) != MANAGED_BY or labels.get(INSTANCE_LABEL) != self._instance:
                continue  # a server that ignores the label selector
            if meta.get("deletionTimestamp"):
                continue  # already being deleted
            managed.append(
                ManagedDeployment(
                    name=str(meta.get("name")),
                    job_id=labels.get(JOB_ID_LABEL),
                    expires_at=_to_float(labels.get(EXPIRES_AT_LABEL)),
                )
            )
        return managed


class SeldonDeployer(KubernetesDeployer):
    """Seldon Core v1: a SeldonDeployment with one MLFLOW_SERVER graph node; protocol v2 (MLServer) or seldon."""

    kind = SELDON_DEPLOYMENT
    predictor = "default"

    def spec(self, *, name: str, model: ModelVersionInfo) -> dict[str, Any]:
        s = self._settings
        graph: dict[str, Any] = {
            "name": name,
            "type": "MODEL",
            "implementation": "MLFLOW_SERVER",
            "modelUri": model.artifact_uri,
            "children": [],
        }
        if s.k8s_storage_secret:
            graph["envSecretRefName"] = s.k8s_storage_secret
        if s.seldon_parameters:
            graph["parameters"] = [
                {"name": k, "value": v, "type": "STRING"} for k, v in sorted(s.seldon_parameters.items())
            ]
        container: dict[str, Any] = {"name": name, "resources": self._resources_spec()}
        if s.k8s_image:
            container["image"] = s.k8s_image
        predictor = {
            "name": self.predictor,
            "replicas": s.k8s_replicas,
            "graph": graph,
            "componentSpecs": [{"spec": {"containers": [container]}}],
        }
        return {"protocol": s.seldon_protocol, "predictors": [predictor]}

    def readiness(self, obj: dict[str, Any]) -> Readiness:
        status = obj.get("status") or {}
        state = str(status.get("state") or "no status yet")
        if state == "Available":
            return Readiness(state=state, ready=True)
        if state == "Failed":
            return Readiness(state=state, failure=str(status.get("description") or "Failed, without a description"))
        return Readiness(state=state + (f" ({status['description']})" if status.get("description") else ""))

    def deployment(self, name: str) -> Deployment:
        service = f"{name}-{self.predictor}.{self._namespace}.svc.cluster.local"
        # With protocol v2 the executor serves V2 gRPC on the service's gRPC port; the Seldon protocol's gRPC
        # API is another one, so that deployment is scored over REST.
        v2 = self._settings.seldon_protocol == "v2"
        return Deployment(
            name=name,
            base_url=self._base_url(name, in_cluster=f"http://{service}:8000"),
            model_name=name,
            protocol=self._settings.seldon_protocol,
            grpc_target=self._grpc_target(name, in_cluster=f"{service}:5001") if v2 else None,
        )


class SeldonV2Deployer(KubernetesDeployer):
    """Seldon Core v2: a Model on an MLServer server with the mlflow capability, reached through the mesh."""

    kind = SELDON_MODEL

    def __init__(self, *, settings: Settings, resources: CustomResources | None = None) -> None:
        super().__init__(settings=settings, resources=resources)
        _check_template(settings.seldon_v2_mesh_url, "RETRO_SELDON_V2_MESH_URL")
        _check_template(settings.seldon_v2_mesh_grpc, "RETRO_SELDON_V2_MESH_GRPC")

    def spec(self, *, name: str, model: ModelVersionInfo) -> dict[str, Any]:
        s = self._settings
        spec: dict[str, Any] = {
            "storageUri": model.artifact_uri,
            "requirements": ["mlflow"],
            "replicas": s.k8s_replicas,
            "memory": s.k8s_memory_request,
        }
        if s.k8s_storage_secret:
            spec["secretName"] = s.k8s_storage_secret
        return spec

    def readiness(self, obj: dict[str, Any]) -> Readiness:
        return _readiness_from_conditions(obj)

    def deployment(self, name: str) -> Deployment:
        # The mesh routes by the Seldon-Model header; the path names the model too.
        mesh = self._settings.seldon_v2_mesh_url.format(name=name, namespace=self._namespace).rstrip("/")
        mesh_grpc = self._settings.seldon_v2_mesh_grpc.format(name=name, namespace=self._namespace)
        return Deployment(
            name=name,
            base_url=mesh,
            model_name=name,
            protocol="v2",
            headers={"Seldon-Model": name},
            grpc_target=mesh_grpc,
        )


class KServeDeployer(KubernetesDeployer):
    """KServe: an InferenceService with the mlflow model format over the Open Inference Protocol (v2)."""

    kind = INFERENCE_SERVICE

    def spec(self, *, name: str, model: ModelVersionInfo) -> dict[str, Any]:
        s = self._settings
        model_spec: dict[str, Any] = {
            "modelFormat": {"name": "mlflow"},
            "protocolVersion": "v2",
            "storageUri": model.artifact_uri,
            "resources": self._resources_spec(),
        }
        if s.k8s_image:
            model_spec["image"] = s.k8s_image
        if self._grpc:
            # KServe routes one port per predictor: naming it h2c makes that port MLServer's gRPC server.
            model_spec["ports"] = [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]
        predictor: dict[str, Any] = {"minReplicas": s.k8s_replicas, "maxReplicas": s.k8s_replicas, "model": model_spec}
        if s.k8s_storage_secret:
            predictor["serviceAccountName"] = s.k8s_storage_secret  # a ServiceAccount that carries the storage Secret
        return {"predictor": predictor}

    def readiness(self, obj: dict[str, Any]) -> Readiness:
        status = obj.get("status") or {}
        model_status = status.get("modelStatus") or {}
        transition = model_status.get("transitionStatus")
        if transition in ("BlockedByFailedLoad", "InvalidSpec"):
            info = model_status.get("lastFailureInfo") or {}
            return Readiness(
                state=str(transition), failure=str(info.get("message") or info.get("reason") or transition)
            )
        return _readiness_from_conditions(obj)

    @property
    def _grpc(self) -> bool:
        """Whether the InferenceService serves V2 gRPC: it serves one port, so gRPC only when asked for by name."""
        return self._settings.score_protocol == "v2-grpc"

    def deployment(self, name: str) -> Deployment:
        service = f"{name}-predictor.{self._namespace}.svc.cluster.local"
        return Deployment(
            name=name,
            base_url=self._base_url(name, in_cluster=f"http://{service}"),
            model_name=name,
            grpc_target=self._grpc_target(name, in_cluster=f"{service}:80") if self._grpc else None,
        )


KUBERNETES_DEPLOYERS: dict[str, type[KubernetesDeployer]] = {
    "seldon": SeldonDeployer,
    "seldon_v2": SeldonV2Deployer,
    "kserve": KServeDeployer,
}


def _readiness_from_conditions(obj: dict[str, Any]) -> Readiness:
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


_LABEL_VALUE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def label_value(text: str) -> str:
    """text as a valid label value: letters, digits, '-', '_', '.'; at most 63; alphanumeric at both ends."""
    return _LABEL_VALUE_CHARS.sub("-", text)[:63].strip("-_.")


def _check_template(template: str, setting: str) -> None:
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
    return f"{type(exc).__name__}: {exc}"
