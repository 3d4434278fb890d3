from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from app.auth.deps import current_user
from app.integrations.registry.mlflow import MlflowRegistry
from app.integrations.wiring import get_registry
from app.validation import NO_CONTROL_PATTERN

router = APIRouter(prefix="/api/v1/models", tags=["registry models"], dependencies=[Depends(current_user)])


@router.get("")
def list_models(registry: Annotated[MlflowRegistry, Depends(get_registry)]) -> list[dict[str, Any]]:
    """Registered models with their aliases and latest version."""
    return registry.list_models()


@router.get("/{name}/versions")
def list_versions(
    name: Annotated[str, Path(max_length=256, pattern=NO_CONTROL_PATTERN)],
    registry: Annotated[MlflowRegistry, Depends(get_registry)],
) -> list[dict[str, Any]]:
    """Every version of a model, newest first, with its aliases and source tags."""
    return registry.list_versions(name=name)
