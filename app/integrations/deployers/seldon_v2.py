"""Seldon Core v2: a Model per job, on a shared MLServer or on a Server of the job's own environment."""

from __future__ import annotations

import logging
from typing import Any

from app.config import Settings
from app.core.model_types import ModelVersionInfo
from app.integrations.deployers.kubernetes import (
    MLFLOW_RUNTIME,
    SELDON_MODEL,
    SELDON_SERVER,
    SELDON_SERVER_LABEL,
    SELDON_V2_MODELS_DIR,
    SELDON_V2_SERVER_CONFIG,
    CustomResources,
    KubernetesDeployer,
    Readiness,
    ResourceKind,
    check_template,
    labelled,
    only_schedule_failed,
    readiness_from_conditions,
    readiness_from_pods,
)
from app.integrations.deployers.port import Deployment
from app.integrations.environments.cache import ModelEnvironment
from app.integrations.environments.tarball import TARBALL

log = logging.getLogger(__name__)


class SeldonV2Deployer(KubernetesDeployer):
    """Seldon Core v2: a Model on an MLServer server with the mlflow capability, reached through the mesh.

    A Model carries no pod settings, so with a model environment the deployment is also a Server of the same name:
    MLServer's pod with the init container building the environment and the mlserver container running from it.
    Its only capability is the deployment's name, which the Model requires and names as its server, so no other
    model lands on it. stop() deletes both; list_managed() lists Servers too, so the reaper finds a Server whose
    Model a killed worker never created.
    """

    kind = SELDON_MODEL
    companion_kinds = (SELDON_SERVER,)
    operator = "Seldon Core v2 (its agent's rclone)"

    def __init__(self, *, settings: Settings, resources: CustomResources | None = None) -> None:
        super().__init__(settings=settings, resources=resources)
        check_template(settings.seldon_v2_mesh_url, "RETRO_SELDON_V2_MESH_URL")
        check_template(settings.seldon_v2_mesh_grpc, "RETRO_SELDON_V2_MESH_GRPC")

    def spec(self, *, name: str, model: ModelVersionInfo, environment: ModelEnvironment | None) -> dict[str, Any]:
        s = self._settings
        spec: dict[str, Any] = {
            "storageUri": model.artifact_uri,
            "requirements": ["mlflow"],
            "replicas": s.k8s_replicas,
            "memory": s.k8s_memory_request,
        }
        if s.k8s_storage_secret:
            spec["secretName"] = s.k8s_storage_secret
        if self.own_server(environment):
            spec.update(server=name, requirements=[name])
        return spec

    def own_server(self, environment: ModelEnvironment | None) -> bool:
        """Whether the Model needs a Server of its own: an environment the cluster's standard Server cannot load."""
        return environment is not None and not self.uses_tarball(environment)

    def uses_tarball(self, environment: ModelEnvironment | None) -> bool:
        # MLServer's pool and its main process exchange pickled MLServer objects, so a tarball needs the server's own
        # release (docs/kubernetes-environments.md; MLServer docs/user-guide/custom.md).
        return (
            super().uses_tarball(environment)
            and environment is not None
            and environment.server_version == self._settings.seldon_v2_mlserver_version
        )

    def bundle_settings(self, environment: ModelEnvironment) -> dict[str, Any] | None:
        """What the agent needs to load the folder: without a model-settings.json it builds settings only from a
        requirement it knows (scheduler/pkg/agent/repository/mlserver/settings.go), and a Model pinned to its own
        Server requires that Server's name. The agent rewrites the file through a Go struct that keeps
        parallel_workers (a plain int in released agents: written as 0 when absent, which turns MLServer's pool off
        and with it the tarball) and parameters.environment_tarball (scheduler/pkg/agent/repository/mlserver/mlserver.go)."""
        settings: dict[str, Any] = {"implementation": MLFLOW_RUNTIME, "parallel_workers": 0, "parameters": {}}
        if self.uses_tarball(environment):
            settings.update(parallel_workers=1, parameters={"environment_tarball": f"./{TARBALL}"})
        return settings

    def server_manifest(self, *, name: str, job_id: str, environment: ModelEnvironment) -> dict[str, Any]:
        """The deployment's own Server: the mlserver ServerConfig's pod, serving from the model's environment."""
        s = self._settings
        parts = self._environment_parts(environment, models_dir=SELDON_V2_MODELS_DIR)
        # Its memory request is what the agent offers the scheduler (MEMORY_REQUEST): the Model's, so it fits.
        container: dict[str, Any] = {"name": "mlserver", "resources": self._resources_spec(), **parts.server}
        if s.k8s_image:
            container["image"] = s.k8s_image
        pod_spec = {
            "initContainers": [parts.init_container],
            "volumes": [parts.volume],
            "containers": [container],  # merged by name into the ServerConfig's mlserver container
        }
        self._secure_pod(pod_spec, containers=[container])
        return {
            "apiVersion": SELDON_SERVER.api_version,
            "kind": SELDON_SERVER.kind,
            "metadata": self._metadata(name=name, job_id=job_id, environment=environment),
            "spec": {
                "serverConfig": SELDON_V2_SERVER_CONFIG,
                "replicas": s.k8s_replicas,
                "capabilities": [name],  # replaces the ServerConfig's, so only a Model requiring this lands here
                "podSpec": pod_spec,
                **self.claim_retention(),
            },
        }

    @staticmethod
    def claim_retention() -> dict[str, Any]:
        """A per-job Server's volume claims go with it (operator/apis/mlops/v1alpha1/server_types.go passes this
        to the StatefulSet; unset, Kubernetes retains every claim: one 1Gi mlserver-models claim per job)."""
        policy = {"whenDeleted": "Delete", "whenScaled": "Delete"}
        return {"statefulSetPersistentVolumeClaimRetentionPolicy": policy}

    def objects(
        self, *, name: str, job_id: str, model: ModelVersionInfo, environment: ModelEnvironment | None
    ) -> list[tuple[ResourceKind, dict[str, Any]]]:
        model_object = super().objects(name=name, job_id=job_id, model=model, environment=environment)
        if environment is None or not self.own_server(environment):
            return model_object
        if self._settings.k8s_env_delivery == "tarball":
            log.warning(
                "the environment %s holds MLServer %s, the cluster's Seldon Core v2 Server MLServer %s "
                "(RETRO_SELDON_V2_MLSERVER_VERSION): %s gets a Server of its own that installs it at start",
                environment.key,
                environment.server_version,
                self._settings.seldon_v2_mlserver_version,
                name,
            )
        return [(SELDON_SERVER, self.server_manifest(name=name, job_id=job_id, environment=environment)), *model_object]

    def readiness(self, obj: dict[str, Any]) -> Readiness:
        status = readiness_from_conditions(obj)
        if status.failure is not None and only_schedule_failed(obj):
            if (obj.get("spec") or {}).get("server"):
                # On its own Server, which is still building the environment: the scheduler finds no replica of it
                # yet and places the Model once the Server's agent connects. The wait goes on, showing both states.
                return Readiness(state=status.state)
            # No server has room (memory) for it now; Seldon's scheduler retries as others' models unload.
            return Readiness(state=f"waiting for capacity ({status.failure})", capacity=True)
        return status

    def pod_readiness(self, name: str) -> Readiness | None:
        """The deployment's own Server's pods (labelled with its name): a crashing container fails the job with
        its own words. A Model on a shared Server has none: another job's pods are not this job's business."""
        selector = f"{SELDON_SERVER_LABEL}={name}"
        return readiness_from_pods(
            [p for p in self._resources.list_pods(label_selector=selector) if labelled(p, selector)]
        )

    def companion_readiness(self, obj: dict[str, Any]) -> Readiness | None:
        server = (obj.get("spec") or {}).get("server")
        if not server:
            return None
        what = f"the Server {server}"
        items = self._resources.list_labelled(SELDON_SERVER, label_selector=self._selector)
        found = [o for o in items if (o.get("metadata") or {}).get("name") == server]
        if not found:
            return Readiness(state=f"{what}: not found")
        status = readiness_from_conditions(found[0])
        return Readiness(
            state=f"{what}: {status.state}", failure=f"{what}: {status.failure}" if status.failure else None
        )

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
