"""A Kubernetes API emulator and a small operator for it, standing in for a cluster with Seldon Core and KServe.

ApiServer runs kmock's KubernetesEmulator (an in-memory API server over real HTTP) in a background thread. It knows
Seldon v2 Servers too, whose status a test reports itself: a Model naming its Server is ScheduleFailed until that
Server is Ready, as Seldon's scheduler has it (it places the Model once a replica of the Server connects).

TestOperator watches SeldonDeployments, Seldon v2 Models and KServe InferenceServices through that API with the
official client, as the real operators do: for each new resource it starts a real MLServer serving the
resource's modelUri/storageUri (LocalMLServerDeployer) and patches the resource's status the way its operator
would (Seldon v1: state Available + address; Seldon v2: Ready condition; KServe: Ready condition + url), or
Failed with a message when a test scripts that. When the resource is deleted it stops the MLServer.

It is no more lenient than the platforms (issue 27), each rule citing its upstream source where it is applied:
Pod Security "restricted" refuses a pod of ours with the admission controller's message as a FailedCreate event;
KServe in Serverless mode refuses init containers unless Knative's kubernetes.podspec-init-containers is enabled
(an InternalError event); a KServe predictor's MLServer listens where the runtime's environment says (8080, 9000),
so gRPC sent to another declared port is refused; a crashing container's status carries its log's end only with
terminationMessagePolicy FallbackToLogsOnError; a Seldon v2 Server gets its ServerConfig's volume claims, kept after
it unless its retention policy says Delete. install_cluster() creates the settings these rules read.

A pod whose model server runs from the model's own environment (RETRO_K8S_ENV_DELIVERY=tarball) is run as the pod
would run it (PodRun): Seldon v1's and KServe's container command as written in the manifest, with the runtime's
MLServer environment, the fetched model bind-mounted at /mnt/models and an emptyDir; Seldon v2's standard mlserver
Server as MLServer of the cluster's release (`seldon_v2_server_python`) honouring the folder's model-settings.json
after the agent's rewrite. Each runs under bubblewrap in a network namespace of its own (--unshare-net: only its
own loopback), reached through socat over unix sockets, so a pod that tried to download anything would fail.

Its gateway is the network in front of the model servers:
  /gateway/{namespace}/{name}/...  one deployment, like an ingress path (RETRO_K8S_ENDPOINT_TEMPLATE); for
                                   Seldon v1 with protocol "seldon" it answers /api/v1.0/predictions as Seldon's
                                   MLflow server does: a DataFrame of the rows, scored under the model's signature
                                   (here: translated to V2 with the signature's datatypes, nulls kept)
  /mesh/{namespace}/...            the Seldon v2 mesh: routes by the Seldon-Model header alone, so a client
                                   that does not send it gets a 404
and its gRPC gateways do the same for V2 gRPC (ModelInfer): `grpc_ingress` routes by the request's model name
(RETRO_K8S_GRPC_ENDPOINT_TEMPLATE), `grpc_mesh` by the seldon-model header alone (RETRO_SELDON_V2_MESH_GRPC).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import yaml

from app.core.model_types import ModelVersionInfo
from app.errors import AppError
from app.integrations.deployers.kubernetes import (
    INFERENCE_SERVICE,
    KSERVE_MODELS_DIR,
    SELDON_DEPLOYMENT,
    SELDON_MODEL,
    SELDON_SERVER,
    SELDON_SERVER_CONFIG,
    SELDON_V2_MODELS_DIR,
    ResourceKind,
)
from app.integrations.deployers.local import LocalMLServerDeployer, find_server_executable, startup_failure
from app.integrations.deployers.port import Deployment
from app.integrations.environments.sandbox import ModelSandbox, python_roots
from app.integrations.scoring.codecs import GRPC_MODEL_INFER
from app.integrations.scoring.v2_grpc import inference_pb2

log = logging.getLogger(__name__)

KINDS = (SELDON_DEPLOYMENT, SELDON_MODEL, INFERENCE_SERVICE)  # what the operator serves models for
# Seldon v2 Servers: the operator makes their pods' volume claims, admits or refuses their pods, and leaves their
# status to the test, which reports it itself. ServerConfigs are the cluster's (install_cluster).
EMULATED_KINDS = (*KINDS, SELDON_SERVER, SELDON_SERVER_CONFIG)
# Core objects: the storage Secrets and ServiceAccounts a test creates, the pods, events and volume claims the
# operator makes, the cluster's settings (ConfigMaps).
CORE_RESOURCES = ("pods", "secrets", "serviceaccounts", "configmaps", "events", "persistentvolumeclaims")
CORE_KINDS = {
    "pods": "Pod",
    "secrets": "Secret",
    "serviceaccounts": "ServiceAccount",
    "configmaps": "ConfigMap",
    "events": "Event",
    "persistentvolumeclaims": "PersistentVolumeClaim",
}
# What the cluster is made of, or its history (events outlive their objects), rather than what a deployment leaves.
SETUP_RESOURCES = ("secrets", "serviceaccounts", "configmaps", "serverconfigs", "events")


class ApiServer:
    """kmock's KubernetesEmulator on a loopback port, served from its own event loop thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._emulator: Any = None
        self.url = ""
        self.denied: set[tuple[str, str]] = set()  # (resource, verb) SelfSubjectAccessReview answers "no" to
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes API emulator did not start")

    async def _serve(self) -> None:
        from kmock import KubernetesEmulator, Server

        self._stop = asyncio.Event()
        # No access log: its lines are noise in a test's output, and one written after a test closed the stream
        # pytest captured it with printed "--- Logging error ---" in the suite's output.
        logging.getLogger("aiohttp.access").disabled = True
        async with KubernetesEmulator() as emulator, Server(emulator) as server:
            for kind in EMULATED_KINDS:
                emulator.resources[f"{kind.group}/{kind.version}/{kind.plural}"] = {
                    "kind": kind.kind,
                    "namespaced": True,
                    "verbs": {"create", "delete", "get", "list", "patch", "watch"},
                    "subresources": {"status"},
                }
            for plural in CORE_RESOURCES:
                emulator.resources[f"v1/{plural}"] = {
                    "kind": CORE_KINDS[plural],
                    "namespaced": True,
                    "verbs": {"create", "delete", "get", "list", "patch", "watch"},
                }
            # SelfSubjectAccessReview, as the API server answers it for a user holding deploy/base/rbac.yaml's
            # Role, less what a test put in `denied`.
            emulator["post /apis/authorization.k8s.io/v1/selfsubjectaccessreviews"] << self._access_review
            self._emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def _access_review(self, request: Any) -> dict[str, Any]:
        review = request.data or {}
        attributes = (review.get("spec") or {}).get("resourceAttributes") or {}
        allowed = (attributes.get("resource"), attributes.get("verb")) not in self.denied
        # The emulator keeps every created object; the API server keeps no review, so neither does this.
        for key in [k for k in self._emulator.objects if k[0].plural == "selfsubjectaccessreviews"]:
            del self._emulator.objects[key]
        return {**review, "status": {"allowed": allowed}}

    def requests(self, method: str) -> list[str]:
        """The paths of every request with this method the API server has received, oldest first (kmock keeps
        each request; iterating the emulator yields them)."""

        async def read() -> list[str]:
            return [r.url.path for r in self._emulator if str(r.method.value).upper() == method.upper()]

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(10)

    def objects(self) -> list[tuple[str, str, str]]:
        """(plural, namespace, name) of every object that exists now, but the cluster's own (SETUP_RESOURCES)."""

        async def read() -> list[tuple[str, str, str]]:
            return sorted(
                (resource.plural, namespace, name)
                for (resource, namespace, name), obj in self._emulator.objects.items()
                if not obj.deleted and resource.plural not in SETUP_RESOURCES
            )

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(10)

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@dataclass(frozen=True)
class Fail:
    """The operator gives up on the resource with this message."""

    message: str


@dataclass(frozen=True)
class Hang:
    """The operator never makes the resource ready."""


@dataclass(frozen=True)
class NoCapacity:
    """The cluster has no room for the model until `freed` is set: Seldon v2's scheduler says ScheduleFailed,
    Seldon v1's and KServe's pods stay Pending as Unschedulable."""

    freed: threading.Event


