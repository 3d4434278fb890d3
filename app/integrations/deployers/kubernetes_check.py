"""`retrotest k8s check`: what a Kubernetes deployer needs before its first job, checked one by one.

Each check says what it looked at and, when it fails, what to do; none creates anything in the cluster (the
staging check writes and deletes one small object under RETRO_MODEL_STAGING_URL).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from app.config import Settings
from app.integrations.deployers.kserve import KServeDeployer
from app.integrations.deployers.kubernetes import (
    API_RULES,
    KSERVE_DEPLOYMENT_MODE_ANNOTATION,
    SECRETS,
    SELDON_SERVER_CONFIG,
    SELDON_V2_SERVER_CONFIG,
    SERVICE_ACCOUNTS,
    ApiRule,
    CustomResources,
    _describe_error,
)
from app.integrations.deployers.operators import KUBERNETES_DEPLOYERS
from app.integrations.deployers.staging import ModelStaging

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class CheckResult:
    """One check: passed or not, and what was found."""

    name: str
    ok: bool
    detail: str


def run_checks(*, settings: Settings, resources: CustomResources | None = None) -> list[CheckResult]:
    """Every check for the configured deployer, in order."""
    resources = resources or CustomResources(settings=settings)
    return list(_checks(settings=settings, resources=resources))


def _checks(*, settings: Settings, resources: CustomResources) -> Iterator[CheckResult]:
    deployer = KUBERNETES_DEPLOYERS.get(settings.deployer)
    if deployer is None:
        yield CheckResult("deployer", False, f"RETRO_DEPLOYER is {settings.deployer!r}: not a Kubernetes deployer")
        return
    steps: list[tuple[str, Callable[[], str]]] = [
        ("custom resource", lambda: _crd(resources, deployer.kind)),
        ("namespace", lambda: _namespace(resources)),
        ("permissions", lambda: _permissions(resources)),
        ("storage credentials", lambda: _credentials(settings, resources)),
        ("model staging", lambda: _staging(settings)),
        ("images", lambda: _images(settings)),
    ]
    if settings.deployer == "kserve":
        steps.append(("deployment mode", lambda: _kserve_mode(settings, resources)))
    if settings.deployer == "seldon_v2":
        steps.append(("server config", lambda: _server_config(resources)))
    for name, step in steps:
        try:
            yield CheckResult(name, True, step())
        except CheckFailed as exc:
            yield CheckResult(name, False, str(exc))
        except Exception as exc:
            yield CheckResult(name, False, _describe_error(exc))


class CheckFailed(Exception):
    """A check found something missing or wrong; the message says what to do."""


def _crd(resources: CustomResources, kind: Any) -> str:
    from kubernetes.client.exceptions import ApiException

    try:
        resources.list_labelled(kind, label_selector="app.kubernetes.io/managed-by=retrotest")
    except ApiException as exc:
        if exc.status == 404:
            raise CheckFailed(
                f"{kind.plural}.{kind.group}/{kind.version} is not served: install the operator's CRDs"
            ) from None
        raise
    return f"{kind.plural}.{kind.group}/{kind.version} is served"


def _namespace(resources: CustomResources) -> str:
    # Every namespace has a ServiceAccount named default; reading it needs no wider permission than the Role's.
    if resources.get_core(SERVICE_ACCOUNTS, "default") is None:
        raise CheckFailed(f"namespace {resources.namespace} not found (it has no default ServiceAccount): create it")
    return f"{resources.namespace} exists"


def _permissions(resources: CustomResources) -> str:
    from kubernetes import client

    api = client.AuthorizationV1Api(resources.core().api_client)
    denied = []
    total = 0
    for rule in API_RULES:
        # A rule granted by resourceNames is asked about each object this installation reads, by name.
        for name in _named_objects(resources.settings, rule) if rule.named else [""]:
            for verb in rule.verbs:
                total += 1
                attributes = {
                    "namespace": resources.namespace,
                    "group": rule.group,
                    "resource": rule.resource,
                    "verb": verb,
                }
                if name:
                    attributes["name"] = name
                review: Any = {
                    "apiVersion": "authorization.k8s.io/v1",
                    "kind": "SelfSubjectAccessReview",
                    "spec": {"resourceAttributes": attributes},
                }
                answer = api.create_self_subject_access_review(review)
                if not (answer.status and answer.status.allowed):
                    what = f"{rule.resource}{'.' + rule.group if rule.group else ''}"
                    denied.append(f"{verb} {what}" + (f" {name}" if name else ""))
    if denied:
        raise CheckFailed(f"not allowed: {', '.join(denied)}; apply deploy/base/rbac.yaml (Role and RoleBinding)")
    return f"all {total} permissions of deploy/base/rbac.yaml are allowed in {resources.namespace}"


def _named_objects(settings: Settings, rule: ApiRule) -> list[str]:
    """The objects a rule granted by resourceNames must cover for these settings."""
    storage = [settings.k8s_storage_secret] if settings.k8s_storage_secret else []
    if rule.resource == "serviceaccounts":
        return ["default", *(storage if settings.deployer == "kserve" else [])]
    if rule.resource == "secrets":
        return storage if settings.deployer != "kserve" else []  # KServe's: those its ServiceAccount lists
    if rule.resource == SELDON_SERVER_CONFIG.plural:
        return [SELDON_V2_SERVER_CONFIG] if settings.deployer == "seldon_v2" else []
    return []


def _credentials(settings: Settings, resources: CustomResources) -> str:
    name = settings.k8s_storage_secret
    if not name:
        raise CheckFailed("RETRO_K8S_STORAGE_SECRET is empty: the operator gets no credentials to fetch models")
    remote = _staging_scheme(settings)
    if settings.deployer == "kserve":
        return _kserve_service_account(resources, name, remote)
    secret = resources.get_core(SECRETS, name)
    if secret is None:
        raise CheckFailed(f"Secret {name} not found in {resources.namespace}: create it (deploy/README.md)")
    keys = sorted((secret.get("data") or {}).keys())
    if settings.deployer == "seldon":
        want = f"RCLONE_CONFIG_{remote.upper()}_TYPE"
        if want not in keys:
            raise CheckFailed(f"Secret {name} has no {want} (rclone environment variables for remote {remote!r})")
        return f"Secret {name} configures the rclone remote {remote!r} (Seldon v1 envSecretRefName)"
    if len(keys) != 1:
        raise CheckFailed(f"Secret {name} must hold exactly one key (an rclone config), not {keys}")
    config = _decoded(secret, keys[0], name=name)
    if config.get("name") != remote:
        raise CheckFailed(f"the rclone config in Secret {name} is named {_plain(config.get('name'))}, not {remote!r}")
    return f"Secret {name} holds the rclone config {remote!r} (Seldon v2 secretName)"


def _kserve_service_account(resources: CustomResources, name: str, remote: str) -> str:
    account = resources.get_core(SERVICE_ACCOUNTS, name)
    if account is None:
        raise CheckFailed(f"ServiceAccount {name} not found in {resources.namespace}: create it (deploy/README.md)")
    listed = [s.get("name") for s in account.get("secrets") or []]
    if not listed:
        raise CheckFailed(f"ServiceAccount {name} lists no Secret: add the storage Secret under secrets")
    for secret_name in listed:
        secret = resources.get_core(SECRETS, str(secret_name))
        if secret is None:
            raise CheckFailed(f"Secret {secret_name}, listed by ServiceAccount {name}, not found")
        keys = set((secret.get("data") or {}).keys())
        if remote == "s3" and {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= keys:
            endpoint = ((secret.get("metadata") or {}).get("annotations") or {}).get("serving.kserve.io/s3-endpoint")
            return f"ServiceAccount {name} carries Secret {secret_name} (S3, endpoint {endpoint or 'AWS'})"
        if remote == "gs" and "gcloud-application-credentials.json" in keys:
            return f"ServiceAccount {name} carries Secret {secret_name} (GCS)"
    raise CheckFailed(f"no Secret listed by ServiceAccount {name} has {remote} credentials in KServe's format")


def _decoded(secret: dict[str, Any], key: str, *, name: str) -> dict[str, Any]:
    """The rclone config under key, parsed; CheckFailed that names only the key, its size and where parsing
    stopped. Never a byte of the value: parsers quote the text they choke on, and that text is a credential."""
    import base64
    import binascii

    import yaml

    encoded = (secret.get("data") or {})[key]
    where = f"the rclone config in Secret {name} (key {key!r}, {len(str(encoded))} base64 characters)"
    try:
        text = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, ValueError) as exc:
        kind = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "not valid base64"
        raise CheckFailed(f"{where} is {kind}") from None
    try:
        loaded = json.loads(text)
    except ValueError:
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CheckFailed(f"{where} parses as neither JSON nor YAML: {_yaml_position(exc)}") from None
    return loaded if isinstance(loaded, dict) else {}


def _yaml_position(exc: Exception) -> str:
    """The kind of a YAML error and where it is, without the text around it that str(exc) would quote."""
    mark = getattr(exc, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{type(exc).__name__}{at}"


def _plain(value: object) -> str:
    """A config's name as the check may print it: a short plain name as is, anything else only by its length."""
    text = str(value)
    return repr(text) if _PLAIN_NAME.fullmatch(text) else f"a value of {len(text)} characters"


