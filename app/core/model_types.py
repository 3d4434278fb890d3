"""A registered model version as every layer sees it: its inputs, outputs and where its feature history lives.

The MLflow adapter (app/integrations/registry/mlflow.py) builds these; the job keeps them (to_record/from_record).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from app.core.identifiers import check_name, check_table
from app.core.records import ModelRecord
from app.errors import Invalid, SourceUnknown
from app.i18n import _

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
                _(
                    "model {name} version {version} does not say where its feature history lives: set the model version tag(s) {value} in the registry, or give source.table, source.date_column and source.id_columns in the request"
                ).format(name=repr(self.name), version=self.version, value=", ".join(missing)),
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


def column_prefix(model: ModelVersionInfo) -> str:
    """Where a compared model's outputs start in the results: `churn_v7_` for model churn version 7."""
    return f"{re.sub(r'[^0-9A-Za-z_]', '_', model.name)}_v{model.version}_"


def compared_inputs(models: list[ModelVersionInfo]) -> tuple[Feature, ...]:
    """The inputs every compared model reads, each once, in the models' order; the history is read once for all.

    Refused when two models read the same column as different types (each would need it cast its own way)."""
    seen: dict[str, Feature] = {}
    for model in models:
        for feature in model.inputs:
            other = seen.setdefault(feature.name, feature)
            if other.type != feature.type:
                raise Invalid(
                    _(
                        "the models disagree on input {column}: {first} reads it as {first_type}, {second} as {second_type}; compare models that read their inputs alike"
                    ).format(
                        column=repr(feature.name),
                        first=_model_label(next(m for m in models if other in m.inputs)),
                        first_type=other.type,
                        second=_model_label(model),
                        second_type=feature.type,
                    ),
                    field="models",
                )
    return tuple(seen.values())


def _model_label(model: ModelVersionInfo) -> str:
    return f"{model.name} v{model.version}"


def _split(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]