@dataclass(frozen=True)
class Crash:
    """The first container we added to the deployment's pod (an init container if there is one) exits with this log;
    the kubelet reports it as the container's terminationMessagePolicy says (see container_terminated)."""

    log: str
    exit_code: int = 1


Script = Fail | Hang | NoCapacity | Crash


@dataclass(frozen=True)
class Seen:
    """One resource as the operator first saw it; generation tells a re-created one of the same name apart."""

    kind: ResourceKind
    obj: dict[str, Any]
    generation: int


class TestOperator:
    """Seldon Core v1, Seldon Core v2 and KServe, played by local MLServers; see the module docstring."""

    __test__ = False  # not a pytest test class

    def __init__(self, *, api_url: str, work_dir: Path) -> None:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = api_url
        self._api = client.CustomObjectsApi(client.ApiClient(cfg))
        self._core = client.CoreV1Api(self._api.api_client)
        self._servers = RuntimeServers(work_dir=work_dir)
        # The namespace's Pod Security level (its pod-security.kubernetes.io/enforce label): "restricted" or "".
        self.enforce = "restricted"
        self._server_objects: dict[str, dict[str, Any]] = {}  # Seldon v2 Servers seen, by name
        self._fetch_dir = work_dir.with_name(work_dir.name + "-fetched")  # where the downloaders put models
        self._pod_dir = work_dir.with_name(work_dir.name + "-pods")  # pods run from their environment
        self._pods: dict[str, PodRun] = {}
        # The Python of the cluster's Seldon v2 mlserver image (MLServer of RETRO_SELDON_V2_MLSERVER_VERSION), which
        # loads a folder's environment_tarball; None: this operator's own MLServer (.venv-server).
        self.seldon_v2_server_python: str | None = None
        self.cold_starts: dict[str, float] = {}  # seconds from a resource's creation to ready, per name
        self.scripts: dict[str, Script] = {}
        self.seen: dict[str, dict[str, Any]] = {}  # the last spec and labels seen per name, for assertions
        self.mesh_requests: list[tuple[str, str | None]] = []  # (path, Seldon-Model header) at the mesh
        self.events: list[dict[str, Any]] = []  # every Warning event the operator recorded
        self._live: dict[str, Seen] = {}
        self._backends: dict[str, Deployment] = {}
        self._generations: defaultdict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._queues: dict[str, ThreadPoolExecutor] = {}
        self.gateway = Gateway(self)
        self.grpc_ingress = GrpcGateway(self, mesh=False)
        self.grpc_mesh = GrpcGateway(self, mesh=True)
        self._threads = [threading.Thread(target=self._run, args=(kind,), daemon=True) for kind in KINDS]
        self._threads.append(
            threading.Thread(target=self._run, args=(SELDON_SERVER, self._on_server_event), daemon=True)
        )
        for t in self._threads:
            t.start()

    # Watching, as an informer does: list, then watch until the window ends, then list again.
    def _run(
        self, kind: ResourceKind, on_event: Callable[[ResourceKind, str, dict[str, Any]], None] | None = None
    ) -> None:
        import urllib3
        from kubernetes import watch

        handle = on_event or self._on_event
        while not self._stopping.is_set():
            try:
                listed = self._api.list_custom_object_for_all_namespaces(kind.group, kind.version, kind.plural)
                if on_event is None:
                    self._reconcile(kind, listed.get("items") or [])
                else:
                    self._reconcile_servers(listed.get("items") or [])
                w = watch.Watch()
                for event in w.stream(
                    self._api.list_custom_object_for_all_namespaces,
                    kind.group,
                    kind.version,
                    kind.plural,
                    timeout_seconds=1,
                    # The server ends the watch after its 1 s window; the read timeout only catches a stalled one.
                    _request_timeout=(5, 10),
                ):
                    handle(kind, event["type"], event["raw_object"])
                    if self._stopping.is_set():
                        break
            except (
                urllib3.exceptions.ReadTimeoutError,
                urllib3.exceptions.ProtocolError,
                urllib3.exceptions.MaxRetryError,
            ):
                pass
            except Exception:
                if not self._stopping.is_set():
                    log.exception("test operator: watching %s failed", kind.plural)
                    time.sleep(0.2)

    def _reconcile(self, kind: ResourceKind, items: list[dict[str, Any]]) -> None:
        names = set()
        for obj in items:
            names.add(obj["metadata"]["name"])
            self._on_event(kind, "ADDED", obj)
        with self._lock:
            gone = [n for n, s in self._live.items() if s.kind == kind and n not in names]
        for name in gone:
            self._on_event(kind, "DELETED", {"metadata": {"name": name}})

    def _on_event(self, kind: ResourceKind, event: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        with self._lock:
            seen = self._live.get(name)
            if event in ("ADDED", "MODIFIED") and seen is None:
                self._generations[name] += 1
                seen = Seen(kind=kind, obj=obj, generation=self._generations[name])
                self._live[name] = seen
                self.seen[name] = obj
                self._submit(name, lambda: self._provision(name, seen))
            elif event == "DELETED" and seen is not None:
                del self._live[name]
                self._submit(name, lambda: self._teardown(name))

    def _submit(self, name: str, work: Callable[[], None]) -> None:
        # One queue per name, so a teardown and a re-creation of the same name run in order.
        queue = self._queues.setdefault(name, ThreadPoolExecutor(max_workers=1, thread_name_prefix=name))
        queue.submit(_logged(work))

    def _alive(self, name: str, generation: int) -> bool:
        with self._lock:
            seen = self._live.get(name)
            return seen is not None and seen.generation == generation and not self._stopping.is_set()

    # Acting as each operator would.
    def _provision(self, name: str, seen: Seen) -> None:
        kind, obj = seen.kind, seen.obj
        self._patch_status(kind, name, progressing_status(kind))
        if not self._admitted(kind, obj):
            return
        script = self.scripts.get(name)
        if isinstance(script, Hang):
            return
        if isinstance(script, Fail):
            time.sleep(0.3)  # a moment of "Creating" first, as a real operator shows
            self._patch_status(kind, name, failed_status(kind, script.message))
            return
        if isinstance(script, NoCapacity) and not self._wait_for_capacity(kind, obj, seen, script):
            return
        if isinstance(script, Crash) and kind != SELDON_MODEL:
            self._crash(kind, obj, script)
            return
        server = obj["spec"].get("server") if kind == SELDON_MODEL else None
        if server and not self._wait_for_server(server, name, seen):
            return
        created = time.monotonic()
        try:
            local = self._fetch(kind, obj)
        except FetchFailed as exc:
            if self._alive(name, seen.generation):
                self._report_fetch_failure(kind, obj, str(exc))
            return
        try:
            pod = self._pod_plan(kind, obj, local)
        except AgentRefused as exc:
            self._patch_status(kind, name, failed_status(kind, str(exc)))
            return
        if pod is not None:
            self._run_pod(kind, obj, seen, pod, created=created)
            return
        model = ModelVersionInfo(
            name=name, version="1", run_id=None, source=str(local), artifact_uri=str(local), inputs=(), outputs=()
        )
        if kind == INFERENCE_SERVICE:
            self._servers.plan(name, kserve_container_ports(obj))
        try:
            deployment = self._servers.start(name=name, job_id=name, model=model)
            self._servers.wait_ready(
                deployment, timeout_s=120, should_stop=lambda: not self._alive(name, seen.generation)
            )
        except AppError as exc:
            self._servers.stop(name)
            if self._alive(name, seen.generation):
                self._patch_status(kind, name, failed_status(kind, exc.detail))
            return
        with self._lock:
            self._backends[name] = deployment
        self._patch_status(kind, name, ready_status(kind, name, obj["metadata"]["namespace"]))

    def _fetch(self, kind: ResourceKind, obj: dict[str, Any]) -> Path:
        """The model, downloaded as the operator's own downloader does: rclone (Seldon), kserve-storage (KServe)."""
        uri = artifact_uri(kind, obj)
        meta = obj["metadata"]
        dest = self._fetch_dir / meta["name"]
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        if kind == INFERENCE_SERVICE:
            account = obj["spec"]["predictor"].get("serviceAccountName")
            env = kserve_storage_env(self._core, meta["namespace"], account)
            command = [sys.executable, "-c", KSERVE_DOWNLOAD, uri, str(dest)]
        else:
            secret = (
                obj["spec"]["predictors"][0]["graph"].get("envSecretRefName")
                if kind == SELDON_DEPLOYMENT
                else obj["spec"].get("secretName")
            )
            env = rclone_env(self._core, meta["namespace"], secret, v1=kind == SELDON_DEPLOYMENT)
            command = ["rclone", "copy", "--config", "/dev/null", uri, str(dest)]
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        done = subprocess.run(command, env={**base, **env}, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise FetchFailed((done.stderr or done.stdout).strip()[-1500:])
        return dest

    # Pods that run from the model's own environment.
    def _pod_plan(self, kind: ResourceKind, obj: dict[str, Any], local: Path) -> PodPlan | None:
        """What the pod runs when the manifest or the fetched folder says so; None for this operator's own MLServer."""
        name = obj["metadata"]["name"]
        if kind == SELDON_MODEL:
            settings = seldon_v2_agent_settings(local, model=name, requirements=obj["spec"].get("requirements") or [])
            tarball = (settings.get("parameters") or {}).get("environment_tarball")
            if not tarball:
                return None  # the operator's MLServer loads the folder (its own Server, or a known requirement)
            python = self.seldon_v2_server_python or str(Path(find_server_executable("mlserver")).with_name("python"))
            return PodPlan(
                # operator/config/serverconfigs/mlserver.yaml: MLServer on 9000 (HTTP) and 9500 (gRPC), models from
                # MLSERVER_MODELS_DIR=/mnt/agent/models, where the agent puts each model's folder.
                command=[python, "-m", "mlserver.cli.main", "start", SELDON_V2_MODELS_DIR],
                env={"MLSERVER_HTTP_PORT": "9000", "MLSERVER_GRPC_PORT": "9500", "MLSERVER_PARALLEL_WORKERS": "1"},
                mounts={f"{SELDON_V2_MODELS_DIR}/{name}": local},
                readable=python_roots(python),
                http_port=9000,
                grpc_port=9500,
            )
        container = server_container(kind, obj)
        if container is None or not container.get("command"):
            return None
        env = runtime_env(kind, name)
        env.update({e["name"]: e["value"] for e in container.get("env") or []})  # the container's own win
        mounts = {KSERVE_MODELS_DIR: local}  # both storage initializers download to /mnt/models
        for mount in container.get("volumeMounts") or []:
            mounts[mount["mountPath"]] = Path()  # an emptyDir: made per pod below
        return PodPlan(
            command=list(container["command"]),
            env=env,
            mounts=mounts,
            readable=[],
            http_port=int(env["MLSERVER_HTTP_PORT"]),
            grpc_port=int(env["MLSERVER_GRPC_PORT"]),
        )

    def _run_pod(self, kind: ResourceKind, obj: dict[str, Any], seen: Seen, plan: PodPlan, *, created: float) -> None:
        name = obj["metadata"]["name"]
        pod = PodRun.start(self._pod_dir / name, plan)
        with self._lock:
            self._pods[name] = pod
        failure = pod.wait_ready(name, timeout_s=300, alive=lambda: self._alive(name, seen.generation))
        if failure is not None:
            if self._alive(name, seen.generation):
                self._report_pod_failure(kind, obj, failure)
            return
        if not self._alive(name, seen.generation):
            return
        self.cold_starts[name] = time.monotonic() - created
        with self._lock:
            self._backends[name] = pod.deployment(name)
        self._patch_status(kind, name, ready_status(kind, name, obj["metadata"]["namespace"]))

    def _report_pod_failure(self, kind: ResourceKind, obj: dict[str, Any], message: str) -> None:
        """Seldon v1 leaves the deployment Creating with a crashing pod; KServe and Seldon v2 say Failed."""
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        if kind != SELDON_DEPLOYMENT:
            self._patch_status(kind, name, failed_status(kind, message))
            return
        pod = failing_pod(name, message)
        status = pod["status"]["initContainerStatuses"].pop()
        status.update(name=name, image="seldonio/mlserver")
        pod["status"]["containerStatuses"] = [status]
        self._core.create_namespaced_pod(namespace, pod)

    def _report_fetch_failure(self, kind: ResourceKind, obj: dict[str, Any], message: str) -> None:
        """Seldon v1 leaves the deployment Creating and its pod's init container failing; the others say Failed."""
        if kind != SELDON_DEPLOYMENT:
            self._patch_status(kind, obj["metadata"]["name"], failed_status(kind, message))
            return
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        self._core.create_namespaced_pod(namespace, failing_pod(name, message))

    def _wait_for_capacity(self, kind: ResourceKind, obj: dict[str, Any], seen: Seen, script: NoCapacity) -> bool:
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        if kind == SELDON_MODEL:
            self._patch_status(kind, name, schedule_failed_status(NO_MEMORY))
        else:
            self._core.create_namespaced_pod(namespace, unschedulable_pod(name, kind))
        while not script.freed.wait(0.1):
            if not self._alive(name, seen.generation):
                return False
        if kind == SELDON_MODEL:
            self._patch_status(kind, name, progressing_status(kind))
        else:
            self._core.delete_namespaced_pod(unschedulable_pod(name, kind)["metadata"]["name"], namespace)
        return True

    def _wait_for_server(self, server: str, name: str, seen: Seen) -> bool:
        """Seldon v2's scheduler for a Model on a named Server: ScheduleFailed until the Server is Ready."""
        namespace = seen.obj["metadata"]["namespace"]
        self._patch_status(SELDON_MODEL, name, schedule_failed_status())
        while not self._server_ready(namespace, server):
            if not self._alive(name, seen.generation):
                return False
            time.sleep(0.1)
        self._patch_status(SELDON_MODEL, name, progressing_status(SELDON_MODEL))
        return True

    def _server_ready(self, namespace: str, server: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        k = SELDON_SERVER
        try:
            obj: Any = self._api.get_namespaced_custom_object(k.group, k.version, namespace, k.plural, server)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        conditions = (obj.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    def _teardown(self, name: str) -> None:
        with self._lock:
            self._backends.pop(name, None)
            pod_run = self._pods.pop(name, None)
        if pod_run is not None:
            pod_run.stop()
        self._servers.forget(name)
        self._servers.stop(name)
        shutil.rmtree(self._fetch_dir / name, ignore_errors=True)
        namespace = self.seen[name]["metadata"]["namespace"]
        for pod in self._core.list_namespaced_pod(namespace).items or []:
            labels = pod.metadata.labels or {}
            if name in (labels.get("seldon-deployment-id"), labels.get("serving.kserve.io/inferenceservice")):
                self._core.delete_namespaced_pod(pod.metadata.name, namespace)

    def _patch_status(self, kind: ResourceKind, name: str, status: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        namespace = self.seen[name]["metadata"]["namespace"]
        try:
            self._api.patch_namespaced_custom_object_status(
                kind.group, kind.version, namespace, kind.plural, name, {"status": status}
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile
                raise

    # What the platform under each operator does before a pod runs.
    def _admitted(self, kind: ResourceKind, obj: dict[str, Any]) -> bool:
        """Whether the operator's pod (or Knative revision) gets created; if not, the Warning event that says why."""
        meta = obj["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        if kind == SELDON_MODEL:
            return True  # a Model has no pod of its own: its Server's is admitted in _on_server_event
        if kind == INFERENCE_SERVICE:
            refused = self._knative_refusal(obj)
            if refused:
                # kserve/kserve pkg/controller/v1beta1/inferenceservice/controller.go (v0.15.2): a component's
                # reconcile error becomes a Warning event "InternalError" on the InferenceService, nothing else.
                self._event(namespace, "InferenceService", name, "InternalError", refused)
                return False
        pod, ours = pod_of(kind, obj)
        violations = restricted_violations(pod, ours) if self.enforce == "restricted" else ""
        if violations:
            owner, pod_name = replica_set_of(kind, obj)
            # kubernetes/kubernetes pkg/controller/controller_utils.go (v1.30): the ReplicaSet controller reports a
            # pod the API server refused as a Warning "FailedCreate" event, "Error creating: <the refusal>".
            message = f'Error creating: pods "{pod_name}" is forbidden: {violations}'
            self._event(namespace, "ReplicaSet", owner, "FailedCreate", message)
            return False
        return True

    def _knative_refusal(self, obj: dict[str, Any]) -> str:
        """Why Knative's webhook refuses the Serverless InferenceService's revision, or ""."""
        predictor = obj["spec"]["predictor"]
        if deployment_mode(self._core, obj) not in ("Serverless", "Knative") or not predictor.get("initContainers"):
            return ""
        features = self._config_map("knative-serving", "config-features")
        if features.get("kubernetes.podspec-init-containers", "disabled") == "enabled":
            return ""
        # knative/serving pkg/apis/serving/k8s_validation.go (v1.15): a field behind a disabled feature flag is
        # refused by the webhook with "must not set the field(s)"; KServe's ksvc reconciler returns that error.
        return (
            'fails to reconcile predictor: admission webhook "validation.webhook.serving.knative.dev" denied the '
            "request: validation failed: must not set the field(s): spec.template.spec.initContainers"
        )

    def _crash(self, kind: ResourceKind, obj: dict[str, Any], script: Crash) -> None:
        """The pod whose first container of ours keeps exiting, as the kubelet reports it."""
        meta = obj["metadata"]
        pod, _ = pod_of(kind, obj)
        self._core.create_namespaced_pod(meta["namespace"], crashing_pod(kind, meta["name"], pod, script))

    def _on_server_event(self, kind: ResourceKind, event: str, obj: dict[str, Any]) -> None:
        """Seldon v2's operator for a Server: a StatefulSet whose pods get the ServerConfig's volume claims."""
        name = obj["metadata"]["name"]
        with self._lock:
            known = name in self._server_objects
            if event in ("ADDED", "MODIFIED") and not known:
                self._server_objects[name] = obj
            elif event == "DELETED" and known:
                obj = self._server_objects.pop(name)
            else:
                return
        work = (lambda: self._provision_server(obj)) if event != "DELETED" else (lambda: self._teardown_server(obj))
        self._submit("server:" + name, work)

    def _reconcile_servers(self, items: list[dict[str, Any]]) -> None:
        names = {o["metadata"]["name"] for o in items}
        for obj in items:
            self._on_server_event(SELDON_SERVER, "ADDED", obj)
        with self._lock:
            gone = [o for n, o in self._server_objects.items() if n not in names]
        for obj in gone:
            self._on_server_event(SELDON_SERVER, "DELETED", obj)

    def _provision_server(self, server: dict[str, Any]) -> None:
        meta = server["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        config = self._server_config(namespace, server["spec"].get("serverConfig") or "mlserver")
        replicas = int(server["spec"].get("replicas") or 1)
        # kubernetes/kubernetes pkg/controller/statefulset/stateful_set_utils.go (v1.30), getPersistentVolumeClaimName:
        # each replica's claim is "<template name>-<StatefulSet name>-<ordinal>", made before its pod.
        for template in (config.get("spec") or {}).get("volumeClaimTemplates") or []:
            for ordinal in range(replicas):
                claim = {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {
                        "name": f"{template['name']}-{name}-{ordinal}",
                        "labels": {"seldon-server-name": name},
                    },
                    "spec": template.get("spec") or {},
                }
                self._core.create_namespaced_persistent_volume_claim(namespace, claim)
        pod = merged_server_pod(config, server)
        ours = server_containers_of_ours(server, pod)
        violations = restricted_violations(pod, ours) if self.enforce == "restricted" else ""
        if violations:
            # kubernetes/kubernetes pkg/controller/statefulset/stateful_pod_control.go (v1.30): a refused pod is a
            # Warning "FailedCreate" event on the StatefulSet, "create Pod <pod> in StatefulSet <set> failed error: ..."
            message = (
                f'create Pod {name}-0 in StatefulSet {name} failed error: pods "{name}-0" is forbidden: {violations}'
            )
            self._event(namespace, "StatefulSet", name, "FailedCreate", message)
            return
        script = self.scripts.get(name)
        if isinstance(script, Crash):
            self._core.create_namespaced_pod(namespace, crashing_pod(SELDON_SERVER, name, pod, script))

    def _teardown_server(self, server: dict[str, Any]) -> None:
        """The StatefulSet goes with the Server; its claims only when the retention policy says Delete."""
        meta = server["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        # kubernetes/kubernetes pkg/controller/statefulset/stateful_set_control.go (v1.30): claims are deleted with
        # the set only under persistentVolumeClaimRetentionPolicy.whenDeleted: Delete; the default is Retain.
        # seldon-core operator/controllers/reconcilers/server/statefulset_reconciler.go (v2.8.5) passes the
        # Server's statefulSetPersistentVolumeClaimRetentionPolicy through.
        policy = server["spec"].get("statefulSetPersistentVolumeClaimRetentionPolicy") or {}
        for pod in self._core.list_namespaced_pod(namespace).items or []:
            if (pod.metadata.labels or {}).get("seldon-server-name") == name:
                self._core.delete_namespaced_pod(pod.metadata.name, namespace)
        if policy.get("whenDeleted") != "Delete":
            return
        for claim in self._core.list_namespaced_persistent_volume_claim(namespace).items or []:
            if (claim.metadata.labels or {}).get("seldon-server-name") == name:
                self._core.delete_namespaced_persistent_volume_claim(claim.metadata.name, namespace)

    def _server_config(self, namespace: str, name: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        k = SELDON_SERVER_CONFIG
        try:
            found: dict[str, Any] = self._api.get_namespaced_custom_object(
                k.group, k.version, namespace, k.plural, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise
        return found

    def _config_map(self, namespace: str, name: str) -> dict[str, str]:
        from kubernetes.client.exceptions import ApiException

        try:
            return dict(self._core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise

    def _event(self, namespace: str, kind: str, name: str, reason: str, message: str) -> None:
        """A Warning event about an object, as a controller records it."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {"kind": kind, "name": name, "namespace": namespace},
            "reason": reason,
            "message": message,
            "type": "Warning",
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": "test-operator"},
        }
        self._core.create_namespaced_event(namespace, body)
        self.events.append(body)

    def install_cluster(self, namespace: str) -> None:
        """The cluster's own settings, as each project's release installs them (see the constants' sources)."""
        for ns, config_name, data in (
            ("kserve", "inferenceservice-config", INFERENCESERVICE_CONFIG),
            ("knative-serving", "config-features", KNATIVE_FEATURES),
        ):
            body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": config_name}, "data": data}
            self._core.create_namespaced_config_map(ns, body)
        k = SELDON_SERVER_CONFIG
        self._api.create_namespaced_custom_object(k.group, k.version, namespace, k.plural, MLSERVER_SERVER_CONFIG)

    def set_cluster_config(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """Change one of the cluster's ConfigMaps (a test switches KServe's default mode or a Knative flag)."""
        self._core.patch_namespaced_config_map(name, namespace, {"data": data})

    # For tests.
    def backend(self, name: str) -> str | None:
        with self._lock:
            deployment = self._backends.get(name)
        return deployment.base_url if deployment else None

    def grpc_backend(self, name: str) -> str | None:
        with self._lock:
            deployment = self._backends.get(name)
            seen = self._live.get(name)
        if deployment is None:
            return None
        if seen is not None and seen.kind == INFERENCE_SERVICE:
            return self._servers.route(name, declared_grpc_port(seen.obj))
        return deployment.grpc_target

    def model_servers(self) -> list[str]:
        """Names of the MLServers the operator still runs (or has files for)."""
        with self._lock:
            pods = list(self._pods)
        return sorted({*self._servers.list_names(), *pods})

    def wait_idle(self, timeout_s: float = 30) -> list[str]:
        """Wait until no MLServer is left; return the names still there at the deadline."""
        deadline = time.monotonic() + timeout_s
        while self.model_servers() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.model_servers()

    def close(self) -> None:
        self._stopping.set()
        for t in self._threads:
            t.join(10)
        for queue in self._queues.values():
            queue.shutdown(wait=True)
        for name in self._servers.list_names():
            self._servers.stop(name)
        for pod in list(self._pods.values()):
            pod.stop()
        self.gateway.shutdown()
        self.grpc_ingress.stop()
        self.grpc_mesh.stop()


def _logged(work: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            work()
        except Exception:
            log.exception("test operator: a reconcile step failed")

    return run


# The cluster's settings, as the releases install them.
# kserve/kserve config/configmap/inferenceservice.yaml (v0.15.2): key "deploy", Serverless by default.
INFERENCESERVICE_CONFIG = {"deploy": json.dumps({"defaultDeploymentMode": "Serverless"})}
# knative/serving config/core/configmaps/features.yaml (v1.15): init containers off, emptyDir on, pod-level
# securityContext off.
KNATIVE_FEATURES = {
    "kubernetes.podspec-init-containers": "disabled",
    "kubernetes.podspec-volumes-emptydir": "enabled",
    "kubernetes.podspec-securitycontext": "disabled",
}
# SeldonIO/seldon-core operator/config/serverconfigs/mlserver.yaml (v2.8.5): the parts the rules here read (the
# mlserver container, the pod's securityContext, the models claim); rclone and agent are the installation's.
MLSERVER_SERVER_CONFIG: dict[str, Any] = {
    "apiVersion": SELDON_SERVER_CONFIG.api_version,
    "kind": SELDON_SERVER_CONFIG.kind,
    "metadata": {"name": "mlserver"},
    "spec": {
        "podSpec": {
            "containers": [
                {
                    "name": "mlserver",
                    "image": "mlserver:latest",
                    "env": [
                        {"name": "MLSERVER_HTTP_PORT", "value": "9000"},
                        {"name": "MLSERVER_GRPC_PORT", "value": "9500"},
                        {"name": "MLSERVER_MODELS_DIR", "value": "/mnt/agent/models"},
                        {"name": "MLSERVER_MODEL_PARALLEL_WORKERS", "value": "1"},
                        {"name": "MLSERVER_LOAD_MODELS_AT_STARTUP", "value": "false"},
                    ],
                    "volumeMounts": [{"mountPath": "/mnt/agent", "name": "mlserver-models", "readOnly": True}],
                }
            ],
            "securityContext": {"fsGroup": 2000, "runAsUser": 1000, "runAsNonRoot": True},
        },
        "volumeClaimTemplates": [
            {
                "name": "mlserver-models",
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            }
        ],
    },
}
# kserve/kserve config/runtimes/kserve-mlserver.yaml (v0.15.2 to v0.20.0): the kserve-container's environment and
# securityContext, which the predictor's model container is merged over.
KSERVE_RUNTIME_CONTAINER: dict[str, Any] = {
    "name": "kserve-container",
    "env": [
        {"name": "MLSERVER_HTTP_PORT", "value": "8080"},
        {"name": "MLSERVER_GRPC_PORT", "value": "9000"},
        {"name": "MODELS_DIR", "value": "/mnt/models"},
    ],
    "securityContext": {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    },
}


def merged_container(base: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Our container over the operator's, as a strategic merge: env by name, securityContext field by field."""
    merged = {**base, **ours}
    env = {e["name"]: e for e in base.get("env") or []}
    env.update({e["name"]: e for e in ours.get("env") or []})
    if env:
        merged["env"] = list(env.values())
    if base.get("securityContext") or ours.get("securityContext"):
        merged["securityContext"] = {**(base.get("securityContext") or {}), **(ours.get("securityContext") or {})}
    return merged


def pod_of(kind: ResourceKind, obj: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The pod spec the operator creates for the resource, and which of its containers are ours (merged)."""
    if kind == SELDON_DEPLOYMENT:
        pod = dict(obj["spec"]["predictors"][0]["componentSpecs"][0]["spec"])
        return pod, list(pod.get("containers") or [])
    predictor = dict(obj["spec"]["predictor"])
    container = merged_container(KSERVE_RUNTIME_CONTAINER, predictor.get("model") or {})
    pod = {k: v for k, v in predictor.items() if k != "model"}
    pod["containers"] = [container]
    return pod, [container]


def merged_server_pod(config: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    """A Seldon v2 Server's pod: the ServerConfig's pod spec with the Server's podSpec merged over it (containers by
    name; seldon-core operator/controllers/reconcilers/server, v2.8.5)."""
    base = dict(((config.get("spec") or {}).get("podSpec")) or {})
    ours = dict(server["spec"].get("podSpec") or {})
    containers = {c["name"]: c for c in base.get("containers") or []}
    for c in ours.get("containers") or []:
        containers[c["name"]] = merged_container(containers.get(c["name"], {}), c)
    pod = {**base, **{k: v for k, v in ours.items() if k != "containers"}}
    pod["containers"] = list(containers.values())
    return pod


def server_containers_of_ours(server: dict[str, Any], pod: dict[str, Any]) -> list[dict[str, Any]]:
    names = {c["name"] for c in (server["spec"].get("podSpec") or {}).get("containers") or []}
    return [c for c in pod["containers"] if c["name"] in names]


def restricted_violations(pod: dict[str, Any], containers: list[dict[str, Any]]) -> str:
    """What Pod Security "restricted" refuses in these containers (and the pod's init containers), in the admission
    controller's words; "" when it admits them.

    kubernetes/pod-security-admission policy/check_allowPrivilegeEscalation.go, check_capabilities_restricted.go,
    check_runAsNonRoot.go, check_seccompProfile_restricted.go (v0.30): each check names the containers that fail
    it; the message is `violates PodSecurity "restricted:latest": <check> (<detail>), ...`. runAsNonRoot and
    seccompProfile may be set on the pod instead. Only the containers we add are judged here: the operators' own
    (storage initializer, Seldon's agent and rclone) are their installation's business.
    """
    checked = [*(pod.get("initContainers") or []), *containers]
    pod_context = pod.get("securityContext") or {}

    def ctx(c: dict[str, Any]) -> dict[str, Any]:
        return c.get("securityContext") or {}

    def names(failing: list[dict[str, Any]]) -> str:
        quoted = ", ".join(f'"{c["name"]}"' for c in failing)
        return f"container {quoted}" if len(failing) == 1 else f"containers {quoted}"

    found = []
    failing = [c for c in checked if ctx(c).get("allowPrivilegeEscalation") is not False]
    if failing:
        found.append(
            f"allowPrivilegeEscalation != false ({names(failing)} must set securityContext.allowPrivilegeEscalation=false)"
        )
    failing = [c for c in checked if "ALL" not in ((ctx(c).get("capabilities") or {}).get("drop") or [])]
    if failing:
        found.append(f'unrestricted capabilities ({names(failing)} must set securityContext.capabilities.drop=["ALL"])')
    failing = [c for c in checked if ctx(c).get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True]
    if failing:
        found.append(f"runAsNonRoot != true (pod or {names(failing)} must set securityContext.runAsNonRoot=true)")
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    failing = [
        c
        for c in checked
        if (ctx(c).get("seccompProfile") or {}).get("type", pod_seccomp) not in ("RuntimeDefault", "Localhost")
    ]
    if failing:
        found.append(
            f"seccompProfile (pod or {names(failing)} must set securityContext.seccompProfile.type to "
            '"RuntimeDefault" or "Localhost")'
        )
    return f'violates PodSecurity "restricted:latest": {", ".join(found)}' if found else ""


def replica_set_of(kind: ResourceKind, obj: dict[str, Any]) -> tuple[str, str]:
    """The ReplicaSet the operator's Deployment makes for the resource, and its first pod's name."""
    name = obj["metadata"]["name"]
    if kind == SELDON_DEPLOYMENT:
        # seldon-core v1.18.2 operator: one Deployment per predictor and component, "<sdep>-<predictor>-0-<container>".
        container = obj["spec"]["predictors"][0]["componentSpecs"][0]["spec"]["containers"][0]["name"]
        deployment = f"{name}-default-0-{container}"
    elif deployment_mode_of(obj) in ("RawDeployment", "Standard"):
        deployment = f"{name}-predictor"  # kserve: RawDeployment's Deployment
    else:
        deployment = f"{name}-predictor-00001-deployment"  # Knative: the first revision's Deployment
    return f"{deployment}-7d4b9c8f6", f"{deployment}-7d4b9c8f6-x2x9q"


def deployment_mode_of(obj: dict[str, Any]) -> str:
    return str(((obj["metadata"].get("annotations") or {}).get("serving.kserve.io/deploymentMode")) or "")


def deployment_mode(core: Any, obj: dict[str, Any]) -> str:
    """The InferenceService's annotation, else inferenceservice-config's defaultDeploymentMode
    (kserve/kserve pkg/controller/v1beta1/inferenceservice/utils, GetDeploymentMode, v0.15.2)."""
    from kubernetes.client.exceptions import ApiException

    annotated = deployment_mode_of(obj)
    if annotated:
        return annotated
    try:
        data = core.read_namespaced_config_map("inferenceservice-config", "kserve").data or {}
    except ApiException:
        data = {}
    return str(json.loads(data.get("deploy") or "{}").get("defaultDeploymentMode") or "Serverless")


def kserve_container_ports(obj: dict[str, Any]) -> dict[str, int]:
    """MLServer's HTTP and gRPC ports inside the kserve-container: the runtime's environment, under the model
    container's own env (KServe merges the two)."""
    container = merged_container(KSERVE_RUNTIME_CONTAINER, obj["spec"]["predictor"].get("model") or {})
    env = {e["name"]: e.get("value") for e in container.get("env") or []}
    return {"http": int(env["MLSERVER_HTTP_PORT"]), "grpc": int(env["MLSERVER_GRPC_PORT"])}


def declared_grpc_port(obj: dict[str, Any]) -> int | None:
    """The container port KServe routes gRPC (h2c) to, if the predictor declares one."""
    for port in (obj["spec"]["predictor"].get("model") or {}).get("ports") or []:
        if port.get("name") == "h2c":
            return int(port["containerPort"])
    return None


class RuntimeServers(LocalMLServerDeployer):
    """The operator's MLServers. A KServe predictor's listens where its runtime's environment says (8080, 9000 in
    the container), each container port mapped to a free loopback port, as a pod network would: traffic sent to a
    container port nothing listens on is refused."""

    def __init__(self, *, work_dir: Path) -> None:
        super().__init__(work_dir=work_dir)
        # name -> (HTTP container port, gRPC container port, container port -> loopback port)
        self._ports: dict[str, tuple[int, int, dict[int, int]]] = {}
        self._plan_lock = threading.Lock()

    def plan(self, name: str, container_ports: dict[str, int]) -> None:
        http, grpc_port = container_ports["http"], container_ports["grpc"]
        with self._plan_lock:
            self._ports[name] = (http, grpc_port, {http: _free_port(), grpc_port: _free_port()})

    def forget(self, name: str) -> None:
        with self._plan_lock:
            self._ports.pop(name, None)

    def _listen_ports(self, name: str) -> tuple[int, int, int]:
        with self._plan_lock:
            planned = self._ports.get(name)
        if planned is None:
            return super()._listen_ports(name)
        http, grpc_port, mapped = planned
        return mapped[http], mapped[grpc_port], _free_port()

    def route(self, name: str, container_port: int | None) -> str:
        """Where traffic to the container port goes: its loopback port, or one nothing listens on."""
        with self._plan_lock:
            planned = self._ports.get(name)
        target = planned[2].get(container_port) if planned and container_port is not None else None
        return f"127.0.0.1:{target or _closed_port()}"


@dataclass(frozen=True)
class PodPlan:
    """A pod's model server container: its command and environment, and what is mounted where."""

    command: list[str]
    env: dict[str, str]
    mounts: dict[str, Path]  # path in the pod -> folder here; Path() for an emptyDir
    readable: list[Path]  # folders of this machine the image provides (the server image's Python)
    http_port: int
    grpc_port: int


class PodRun:
    """One pod's container under bubblewrap in a network namespace of its own; socat carries its two ports out.

    Inside, socat listens on unix sockets in the pod's folder and connects to the container's ports on the pod's
    loopback; outside, socat listens on free loopback ports and connects to those sockets. The container sees /usr,
    a few files of /etc, its mounts and its folder, as a container sees its image and volumes.
    """

    def __init__(self, folder: Path, procs: list[subprocess.Popen[bytes]], http: int, grpc_port: int) -> None:
        self.folder = folder
        self._procs = procs
        self._http = http
        self._grpc = grpc_port

    @classmethod
    def start(cls, folder: Path, plan: PodPlan) -> PodRun:
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "home").mkdir(parents=True)
        binds: list[str] = []
        for inside, here in plan.mounts.items():
            if here == Path():
                here = folder / "volumes" / inside.strip("/").replace("/", "_")
                here.mkdir(parents=True)
            binds += ["--bind", str(here), inside]
        relay = (
            # Quiet: until the server listens each probe is refused, and the log is the container's own.
            'h=$1; g=$2; d=$3; shift 3; socat UNIX-LISTEN:"$d/http.sock",fork TCP:127.0.0.1:"$h" 2>/dev/null & '
            'socat UNIX-LISTEN:"$d/grpc.sock",fork TCP:127.0.0.1:"$g" 2>/dev/null & exec "$@"'
        )
        argv = ["sh", "-c", relay, "pod", str(plan.http_port), str(plan.grpc_port), str(folder), *plan.command]
        sandboxed = ModelSandbox("bwrap").command(
            argv, cwd=folder, readable=plan.readable, writable=[folder], network=False, die_with_parent=True
        )
        at = sandboxed.index("--chdir")
        # /dev/shm for MLServer's pool (multiprocessing's semaphores); the volumes at their paths in the pod.
        sandboxed[at:at] = ["--tmpfs", "/dev/shm", *binds]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(folder / "home"), **plan.env}
        log = (folder / "pod.log").open("ab")
        procs = [
            subprocess.Popen(
                sandboxed, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True
            )
        ]
        http, grpc_port = _free_port(), _free_port()
        for port, sock in ((http, "http.sock"), (grpc_port, "grpc.sock")):
            procs.append(
                subprocess.Popen(
                    ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", f"UNIX-CONNECT:{folder / sock}"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        log.close()
        return cls(folder, procs, http, grpc_port)

    def deployment(self, name: str) -> Deployment:
        return Deployment(
            name=name, base_url=f"http://127.0.0.1:{self._http}", model_name=name, grpc_target=f"127.0.0.1:{self._grpc}"
        )

    def wait_ready(self, name: str, *, timeout_s: float, alive: Callable[[], bool]) -> str | None:
        """None once the model answers ready; else why not: the container's own last words, as a pod shows them."""
        url = f"http://127.0.0.1:{self._http}/v2/models/{name}/ready"
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2) as client:
            while alive():
                if self._procs[0].poll() is not None:
                    return f"exited with code {self._procs[0].returncode}: {self.last_words()}"
                try:
                    if client.get(url).status_code == 200:
                        return None
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    return f"not ready within {timeout_s:.0f} s: {self.last_words()}"
                time.sleep(0.25)
        return "deleted"

    def last_words(self) -> str:
        """The exception the log names, else its last lines (a failing tar or shell names no exception)."""
        text = (self.folder / "pod.log").read_text(errors="replace")
        found = startup_failure(text)
        if not found.startswith("it exited without naming"):
            return found
        return " | ".join(line.strip() for line in text.strip().splitlines()[-4:])

    def stop(self) -> None:
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    return _free_port()


# The kubelet's termination message (kubernetes/kubernetes pkg/kubelet/kuberuntime/kuberuntime_container.go,
# v1.30): with terminationMessagePolicy FallbackToLogsOnError and a failed container that wrote no message file,
# the last 80 lines of its log, at most 2048 bytes; with the default policy (File), nothing.
LOG_TAIL_LINES = 80
LOG_TAIL_BYTES = 2048


def container_terminated(container: dict[str, Any], log: str, exit_code: int) -> dict[str, Any]:
    message = ""
    if container.get("terminationMessagePolicy") == "FallbackToLogsOnError" and exit_code != 0:
        tail = "\n".join(log.splitlines()[-LOG_TAIL_LINES:]).encode()[-LOG_TAIL_BYTES:]
        message = tail.decode(errors="replace")
    terminated = {"exitCode": exit_code, "reason": "Error"}
    if message:
        terminated["message"] = message
    return {
        "name": container["name"],
        "image": container.get("image") or "",
        "imageID": "",
        "ready": False,
        "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": terminated},
    }


def crashing_pod(kind: ResourceKind, name: str, pod: dict[str, Any], script: Crash) -> dict[str, Any]:
    """The deployment's pod whose first container of ours (an init container if any) keeps failing."""
    label = {
        SELDON_DEPLOYMENT: "seldon-deployment-id",
        INFERENCE_SERVICE: "serving.kserve.io/inferenceservice",
        SELDON_SERVER: "seldon-server-name",
    }[kind]
    init = pod.get("initContainers") or []
    status: dict[str, Any] = {"phase": "Pending" if init else "Running"}
    if init:
        status["initContainerStatuses"] = [container_terminated(init[0], script.log, script.exit_code)]
    else:
        status["containerStatuses"] = [container_terminated(pod["containers"][0], script.log, script.exit_code)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{name}-crashing-0", "labels": {label: name}},
        "spec": {"containers": [{"name": c["name"], "image": c.get("image") or "x"} for c in pod["containers"]]},
        "status": status,
    }


class AgentRefused(Exception):
    """Seldon v2's agent cannot make MLServer settings for the fetched folder."""


# scheduler/pkg/agent/repository/mlserver/settings.go, getModelSettings: the requirements it makes settings for.
AGENT_KNOWN_REQUIREMENTS = ("alibi-detect", "alibi-explain", "lightgbm", "mlflow", "python", "sklearn", "xgboost")


def seldon_v2_agent_settings(folder: Path, *, model: str, requirements: list[str]) -> dict[str, Any]:
    """The model-settings.json Seldon v2's agent leaves in a downloaded folder, written back there.

    scheduler/pkg/agent/repository/mlserver/mlserver.go (UpdateModelVersion, UpdateNameAndVersion): a folder with a
    model-settings.json at its top is loaded into a Go struct and written back with the Model's name and version,
    so only the struct's fields survive (name, platform, versions, parallel_workers, implementation,
    parameters.{uri, version, format, content_type, extra, environment_tarball}); parallel_workers is a plain int,
    written as 0 when absent. Without the file, settings.go's getModelSettings takes the first requirement it knows
    and otherwise fails with "Can't create model-settings from requirements [...]" (Go's %v of a slice).
    """
    path = folder / "model-settings.json"
    if not path.is_file():
        if not any(r in AGENT_KNOWN_REQUIREMENTS for r in requirements):
            raise AgentRefused(f"Can't create model-settings from requirements [{' '.join(requirements)}]")
        return {}  # a known requirement: the agent's own settings, as this operator's MLServer makes them
    loaded = json.loads(path.read_text())
    params = loaded.get("parameters") or {}
    kept_params = {
        k: params[k]
        for k in ("uri", "version", "format", "content_type", "extra", "environment_tarball")
        if params.get(k)
    }
    settings: dict[str, Any] = {"name": model, "parallel_workers": int(loaded.get("parallel_workers") or 0)}
    settings.update({k: loaded[k] for k in ("platform", "versions", "implementation") if loaded.get(k)})
    settings["parameters"] = {**kept_params, "version": "1"}
    path.write_text(json.dumps(settings))
    return settings


def server_container(kind: ResourceKind, obj: dict[str, Any]) -> dict[str, Any] | None:
    """The model server's container as the manifest overrides it: Seldon v1's graph node, KServe's predictor model."""
    spec = obj["spec"]
    if kind == INFERENCE_SERVICE:
        return dict(spec["predictor"]["model"])
    if kind == SELDON_DEPLOYMENT:
        predictor = spec["predictors"][0]
        node = predictor["graph"]["name"]
        for component in predictor.get("componentSpecs") or []:
            for container in (component.get("spec") or {}).get("containers") or []:
                if container.get("name") == node:
                    return dict(container)
    return None


def runtime_env(kind: ResourceKind, name: str) -> dict[str, str]:
    """The MLServer environment each operator gives its model server container.

    KServe: config/runtimes/kserve-mlserver.yaml (MLSERVER_HTTP_PORT=8080, MLSERVER_GRPC_PORT=9000,
    MLSERVER_MODEL_NAME={{.Name}}, MLSERVER_MODEL_URI=/mnt/models, MLSERVER_MODEL_IMPLEMENTATION from the model
    format's class). Seldon Core v1: operator/controllers/mlserver.go (HTTP 9000, gRPC 9500, the graph node's name,
    /mnt/models, the MLflow runtime for MLFLOW_SERVER).
    """
    http, grpc_port = ("8080", "9000") if kind == INFERENCE_SERVICE else ("9000", "9500")
    return {
        "MLSERVER_HTTP_PORT": http,
        "MLSERVER_GRPC_PORT": grpc_port,
        "MLSERVER_MODEL_NAME": name,
        "MLSERVER_MODEL_URI": KSERVE_MODELS_DIR,
        "MLSERVER_MODEL_IMPLEMENTATION": "mlserver_mlflow.MLflowRuntime",
    }


class FetchFailed(Exception):
    """The operator's downloader could not fetch the model; the message is its own output."""


KSERVE_DOWNLOAD = "import sys; from kserve_storage import Storage; Storage.download(sys.argv[1], sys.argv[2])"


def _secret_data(core: Any, namespace: str, name: str) -> dict[str, str] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        secret = core.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def rclone_env(core: Any, namespace: str, secret: str | None, *, v1: bool) -> dict[str, str]:
    """Seldon v1: the Secret's keys are rclone's environment; Seldon v2: its one key is an rclone remote's config."""
    if not secret:
        return {}
    data = _secret_data(core, namespace, secret)
    if data is None:
        raise FetchFailed(f'secret "{secret}" not found')
    if v1:
        return data
    if len(data) != 1:
        raise FetchFailed(f"secret {secret} must hold exactly one rclone config, found keys {sorted(data)}")
    config = yaml.safe_load(next(iter(data.values()))) or {}
    remote = str(config.get("name", "")).upper()
    env = {f"RCLONE_CONFIG_{remote}_TYPE": str(config.get("type", ""))}
    env.update({f"RCLONE_CONFIG_{remote}_{k.upper()}": str(v) for k, v in (config.get("parameters") or {}).items()})
    return env


def kserve_storage_env(core: Any, namespace: str, account: str | None) -> dict[str, str]:
    """What KServe's credential builder gives the storage initializer from a ServiceAccount's S3 Secrets."""
    from kubernetes.client.exceptions import ApiException

    if not account:
        return {}
    try:
        sa = core.read_namespaced_service_account(account, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise FetchFailed(f'serviceaccounts "{account}" not found') from None
        raise
    env: dict[str, str] = {}
    for ref in sa.secrets or []:
        secret = core.read_namespaced_secret(ref.name, namespace)
        annotations = secret.metadata.annotations or {}
        data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        endpoint = annotations.get("serving.kserve.io/s3-endpoint")
        if endpoint:
            https = annotations.get("serving.kserve.io/s3-usehttps", "1") != "0"
            env.update(S3_ENDPOINT=endpoint, AWS_ENDPOINT_URL=f"{'https' if https else 'http'}://{endpoint}")
            env.update(S3_USE_HTTPS="1" if https else "0")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if key in data:
                env[key] = data[key]
        env["AWS_DEFAULT_REGION"] = annotations.get("serving.kserve.io/s3-region", "us-east-1")
    return env


def failing_pod(name: str, message: str) -> dict[str, Any]:
    """A Seldon v1 pod whose storage initializer keeps failing, as the kubelet reports it."""
    terminated = {"exitCode": 1, "reason": "Error", "message": message}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{name}-default-0-{name}", "labels": {"seldon-deployment-id": name}},
        "spec": {"containers": [{"name": name, "image": "seldonio/mlserver"}]},
        "status": {
            "phase": "Pending",
            "initContainerStatuses": [
                {
                    "name": f"{name}-model-initializer",
                    "image": "seldonio/rclone-storage-initializer",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 2,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": terminated},
                }
            ],
        },
    }


def artifact_uri(kind: ResourceKind, obj: dict[str, Any]) -> str:
    spec = obj["spec"]
    if kind == SELDON_DEPLOYMENT:
        return str(spec["predictors"][0]["graph"]["modelUri"])
    if kind == SELDON_MODEL:
        return str(spec["storageUri"])
    return str(spec["predictor"]["model"]["storageUri"])


def progressing_status(kind: ResourceKind) -> dict[str, Any]:
    if kind == SELDON_DEPLOYMENT:
        return {"state": "Creating", "description": "waiting for the model server"}
    reason = "ModelProgressing" if kind == SELDON_MODEL else "PredictorNotReady"
    return {
        "conditions": [
            {"type": "ModelReady" if kind == SELDON_MODEL else "PredictorReady", "status": "False", "reason": reason},
            {"type": "Ready", "status": "False", "reason": reason},
        ]
    }


NO_MEMORY = "failed to schedule model: no server has 1073741824 bytes of memory free (requested 1Gi)"
NO_NODE = "0/3 nodes are available: 3 Insufficient memory. preemption: 0/3 nodes are available"


def unschedulable_pod(name: str, kind: ResourceKind) -> dict[str, Any]:
    """A pod of the deployment the scheduler finds no node for."""
    label = "seldon-deployment-id" if kind == SELDON_DEPLOYMENT else "serving.kserve.io/inferenceservice"
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": NO_NODE}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{name}-pending", "labels": {label: name}},
        "spec": {"containers": [{"name": "kserve-container", "image": "seldonio/mlserver"}]},
        "status": {"phase": "Pending", "conditions": [condition]},
    }


def schedule_failed_status(
    message: str = "Failed to schedule model as no matching servers are available",
) -> dict[str, Any]:
    """A Seldon v2 Model no Server replica can take (none yet, or none with room)."""
    return {
        "conditions": [
            {"type": "ModelReady", "status": "False", "reason": "ScheduleFailed", "message": message},
            {"type": "Ready", "status": "False", "reason": "ScheduleFailed", "message": message},
        ]
    }


def ready_status(kind: ResourceKind, name: str, namespace: str) -> dict[str, Any]:
    if kind == SELDON_DEPLOYMENT:
        url = f"http://{name}-default.{namespace}.svc.cluster.local:8000/api/v1.0/predictions"
        return {"state": "Available", "description": "", "address": {"url": url}, "replicas": 1}
    if kind == SELDON_MODEL:
        return {
            "conditions": [
                {"type": "ModelReady", "status": "True", "reason": "ModelAvailable"},
                {"type": "Ready", "status": "True"},
            ],
            "replicas": 1,
            "availableReplicas": 1,
        }
    return {
        "conditions": [{"type": "PredictorReady", "status": "True"}, {"type": "Ready", "status": "True"}],
        "url": f"http://{name}.{namespace}.example.com",
        "address": {"url": f"http://{name}.{namespace}.svc.cluster.local"},
        "modelStatus": {"transitionStatus": "UpToDate", "states": {"activeModelState": "Loaded"}},
    }


def failed_status(kind: ResourceKind, message: str) -> dict[str, Any]:
    if kind == SELDON_DEPLOYMENT:
        return {"state": "Failed", "description": message}
    if kind == SELDON_MODEL:
        return {
            "conditions": [
                {"type": "ModelReady", "status": "False", "reason": "ModelFailed", "message": message},
                {"type": "Ready", "status": "False", "reason": "ModelFailed", "message": message},
            ]
        }
    return {
        "conditions": [
            {"type": "PredictorReady", "status": "False", "reason": "RevisionFailed", "message": message},
            {"type": "Ready", "status": "False", "reason": "RevisionFailed", "message": message},
        ],
        "modelStatus": {
            "transitionStatus": "BlockedByFailedLoad",
            "lastFailureInfo": {"reason": "ModelLoadFailed", "message": message},
        },
    }


class Gateway(ThreadingHTTPServer):
    """The ingress and the Seldon v2 mesh in front of the operator's model servers."""

    daemon_threads = True

    def __init__(self, operator: TestOperator) -> None:
        super().__init__(("127.0.0.1", 0), _GatewayHandler)
        self.operator = operator
        self.client = httpx.Client(timeout=60)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _GatewayHandler(BaseHTTPRequestHandler):
    server: Gateway

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._route(b"")

    def do_POST(self) -> None:
        self._route(self.rfile.read(int(self.headers.get("content-length") or 0)))

    def _route(self, body: bytes) -> None:
        parts = self.path.strip("/").split("/")
        operator = self.server.operator
        if parts[0] == "gateway" and len(parts) >= 4:
            name, rest = parts[2], "/".join(parts[3:])
        elif parts[0] == "mesh" and len(parts) >= 3:
            name, rest = self.headers.get("Seldon-Model") or "", "/".join(parts[2:])
            operator.mesh_requests.append((self.path, self.headers.get("Seldon-Model")))
            if not name:
                return self._answer(404, {"error": "the mesh routes by the Seldon-Model header; none was sent"})
        else:
            return self._answer(404, {"error": f"no route for {self.path}"})
        backend = operator.backend(name)
        if backend is None:
            return self._answer(404, {"error": f"no model server for {name!r}"})
        if rest == "api/v1.0/predictions":
            return self._seldon_predictions(backend, name, body)
        resp = self.server.client.request(
            self.command, f"{backend}/{rest}", content=body or None, headers={"content-type": "application/json"}
        )
        self._answer(resp.status_code, resp.content)

    def _seldon_predictions(self, backend: str, name: str, body: bytes) -> None:
        """Seldon protocol in, V2 to the model server, Seldon protocol out.

        Seldon's MLflow server builds a DataFrame from names and ndarray and lets the model's signature decide
        each column's type; here each column goes to V2 with the signature's datatype, and a non-float column
        with a null as JSON values (pd_json), which MLServer turns into the same pandas column.
        """
        data = json.loads(body)["data"]
        columns = list(zip(*data["ndarray"], strict=True))
        metadata = self.server.client.get(f"{backend}/v2/models/{name}").json()
        datatypes = {i["name"]: i["datatype"] for i in metadata.get("inputs") or []}
        inputs = []
        for column_name, values in zip(data["names"], columns, strict=True):
            datatype = datatypes[column_name]
            entry: dict[str, Any] = {"name": column_name, "datatype": datatype, "shape": [len(values), 1]}
            if datatype not in ("FP64", "FP32") and None in values:
                entry.update(datatype="BYTES", data=[json.dumps(v) for v in values])
                entry["parameters"] = {"content_type": "pd_json"}
            else:
                entry["data"] = list(values)
                if datatype == "BYTES":
                    entry["parameters"] = {"content_type": "str"}
            inputs.append(entry)
        resp = self.server.client.post(f"{backend}/v2/models/{name}/infer", json={"inputs": inputs})
        if resp.status_code != 200:
            info = resp.text[-500:]
            status = {"code": -1, "info": info, "reason": "MICROSERVICE_BAD_DATA", "status": "FAILURE"}
            return self._answer(resp.status_code, {"status": status})
        outputs = resp.json()["outputs"]
        rows = len(data["ndarray"])
        arrays = [np.asarray(o["data"]).reshape(rows, -1) for o in outputs]
        matrix = np.concatenate(arrays, axis=1)
        names = [f"t:{j}" for j in range(matrix.shape[1])]
        self._answer(200, {"data": {"names": names, "ndarray": matrix.tolist()}, "meta": {}})

    def _answer(self, status: int, payload: bytes | dict[str, Any]) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class GrpcGateway:
    """V2 gRPC in front of the operator's model servers: ModelInfer passed through, bytes for bytes.

    The ingress routes by the request's model name; the mesh (Seldon Core v2) by the seldon-model header alone,
    answering NOT_FOUND to a request without it, as the real mesh does.
    """

    def __init__(self, operator: TestOperator, *, mesh: bool) -> None:
        self._operator = operator
        self._mesh = mesh
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self._server = grpc.server(ThreadPoolExecutor(max_workers=32), options=options)
        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(self._infer)}
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def _infer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if self._mesh:
            name = dict(context.invocation_metadata()).get("seldon-model") or ""
            self._operator.mesh_requests.append(("grpc ModelInfer", name or None))
            if not name:
                context.abort(grpc.StatusCode.NOT_FOUND, "the mesh routes by the seldon-model header; none was sent")
        else:
            name = inference_pb2.ModelInferRequest.FromString(request).model_name
        target = self._operator.grpc_backend(name)
        if target is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model server for {name!r}")
        assert target is not None
        with self._lock:
            channel = self._channels.get(target) or grpc.insecure_channel(
                target, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
            )
            self._channels[target] = channel
        try:
            answer: bytes = channel.unary_unary(GRPC_MODEL_INFER)(request, timeout=60)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())  # type: ignore[attr-defined]
        return answer

    def stop(self) -> None:
        self._server.stop(grace=None)
        for channel in self._channels.values():
            channel.close()
