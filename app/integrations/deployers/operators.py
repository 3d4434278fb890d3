"""The Kubernetes deployers by RETRO_DEPLOYER value: a new operator is one module and one line here."""

from __future__ import annotations

from app.integrations.deployers.kserve import KServeDeployer
from app.integrations.deployers.kubernetes import KubernetesDeployer
from app.integrations.deployers.seldon_v1 import SeldonDeployer
from app.integrations.deployers.seldon_v2 import SeldonV2Deployer

KUBERNETES_DEPLOYERS: dict[str, type[KubernetesDeployer]] = {
    "seldon": SeldonDeployer,
    "seldon_v2": SeldonV2Deployer,
    "kserve": KServeDeployer,
}
