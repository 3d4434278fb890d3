"""Model staging: a copy of a model version where a Kubernetes operator's own downloader can fetch it.

The registry hands out URIs only MLflow reads (`mlflow-artifacts:/…` from a tracking server that proxies
artifacts, `models:/…`, a local path). Seldon Core v1 and v2 fetch a model with rclone and KServe with its storage
initializer: each knows object stores, not MLflow. So when a version's URI is not one the target operator fetches,
its artifacts are read through the MLflow client and copied under RETRO_MODEL_STAGING_URL (an fsspec `s3://` or
`gs://` prefix), keyed by a hash of their content, and the operator is given that copy:

    {prefix}/models/{sha256}/…      the artifacts as the registry holds them (MLmodel at the top)
    {prefix}/last-used/{sha256}     unix seconds of the last job that used it; written last, so its presence
                                    means the copy is whole

A version is uploaded once; later jobs only touch its last-used marker. The reaper deletes a copy unused for
RETRO_MODEL_STAGING_TTL_S.

With a model environment delivered as a tarball (RETRO_K8S_ENV_DELIVERY=tarball, app/integrations/environments/tarball.py)
the staged folder is a bundle: the model's artifacts, `environment.tar.gz` beside them and, for Seldon Core v2, a
`model-settings.json` naming it. Each operator fetches exactly one storage URI per deployment (Seldon v2's agent
the Model's storageUri into the server's models folder, Seldon v1's and KServe's storage initializers the model URI
into /mnt/models), so the environment has to sit in the model's folder to arrive with it. A bundle is keyed by the
hash of the model's content, the tarball's sha256 and the settings, so it is uploaded once and reaped like a model.
With install-at-start delivery the pins travel inline in the init container's environment and only the model
itself (with Seldon v2's model-settings.json) moves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from app.config import Settings
from app.core.model_types import ModelVersionInfo
from app.errors import DeploymentFailed
from app.integrations.registry.mlflow import fetch_model

log = logging.getLogger(__name__)

STAGING_SCHEMES = ("s3", "gs")
MODELS_DIR = "models"
LAST_USED_DIR = "last-used"


class ModelStaging:
    """Copies of model versions under one object-store prefix, reachable by the operators' downloaders."""

    def __init__(self, *, settings: Settings) -> None:
        self.url = settings.model_staging_url.rstrip("/")
        self._ttl_s = settings.model_staging_ttl_s
        self._options = dict(settings.model_staging_storage_options)
        self._fs: Any = None
        self._tracking_uri = settings.resolved_tracking_uri()  # an mlflow-artifacts: URI is read through it
        if self.url and urlparse(self.url).scheme not in STAGING_SCHEMES:
            raise ValueError(f"RETRO_MODEL_STAGING_URL must be an s3:// or gs:// prefix, not {self.url!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def _filesystem(self) -> Any:
        if self._fs is None:
            import fsspec

            self._fs = fsspec.filesystem(urlparse(self.url).scheme, **self._options)
        return self._fs

    def servable(self, model: ModelVersionInfo, *, schemes: tuple[str, ...], operator: str) -> ModelVersionInfo:
        """The model with a URI the operator fetches: its own when the scheme is one, else a staged copy."""
        scheme = urlparse(model.artifact_uri).scheme
        if scheme in schemes:
            return model
        if not self.enabled:
            raise DeploymentFailed(
                f"{operator} cannot fetch the model from {model.artifact_uri} (it fetches only "
                f"{', '.join(s + '://' for s in schemes)}); set RETRO_MODEL_STAGING_URL to an s3:// or gs:// "
                "prefix its storage credentials can read, and the model is copied there"
            )
        return dataclasses.replace(model, artifact_uri=self.stage(model))

    def stage(self, model: ModelVersionInfo) -> str:
        """The URI of the staged copy of the model's artifacts, uploaded now unless a whole copy is there."""
        try:
            with tempfile.TemporaryDirectory(prefix="retro-stage-") as tmp:
                local = fetch_model(model.artifact_uri, Path(tmp) / "model", tracking_uri=self._tracking_uri)
                digest = content_hash(local)
                target = f"{self.url}/{MODELS_DIR}/{digest}"
                fs = self._filesystem()
                if fs.exists(self._marker(digest)):
                    log.info("model %s version %s is staged already at %s", model.name, model.version, target)
                else:
                    for path in _files(local):
                        fs.put_file(str(path), f"{target}/{path.relative_to(local).as_posix()}")
                    log.info("staged model %s version %s at %s", model.name, model.version, target)
                self._touch(digest)
        except DeploymentFailed:
            raise
        except Exception as exc:
            raise DeploymentFailed(f"cannot stage the model to {self.url}: {type(exc).__name__}: {exc}") from exc
        return target

    def stage_bundle(
        self,
        model: ModelVersionInfo,
        *,
        tarball: Path | None,
        model_settings: dict[str, Any] | None,
        tarball_sha256: str = "",
        tarball_name: str = "environment.tar.gz",
    ) -> str:
        """The URI of a staged folder holding the model's artifacts, the environment's tarball and model-settings.json."""
        try:
            with tempfile.TemporaryDirectory(prefix="retro-stage-") as tmp:
                local = fetch_model(model.artifact_uri, Path(tmp) / "model", tracking_uri=self._tracking_uri)
                extra: dict[str, Path] = {}
                key = hashlib.sha256(content_hash(local).encode())
                if tarball is not None:
                    extra[tarball_name] = tarball
                    key.update(b"\0tarball\0" + (tarball_sha256 or _sha256(tarball)).encode())
                if model_settings is not None:
                    settings_file = Path(tmp) / "model-settings.json"
                    settings_file.write_text(json.dumps(model_settings, sort_keys=True))
                    extra["model-settings.json"] = settings_file
                    key.update(b"\0settings\0" + settings_file.read_bytes())
                digest = key.hexdigest()
                target = f"{self.url}/{MODELS_DIR}/{digest}"
                fs = self._filesystem()
                if fs.exists(self._marker(digest)):
                    log.info(
                        "model %s version %s is staged already with its environment at %s",
                        model.name,
                        model.version,
                        target,
                    )
                else:
                    uploads = [(p, p.relative_to(local).as_posix()) for p in _files(local)]
                    uploads += [(path, name) for name, path in sorted(extra.items())]
                    for path, name in uploads:
                        fs.put_file(str(path), f"{target}/{name}")
                    log.info("staged model %s version %s with its environment at %s", model.name, model.version, target)
                self._touch(digest)
        except Exception as exc:
            raise DeploymentFailed(f"cannot stage the model to {self.url}: {type(exc).__name__}: {exc}") from exc
        return target

    def _marker(self, digest: str) -> str:
        return f"{self.url}/{LAST_USED_DIR}/{digest}"

    def _touch(self, digest: str) -> None:
        with self._filesystem().open(self._marker(digest), "w") as f:
            f.write(str(int(time.time())))

    def check_writable(self) -> None:
        """Write and delete a small object under the prefix; raises with the store's own message."""
        fs = self._filesystem()
        probe = f"{self.url}/{LAST_USED_DIR}/.retrotest-check-{int(time.time() * 1000)}"
        with fs.open(probe, "w") as f:
            f.write("ok")
        fs.rm(probe)

    def reap(self, *, now: float | None = None) -> list[str]:
        """Delete staged copies unused for RETRO_MODEL_STAGING_TTL_S; return their hashes."""
        if not self.enabled:
            return []
        now = time.time() if now is None else now
        fs = self._filesystem()
        reaped = []
        for marker in fs.find(f"{self.url}/{LAST_USED_DIR}"):
            digest = marker.rstrip("/").rsplit("/", 1)[-1]
            if digest.startswith("."):
                continue
            try:
                with fs.open(marker, "r") as f:
                    last_used = float(f.read().strip() or 0)
            except (FileNotFoundError, ValueError):
                continue
            if now - last_used < self._ttl_s:
                continue
            # The marker goes first: a job staging this version meanwhile then uploads it whole again.
            fs.rm(marker)
            fs.rm(f"{self.url}/{MODELS_DIR}/{digest}", recursive=True)
            log.info("reaper: deleted the staged model %s, unused since %s", digest, int(last_used))
            reaped.append(digest)
        return reaped


def content_hash(folder: Path) -> str:
    """sha256 over every file's path and bytes under folder, in a stable order."""
    digest = hashlib.sha256()
    for path in _files(folder):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> Iterator[Path]:
    return iter(sorted(p for p in folder.rglob("*") if p.is_file()))