def _staging_scheme(settings: Settings) -> str:
    from urllib.parse import urlparse

    return urlparse(settings.model_staging_url).scheme or "s3"


def _staging(settings: Settings) -> str:
    staging = ModelStaging(settings=settings)
    if not staging.enabled:
        if settings.model_env == "model" and settings.k8s_env_delivery == "tarball":
            raise CheckFailed(
                "RETRO_MODEL_STAGING_URL is empty, but the model's environment travels staged beside the model "
                "(RETRO_K8S_ENV_DELIVERY=tarball): set it to an s3:// or gs:// prefix the operator's storage "
                "credentials can read (or RETRO_K8S_ENV_DELIVERY=install, which needs an index at pod start)"
            )
        return "RETRO_MODEL_STAGING_URL is empty: only models the registry already keeps on s3:// or gs:// can deploy"
    try:
        staging.check_writable()
    except Exception as exc:
        raise CheckFailed(f"cannot write under {staging.url}: {type(exc).__name__}: {exc}") from exc
    return f"{staging.url} is writable"


def _images(settings: Settings) -> str:
    """Images by digest: a floating tag (uv's debian-slim) can change under a running installation."""
    used = {"RETRO_K8S_ENV_BUILDER_IMAGE": settings.k8s_env_builder_image} if settings.model_env == "model" else {}
    if settings.k8s_image:
        used["RETRO_K8S_IMAGE"] = settings.k8s_image
    floating = [f"{setting}={image}" for setting, image in used.items() if "@sha256:" not in image]
    if not floating:
        return "every image we set is pinned by digest" if used else "no image of ours is set"
    message = f"not pinned by digest (name@sha256:...): {', '.join(floating)}"
    if settings.env == "prod":
        raise CheckFailed(message)
    return f"warning: {message}"


