"""KServe: an InferenceService per job with the MLServer runtime (Serverless or RawDeployment)."""

from __future__ import annotations

from typing import Any

from app.config import Settings
from app.core.model_types import ModelVersionInfo
from app.integrations.deployers.kubernetes import (
    INFERENCE_SERVICE,
    KSERVE_DEPLOYMENT_MODE_ANNOTATION,
    KSERVE_MLSERVER_GRPC_PORT,
    KSERVE_MODELS_DIR,
    KubernetesDeployer,
    Readiness,
    labelled,
    readiness_from_conditions,
    readiness_from_pods,
)
from app.integrations.deployers.port import Deployment
from app.integrations.environments.cache import ModelEnvironment


class KServeDeployer(KubernetesDeployer):
    """KServe: an InferenceService with the mlflow model format over the Open Inference Protocol (v2).

    With a model environment, the predictor's init container builds it and the model's container runs its
    mlserver on /mnt/models, where the storage initializer still puts the model. In Serverless mode Knative must
    allow init containers and emptyDir volumes (config-features: kubernetes.podspec-init-containers,
    kubernetes.podspec-volumes-emptydir); RawDeployment mode needs nothing.
    """

    kind = INFERENCE_SERVICE
    operator = "KServe (its storage initializer)"
    fetch_schemes = ("s3", "gs", "https", "http", "pvc", "hdfs", "webhdfs")

    def spec(self, *, name: str, model: ModelVersionInfo, environment: ModelEnvironment | None) -> dict[str, Any]:
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
            # KServe routes one port per predictor: naming it h2c makes that port MLServer's gRPC server, which
            # listens where the runtime's MLSERVER_GRPC_PORT says.
            model_spec["ports"] = [{"name": "h2c", "containerPort": KSERVE_MLSERVER_GRPC_PORT, "protocol": "TCP"}]
        predictor: dict[str, Any] = {"minReplicas": s.k8s_replicas, "maxReplicas": s.k8s_replicas, "model": model_spec}
        if s.k8s_storage_secret:
            predictor["serviceAccountName"] = s.k8s_storage_secret  # a ServiceAccount that carries the storage Secret
        if environment is not None and self.uses_tarball(environment):
            volume, server = self._tarball_server(name=name, models_dir=KSERVE_MODELS_DIR)
            model_spec.update(server)
            predictor.update(volumes=[volume])
        elif environment is not None:
            # The predictor is a pod spec inline; its model is the kserve-container, merged over the runtime's.
            parts = self._environment_parts(environment, models_dir=KSERVE_MODELS_DIR)
            model_spec.update(parts.server)
            predictor.update(initContainers=[parts.init_container], volumes=[parts.volume])
        self._secure_pod(predictor, containers=[model_spec])  # the predictor is a pod spec inline
        return {"predictor": predictor}

    def manifest(
        self, *, name: str, job_id: str, model: ModelVersionInfo, environment: ModelEnvironment | None = None
    ) -> dict[str, Any]:
        """The InferenceService, annotated with RETRO_KSERVE_DEPLOYMENT_MODE when one is set."""
        body = super().manifest(name=name, job_id=job_id, model=model, environment=environment)
        if self._settings.kserve_deployment_mode:
            annotations = body["metadata"].setdefault("annotations", {})
            annotations[KSERVE_DEPLOYMENT_MODE_ANNOTATION] = self._settings.kserve_deployment_mode
        return body

    @staticmethod
    def adds_init_containers(settings: Settings) -> bool:
        """Whether a predictor gets an init container of ours (a model environment), which Serverless refuses
        unless Knative's kubernetes.podspec-init-containers is enabled; spec() decides it the same way: only an
        environment installed at pod start has one (a tarball is extracted by the server container itself)."""
        return settings.model_env == "model" and settings.k8s_env_delivery == "install"

    def readiness(self, obj: dict[str, Any]) -> Readiness:
        status = obj.get("status") or {}
        model_status = status.get("modelStatus") or {}
        transition = model_status.get("transitionStatus")
        if transition in ("BlockedByFailedLoad", "InvalidSpec"):
            info = model_status.get("lastFailureInfo") or {}
            return Readiness(
                state=str(transition), failure=str(info.get("message") or info.get("reason") or transition)
            )
        return readiness_from_conditions(obj)

    def pod_readiness(self, name: str) -> Readiness | None:
        """Pods that cannot be scheduled (no room) or cannot start show only in the pods' own statuses."""
        selector = f"serving.kserve.io/inferenceservice={name}"
        return readiness_from_pods(
            [p for p in self._resources.list_pods(label_selector=selector) if labelled(p, selector)]
        )

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
