"""MLflow model registry: resolve a name + version or alias to an exact, servable model version."""

from __future__ import annotations

import difflib
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from app.core.records import ModelRecord
from app.errors import (
    DeploymentFailed,
    ModelNotFound,
    ModelSignatureMissing,
    ModelVersionNotFound,
    NotFound,
    SourceUnknown,
    Upstream,
)
from app.integrations.identifiers import check_name, check_table

TAG_TABLE = "retro.source.table"
TAG_DATE_COLUMN = "retro.source.date_column"
TAG_ID_COLUMNS = "retro.source.id_columns"

# MLflow column types -> (Open Inference Protocol datatype, Arrow type name).
COLUMN_TYPES: dict[str, tuple[str, str]] = {
    "double": ("FP64", "float64"),
    "float": ("FP32", "float32"),
    "long": ("INT64", "int64"),
    "integer": ("INT32", "int32"),
    "boolean": ("BOOL", "bool"),
    "string": ("BYTES", "string"),
}


@dataclass(frozen=True)
class Feature:
    """One model input column and its MLflow type."""

    name: str
    type: str

    @property
    def v2_datatype(self) -> str:
        return COLUMN_TYPES[self.type][0]

    @property
    def arrow_type(self) -> str:
        return COLUMN_TYPES[self.type][1]


@dataclass(frozen=True)
class SourceSpec:
    """Where a model's feature history lives."""

    table: str
    date_column: str
    id_columns: tuple[str, ...]


@dataclass(frozen=True)
class ModelVersionInfo:
    """A registered model version, fully resolved."""

    name: str
    version: str
    run_id: str | None
    source: str
    artifact_uri: str
    inputs: tuple[Feature, ...]
    outputs: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)

    def own_id_columns(self) -> tuple[str, ...]:
        """The id columns recorded on the model version (its tag); empty when it records none."""
        return tuple(_split(self.tags.get(TAG_ID_COLUMNS, "")))

    def source_spec(self, override: dict[str, Any] | None = None) -> SourceSpec:
        """The history source from the version's tags, with the request's overrides on top."""
        override = override or {}
        table = override.get("table") or self.tags.get(TAG_TABLE)
        date_column = override.get("date_column") or self.tags.get(TAG_DATE_COLUMN)
        ids = override.get("id_columns") or _split(self.tags.get(TAG_ID_COLUMNS, ""))
        missing = [
            tag
            for tag, value in ((TAG_TABLE, table), (TAG_DATE_COLUMN, date_column), (TAG_ID_COLUMNS, ids))
            if not value
        ]
        if missing:
            raise SourceUnknown(
                f"model {self.name!r} version {self.version} does not say where its feature history "
                f"lives: set the model version tag(s) {', '.join(missing)} in the registry, or give "
                "source.table, source.date_column and source.id_columns in the request",
                field="source",
            )
        assert table and date_column
        check_table(table)
        check_name(date_column, what="date_column")
        for c in ids:
            check_name(c, what="id_columns")
        return SourceSpec(table=table, date_column=date_column, id_columns=tuple(ids))

    def to_record(self) -> ModelRecord:
        """As the job keeps it: every attempt reads it back instead of asking the registry."""
        return ModelRecord(
            name=self.name,
            version=self.version,
            run_id=self.run_id,
            source=self.source,
            artifact_uri=self.artifact_uri,
            inputs=[(f.name, f.type) for f in self.inputs],
            outputs=list(self.outputs),
            tags=dict(self.tags),
        )

    @classmethod
    def from_record(cls, record: ModelRecord) -> ModelVersionInfo:
        return cls(
            name=record.name,
            version=record.version,
            run_id=record.run_id,
            source=record.source,
            artifact_uri=record.artifact_uri,
            inputs=tuple(Feature(name=name, type=type_) for name, type_ in record.inputs),
            outputs=tuple(record.outputs),
            tags=dict(record.tags),
        )


def _split(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


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
                    f"no model named {name!r} in the registry{self._did_you_mean(name)}", field="model_name"
                ) from None
            if _invalid(exc):
                raise ModelNotFound(f"{name!r} cannot be a model name: {exc.message}", field="model_name") from None
            raise Upstream(f"the model registry failed: {exc.message}") from exc
        except Exception as exc:
            raise Upstream(f"the model registry is unreachable: {exc}") from exc
        try:
            if alias is not None:
                mv = self._client.get_model_version_by_alias(name, alias)
            else:
                if version is None or not _VERSION.fullmatch(version):
                    raise ModelVersionNotFound(f"version {version!r} is not a version number", field="model_version")
                mv = self._client.get_model_version(name, version)
        except MlflowException as exc:
            known = sorted(getattr(registered, "aliases", {}) or {})
            near = difflib.get_close_matches(alias, known, n=1, cutoff=0.6) if alias is not None else []
            what = f"alias {alias!r}" if alias is not None else f"version {version}"
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ModelVersionNotFound(
                f"model {name!r} has no {what}{hint} Its aliases: {', '.join(known) or 'none'}; "
                f"its versions: {self._versions_text(name)}",
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
        return f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""

    def _versions_text(self, name: str) -> str:
        """The model's versions, newest first, for a refusal ("7, 6, 5, ... 1 (12 in all)")."""
        try:
            found = self._client.search_model_versions(
                filter_string=f"name = '{name.replace(chr(39), chr(39) * 2)}'", max_results=1000
            )
        except Exception:
            return "unknown"
        numbers = sorted((int(v.version) for v in found if str(v.version).isdigit()), reverse=True)
        if not numbers:
            return "none"
        shown = ", ".join(str(n) for n in numbers[:10])
        return shown if len(numbers) <= 10 else f"{shown}, ... ({len(numbers)} in all)"

    def _describe(self, mv: Any) -> ModelVersionInfo:
        from mlflow.models import Model

        artifact_uri = self._client.get_model_version_download_uri(mv.name, mv.version)
        model = self._load_mlmodel(artifact_uri)
        if model.signature is None or model.signature.inputs is None:
            raise ModelSignatureMissing(
                f"model {mv.name!r} version {mv.version} was logged without an input signature; "
                "log it again with signature=infer_signature(X, y)",
                field="model_version",
            )
        inputs = model.signature.inputs
        if not inputs.has_input_names() or inputs.is_tensor_spec():
            raise ModelSignatureMissing(
                f"model {mv.name!r} version {mv.version} has a tensor signature; retro tests need a "
                "column-based signature naming each feature",
                field="model_version",
            )
        features = []
        for col in inputs.inputs:
            type_name = str(getattr(col.type, "name", col.type))
            if type_name not in COLUMN_TYPES:
                raise ModelSignatureMissing(
                    f"feature {col.name!r} has type {type_name}, which retro tests cannot score; "
                    f"supported: {', '.join(COLUMN_TYPES)}",
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
            raise Upstream(f"cannot read the model's MLmodel file at {artifact_uri}: {exc}") from exc

    def list_models(self, *, max_results: int = 100) -> list[dict[str, Any]]:
        """Registered models with their aliases and latest version."""
        try:
            models = self._client.search_registered_models(max_results=max_results)
        except Exception as exc:
            raise Upstream(f"the model registry is unreachable: {exc}") from exc
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
                raise NotFound(f"no model named {name!r} in the registry") from None
            raise Upstream(f"the model registry failed: {exc.message}") from exc
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
