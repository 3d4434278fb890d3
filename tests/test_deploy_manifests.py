"""deploy/ and docker-compose.yml: parsed and checked against the code they deploy."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings
from app.integrations.deployers.kubernetes import API_RULES, CLUSTER_CONFIG_MAPS
from app.integrations.deployers.operators import KUBERNETES_DEPLOYERS

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "base"


def load_base() -> list[dict[str, Any]]:
    """Every object the kustomization lists, checking that it lists every manifest in the folder."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert sorted(listed) == sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    return [doc for name in listed for doc in yaml.safe_load_all((BASE / name).read_text()) if doc]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    return dict(one(objects, "Deployment", deployment)["spec"]["template"]["spec"])


def test_the_role_grants_exactly_what_the_deployers_and_the_reaper_call() -> None:
    objects = load_base()
    roles = [o for o in objects if o["kind"] in ("Role", "ClusterRole")]
    assert [r["kind"] for r in roles] == ["Role"], "one namespaced Role, no ClusterRole"
    granted = {
        (group, resource, verb)
        for rule in roles[0]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    called = {(rule.group, rule.resource, verb) for rule in API_RULES for verb in rule.verbs}
    assert granted == called
    assert not any("*" in part for triple in granted for part in triple)


def test_reads_by_name_are_granted_by_name_and_events_can_be_listed() -> None:
    """Secrets, ServiceAccounts and the ServerConfig only by resourceNames, for the objects the settings name; the
    deployers list events (a refused pod never exists, its event says why)."""
    objects = load_base()
    settings = one(objects, "ConfigMap", "retrotest-settings")["data"]
    storage = settings["RETRO_K8S_STORAGE_SECRET"]
    rules = {
        (g, r): rule for rule in one(objects, "Role")["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    named = {(rule.group, rule.resource) for rule in API_RULES if rule.named}
    assert named == {("", "secrets"), ("", "serviceaccounts"), ("mlops.seldon.io", "serverconfigs")}
    for key, rule in rules.items():
        assert ("resourceNames" in rule) == (key in named), key
        if key in named:
            assert len(rule["resources"]) == 1, "resourceNames would apply to every resource of the rule"
    assert rules[("", "secrets")]["resourceNames"] == [storage]
    assert rules[("", "serviceaccounts")]["resourceNames"] == ["default", storage]
    assert rules[("mlops.seldon.io", "serverconfigs")]["resourceNames"] == ["mlserver"]
    assert rules[("", "events")]["verbs"] == ["list"]


def test_the_optional_check_role_reads_exactly_kserves_and_knatives_settings() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "optional" / "rbac-check-config.yaml").read_text()) if d]
    roles = [d for d in docs if d["kind"] == "Role"]
    granted = {
        (r["metadata"]["namespace"], name, verb)
        for r in roles
        for rule in r["rules"]
        for name in rule["resourceNames"]
        for verb in rule["verbs"]
        if rule["resources"] == ["configmaps"] and rule["apiGroups"] == [""]
    }
    assert granted == {(ns, name, "get") for ns, name in CLUSTER_CONFIG_MAPS}
    assert sum(len(r["rules"]) for r in roles) == len(CLUSTER_CONFIG_MAPS)
    account = one(load_base(), "ServiceAccount")["metadata"]
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
        ]


def test_only_the_workers_and_beat_get_the_role_and_only_in_the_models_namespace() -> None:
    objects = load_base()
    settings = one(objects, "ConfigMap", "retrotest-settings")["data"]
    role = one(objects, "Role")
    binding = one(objects, "RoleBinding")
    account = one(objects, "ServiceAccount")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == settings["RETRO_K8S_NAMESPACE"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": account["metadata"]["namespace"]}
    ]
    # The workers deploy models; beat's control worker runs the reaper. The API never calls Kubernetes.
    for name in ("retrotest-worker", "retrotest-beat"):
        assert pod_spec(objects, name)["serviceAccountName"] == account["metadata"]["name"]
    app = pod_spec(objects, "retrotest-app")
    assert app["automountServiceAccountToken"] is False and "serviceAccountName" not in app
    worker = pod_spec(objects, "retrotest-worker")["containers"][0]
    assert worker["command"] == ["retrotest", "worker"]
    assert worker["ports"] == [{"name": "metrics", "containerPort": int(settings["RETRO_WORKER_METRICS_PORT"])}]
    assert pod_spec(objects, "retrotest-beat")["containers"][0]["command"] == ["retrotest", "beat"]
    beat = one(objects, "Deployment", "retrotest-beat")["spec"]
    assert beat["replicas"] == 1 and beat["strategy"] == {"type": "Recreate"}


def test_the_app_has_a_service_and_an_ingress_and_settings_are_real_settings() -> None:
    objects = load_base()
    app = one(objects, "Deployment", "retrotest-app")
    service = one(objects, "Service", "retrotest-app")
    ingress = one(objects, "Ingress", "retrotest-app")
    assert service["spec"]["selector"] == app["spec"]["selector"]["matchLabels"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "retrotest-app", "port": {"name": "http"}}
    fields = set(Settings.model_fields)
    for kind, name, key in (("ConfigMap", "retrotest-settings", "data"), ("Secret", "retrotest-secrets", "stringData")):
        for variable in one(objects, kind, name)[key]:
            assert variable.startswith("RETRO_") and variable[6:].lower() in fields, variable
    data = one(objects, "ConfigMap", "retrotest-settings")["data"]
    assert data["RETRO_DEPLOYER"] in KUBERNETES_DEPLOYERS
    Settings(**{k[6:].lower(): v for k, v in data.items()})  # every value parses
    for deployment in ("retrotest-app", "retrotest-worker", "retrotest-beat"):
        for container in pod_spec(objects, deployment)["containers"]:
            refs = [next(iter(ref.values()))["name"] for ref in container["envFrom"]]
            assert refs == ["retrotest-settings", "retrotest-secrets"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_config_is_valid_and_runs_beat() -> None:
    env = {**os.environ, "RETRO_SECRET_KEY": "test-secret-not-used"}
    done = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "config"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert {"postgres", "redis", "mlflow", "migrate", "app", "worker", "beat"} <= set(services)
    assert services["beat"]["command"] == ["retrotest", "beat"]
    assert services["beat"]["environment"]["RETRO_SECRET_KEY"] == "test-secret-not-used"
    assert {"migrate", "redis"} <= set(services["beat"]["depends_on"])  # beat's reaper and reconciler read jobs
    without_secret = {k: v for k, v in os.environ.items() if k != "RETRO_SECRET_KEY"}
    refused = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "config"], cwd=ROOT, env=without_secret, capture_output=True
    )
    assert refused.returncode != 0