def _config_map(resources: CustomResources, namespace: str, name: str) -> tuple[dict[str, str] | None, str]:
    """A cluster ConfigMap's data, or None and why it could not be read."""
    from kubernetes.client.exceptions import ApiException

    try:
        found = resources.get_config_map(namespace, name)
    except ApiException as exc:
        if exc.status == 403:
            return None, f"{namespace}/{name} not readable (apply deploy/optional/rbac-check-config.yaml)"
        raise
    if found is None:
        return None, f"{namespace}/{name} not found"
    return dict(found.get("data") or {}), ""


def _kserve_mode(settings: Settings, resources: CustomResources) -> str:
    """KServe's deployment mode for our InferenceServices, and whether Knative lets their init containers in."""
    config, why = _config_map(resources, "kserve", "inferenceservice-config")
    default = ""
    if config is not None:
        try:
            default = str(json.loads(config.get("deploy") or "{}").get("defaultDeploymentMode") or "")
        except ValueError:
            why = "kserve/inferenceservice-config key deploy is not JSON"
    mode = settings.kserve_deployment_mode or default
    said = (
        f"{KSERVE_DEPLOYMENT_MODE_ANNOTATION}={settings.kserve_deployment_mode} (RETRO_KSERVE_DEPLOYMENT_MODE)"
        if settings.kserve_deployment_mode
        else f"the cluster's default {default or '(unknown: ' + why + ')'}"
    )
    if mode in ("RawDeployment", "Standard"):
        return f"{mode} ({said}): plain Deployments, init containers allowed"
    features, unread = _config_map(resources, "knative-serving", "config-features")
    flag = (features or {}).get("kubernetes.podspec-init-containers", "disabled" if features is not None else "")
    knative = f"Knative kubernetes.podspec-init-containers: {flag or unread}"
    init_containers = KServeDeployer.adds_init_containers(settings)
    if mode and init_containers and features is not None and flag != "enabled":
        raise CheckFailed(
            f"{mode} ({said}) with {knative}: Knative refuses the model environment's init container; set "
            "RETRO_KSERVE_DEPLOYMENT_MODE=RawDeployment or enable the flag in knative-serving/config-features"
        )
    return f"{mode or 'unknown'} ({said}); {knative}"


def _server_config(resources: CustomResources) -> str:
    """Seldon v2's ServerConfig the deployments' own Servers start from: its image and its volume claims."""
    from kubernetes.client.exceptions import ApiException

    name = SELDON_V2_SERVER_CONFIG
    try:
        config = resources.get_custom(SELDON_SERVER_CONFIG, name)
    except ApiException as exc:
        if exc.status == 403:
            return f"ServerConfig {name} not readable ({_describe_error(exc)}); apply deploy/base/rbac.yaml"
        raise
    if config is None:
        raise CheckFailed(
            f"ServerConfig {name} not found in {resources.namespace}: install Seldon Core v2's ServerConfigs"
        )
    pod = (config.get("spec") or {}).get("podSpec") or {}
    images = [f"{c.get('name')}={c.get('image')}" for c in pod.get("containers") or []]
    claims = [
        f"{t.get('name') or (t.get('metadata') or {}).get('name')} "
        f"{(((t.get('spec') or {}).get('resources') or {}).get('requests') or {}).get('storage', '?')}"
        for t in (config.get("spec") or {}).get("volumeClaimTemplates") or []
    ]
    return (
        f"ServerConfig {name}: containers {', '.join(images) or 'none'}; volume claims {', '.join(claims) or 'none'} "
        "(a deployment's own Server deletes its claims with it)"
    )
