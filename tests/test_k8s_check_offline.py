"""`retrotest k8s check` without a cluster: what a platform engineer reads when the API server cannot be reached or
the staging URL that the environment tarball needs is missing. No service: a loopback port nothing listens on."""

from __future__ import annotations

from tests.conftest import free_port


def test_the_check_names_the_unreachable_api_and_the_missing_staging_url_in_a_line_each() -> None:
    from app.config import Settings
    from app.integrations.deployers.kubernetes_check import run_checks

    url = f"http://127.0.0.1:{free_port()}"
    # Explicit settings: a test process that ran tests/k8s first has the emulator's staging URL in its environment.
    base = {"deployer": "kserve", "k8s_api_url": url, "model_env": "model", "model_staging_url": ""}
    settings = Settings(**base, k8s_env_delivery="tarball")  # type: ignore[arg-type]
    results = {r.name: r for r in run_checks(settings=settings)}
    unreachable = results["custom resource"]
    assert not unreachable.ok and unreachable.detail == f"cannot reach the Kubernetes API at {url} (Connection refused)"
    staging = results["model staging"]
    assert not staging.ok and "RETRO_MODEL_STAGING_URL is empty, but the model's environment travels" in staging.detail
    # Built at pod start instead, a registry that keeps models on s3:// is enough.
    install = Settings(**base, k8s_env_delivery="install")  # type: ignore[arg-type]
    assert {r.name: r for r in run_checks(settings=install)}["model staging"].ok
