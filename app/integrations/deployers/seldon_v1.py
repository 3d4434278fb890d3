"""Seldon Core v1: a SeldonDeployment per job (MLServer or Seldon's own protocol)."""

from __future__ import annotations

from typing import Any

from app.config import Settings
from app.core.model_types import ModelVersionInfo
from app.integrations.deployers.kubernetes import (
    SELDON_DEPLOYMENT,
    SELDON_V1_MODELS_DIR,
    CustomResources,
    KubernetesDeployer,
    Readiness,
    labelled,
    readiness_from_pods,
)
from app.integrations.deployers.port import Deployment
from app.integrations.environments.cache import ModelEnvironment


class SeldonDeployer(KubernetesDeployer):
    """Seldon Core v1: a SeldonDeployment with one MLFLOW_SERVER graph node; protocol v2 (MLServer) or seldon.

    With a model environment and protocol v2, the pod's init container builds it and the graph node's container
    (named after the node, which Seldon fills in as MLServer) runs its mlserver. With protocol seldon, Seldon's own
    MLflow server already builds the model's conda environment from its conda.yaml at pod start, so the manifest
    stays as it is and only the annotations name the environment.
    """

    kind = SELDON_DEPLOYMENT
    operator = "Seldon Core v1 (rclone in its storage initializer)"
    predictor = "default"

    def __init__(self, *, settings: Settings, resources: CustomResources | None = None) -> None:
        super().__init__(settings=settings, resources=resources)
        if settings.seldon_protocol == "v2" and settings.seldon_parameters:
            # Seldon passes graph parameters as PREDICTIVE_UNIT_PARAMETERS, which MLServer never reads.
            raise ValueError(
                "RETRO_SELDON_PARAMETERS only reach Seldon's own MLflow server (RETRO_SELDON_PROTOCOL=seldon); "
                "with protocol v2 MLServer would silently ignore them: unset them or use protocol seldon"
            )

    def pod_readiness(self, name: str) -> Readiness | None:
        """Seldon v1 leaves a deployment Creating while its pods crash: their statuses tell what went wrong."""
        selector = f"seldon-deployment-id={name}"
        return readiness_from_pods(
            [p for p in self._resources.list_pods(label_selector=selector) if labelled(p, selector)]
        )

    def spec(self, *, name: str, model: ModelVersionInfo, environment: ModelEnvironment | None) -> dict[str, Any]:
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
        pod: dict[str, Any] = {"containers": [container]}
        if environment is not None and s.seldon_protocol == "v2" and self.uses_tarball(environment):
            volume, server = self._tarball_server(name=name, models_dir=SELDON_V1_MODELS_DIR)
            container.update(server)
            pod.update(volumes=[volume])
        elif environment is not None and s.seldon_protocol == "v2":
            parts = self._environment_parts(environment, models_dir=SELDON_V1_MODELS_DIR)
            container.update(parts.server)
            pod.update(initContainers=[parts.init_container], volumes=[parts.volume])
        self._secure_pod(pod, containers=[container])
        predictor = {
            "name": self.predictor,
            "replicas": s.k8s_replicas,
            "graph": graph,
            "componentSpecs": [{"spec": pod}],
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
