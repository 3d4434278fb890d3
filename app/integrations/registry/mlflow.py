"""MLflow model registry: resolve a name + version or alias to an exact, servable model version."""

from __future__ import annotations

import difflib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from app.core.identifiers import check_name
from app.core.model_types import COLUMN_TYPES, Feature, ModelVersionInfo
from app.errors import (
    DeploymentFailed,
    ModelNotFound,
    ModelSignatureMissing,
    ModelVersionNotFound,
    NotFound,
    Upstream,
)
from app.i18n import _, pgettext

_VERSION = re.compile(r"^[0-9]{1,9}$")


class MlflowRegistry:
    """The MLflow model registry, through MlflowClient (made on first use: a process that never asks the
    registry, such as a worker whose jobs carry their model, never imports mlflow)."""

    def __init__(self, *, tracking_uri: str, registry_uri: str) -> None:
        self._uris = (tracking_uri, registry_uri)
        self._made: Any = None

    @property
    def _client(self) -> Any:
        if self._made is None:
            import mlflow  # heavy import, only where the registry is used

            tracking_uri, registry_uri = self._uris
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(registry_uri)
            self._made = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        return self._made

    def resolve(self, *, name: str, version: str | None = None, alias: str | None = None) -> ModelVersionInfo:
        """Resolve name + version or alias; refuse models without a column-based input signature."""
        from mlflow.exceptions import MlflowException

        try:
            registered = self._client.get_registered_model(name)
        except MlflowException as exc:
            if _not_found(exc):
                raise ModelNotFound(
                    _("no model named {name} in the registry{value}").format(
                        name=repr(name), value=self._did_you_mean(name)
                    ),
                    field="model_name",
                ) from None
            if _invalid(exc):
                raise ModelNotFound(
                    _("{name} cannot be a model name: {message}").format(name=repr(name), message=exc.message),
                    field="model_name",
                ) from None
            raise Upstream(_("the model registry failed: {message}").format(message=exc.message)) from exc
        except Exception as exc:
            raise Upstream(_("the model registry is unreachable: {exc}").format(exc=exc)) from exc
        try:
            if alias is not None:
                mv = self._client.get_model_version_by_alias(name, alias)
            else:
                if version is None or not _VERSION.fullmatch(version):
                    raise ModelVersionNotFound(
                        _("version {version} is not a version number").format(version=repr(version)),
                        field="model_version",
                    )
                mv = self._client.get_model_version(name, version)
        except MlflowException as exc:
            known = sorted(getattr(registered, "aliases", {}) or {})
            near = difflib.get_close_matches(alias, known, n=1, cutoff=0.6) if alias is not None else []
            what = (
                pgettext("missing", "alias {alias}").format(alias=repr(alias))
                if alias is not None
                else pgettext("missing", "version {version}").format(version=version)
            )
            hint = _("; did you mean {names}?").format(names=repr(near[0])) if near else ""
            raise ModelVersionNotFound(
                _("model {name} has no {what}{hint} Its aliases: {value}; its versions: {value2}").format(
                    name=repr(name),
                    what=what,
                    hint=hint,
                    value=", ".join(known) or _("none"),
                    value2=self._versions_text(name),
                ),
                field="model_alias" if alias is not None else "model_version",
            ) from exc
        return self._describe(mv)

    def _did_you_mean(self, name: str) -> str:
        """'; did you mean ...?' with the registered models nearest to a name not found (nothing if none is near)."""
        try:
            names = [m.name for m in self._client.search_registered_models(max_results=1000)]
        except Exception:  # a hint is not worth a second failure
            return ""
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        return _("; did you mean {names}?").format(names=", ".join(repr(n) for n in near)) if near else ""

    def _versions_text(self, name: str) -> str:
        """The model's versions, newest first, for a refusal ("7, 6, 5, ... 1 (12 in all)")."""
        try:
            found = self._client.search_model_versions(
                filter_string=f"name = '{name.replace(chr(39), chr(39) * 2)}'", max_results=1000
            )
        except Exception:
            return _("unknown")
        numbers = sorted((int(v.version) for v in found if str(v.version).isdigit()), reverse=True)
        if not numbers:
            return _("none")
        shown = ", ".join(str(n) for n in numbers[:10])
        return (
            shown if len(numbers) <= 10 else _("{shown}, ... ({count} in all)").format(shown=shown, count=len(numbers))
        )

    def _describe(self, mv: Any) -> ModelVersionInfo:
        from mlflow.models import Model

        artifact_uri = self._client.get_model_version_download_uri(mv.name, mv.version)
        model = self._load_mlmodel(artifact_uri)
        if model.signature is None or model.signature.inputs is None:
            raise ModelSignatureMissing(
                _(
                    "model {name} version {version} was logged without an input signature; log it again with signature=infer_signature(X, y)"
                ).format(name=repr(mv.name), version=mv.version),
                field="model_version",
            )
        inputs = model.signature.inputs
        if not inputs.has_input_names() or inputs.is_tensor_spec():
            raise ModelSignatureMissing(
                _(
                    "model {name} version {version} has a tensor signature; retro tests need a column-based signature naming each feature"
                ).format(name=repr(mv.name), version=mv.version),
                field="model_version",
            )
        features = []
        for col in inputs.inputs:
            type_name = str(getattr(col.type, "name", col.type))
            if type_name not in COLUMN_TYPES:
                raise ModelSignatureMissing(
                    _("feature {name} has type {type_name}, which retro tests cannot score; supported: {value}").format(
                        name=repr(col.name), type_name=type_name, value=", ".join(COLUMN_TYPES)
                    ),
                    field="model_version",
                )
            features.append(Feature(name=check_name(col.name, what="feature"), type=type_name))
        outputs: tuple[str, ...] = ()
        out = model.signature.outputs
        if out is not None and out.has_input_names() and not out.is_tensor_spec():
            outputs = tuple(out.input_names())
        assert isinstance(model, Model)
        return ModelVersionInfo(
            name=mv.name,
            version=str(mv.version),
            run_id=mv.run_id,
            source=mv.source,
            artifact_uri=artifact_uri,
            inputs=tuple(features),
            outputs=outputs,
            tags=dict(mv.tags or {}),
        )

    @staticmethod
    def _load_mlmodel(artifact_uri: str) -> Any:
        import mlflow
        from mlflow.models import Model

        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{artifact_uri.rstrip('/')}/MLmodel", dst_path=tmp
                )
                return Model.load(path)
        except Exception as exc:
            raise Upstream(
                _("cannot read the model's MLmodel file at {artifact_uri}: {exc}").format(
                    artifact_uri=artifact_uri, exc=exc
                )
            ) from exc

    def list_models(self, *, max_results: int = 100) -> list[dict[str, Any]]:
        """Registered models with their aliases and latest version."""
        try:
            models = self._client.search_registered_models(max_results=max_results)
        except Exception as exc:
            raise Upstream(_("the model registry is unreachable: {exc}").format(exc=exc)) from exc
        return [
            {
                "name": m.name,
                "description": m.description or None,
                "aliases": dict(m.aliases or {}),
                "latest_version": max((int(v.version) for v in m.latest_versions or []), default=None),
            }
            for m in models
        ]

    def list_versions(self, *, name: str) -> list[dict[str, Any]]:
        """Every version of one model with its aliases and source tags."""
        from mlflow.exceptions import MlflowException

        try:
            registered = self._client.get_registered_model(name)
            versions = self._client.search_model_versions(
                filter_string=f"name = '{name.replace(chr(39), chr(39) * 2)}'", max_results=1000
            )
        except MlflowException as exc:
            if _not_found(exc) or _invalid(exc):
                raise NotFound(_("no model named {name} in the registry").format(name=repr(name))) from None
            raise Upstream(_("the model registry failed: {message}").format(message=exc.message)) from exc
        by_version: dict[str, list[str]] = {}
        for alias, v in (registered.aliases or {}).items():
            by_version.setdefault(str(v), []).append(alias)
        return sorted(
            (
                {
                    "version": str(v.version),
                    "aliases": sorted(by_version.get(str(v.version), [])),
                    "run_id": v.run_id,
                    "status": v.status,
                    "created_at_ms": v.creation_timestamp,
                    "tags": dict(v.tags or {}),
                }
                for v in versions
            ),
            key=lambda d: -int(d["version"]),
        )

    def ping(self) -> None:
        """Raise if the registry cannot answer."""
        self._client.search_registered_models(max_results=1)


def _not_found(exc: Any) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _invalid(exc: Any) -> bool:
    return getattr(exc, "error_code", "") == "INVALID_PARAMETER_VALUE"


def fetch_model(artifact_uri: str, dest: Path, *, tracking_uri: str | None = None) -> Path:
    """A model version's artifacts, copied into dest; the folder holding its MLmodel is returned.

    Artifacts on this machine's file system are copied as they are; any other store (S3, GCS, an MLflow
    artifact proxy, read through tracking_uri's server when given) is read through mlflow, imported only then (~3 s).
    """
    if dest.exists():
        shutil.rmtree(dest)
    local = _local_path(artifact_uri)
    try:
        if local is not None:
            return Path(shutil.copytree(local, dest / local.name))
        import mlflow

        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=str(dest), tracking_uri=tracking_uri
            )
        )
    except Exception as exc:
        raise DeploymentFailed(f"cannot fetch model artifacts from {artifact_uri}: {exc}") from exc


def _local_path(uri: str) -> Path | None:
    """The directory an artifact location names on this machine's file system, or None for any other store."""
    parsed = urlparse(uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "":
        path = Path(uri)
    else:
        return None
    return path if path.is_dir() else None
