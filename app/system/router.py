from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy import text

from app.auth.deps import optional_caller
from app.auth.models import User
from app.config import Settings, get_settings
from app.db import get_engine
from app.integrations.wiring import get_registry
from app.queue import check_broker

router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    """Prometheus metrics: job counts from the database, and this process's own counters."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


def _check_db() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_registry() -> None:
    get_registry().ping()


@router.get("/ready", responses={503: {"description": "A dependency is not reachable"}})
def ready(
    settings: Annotated[Settings, Depends(get_settings)], caller: Annotated[User | None, Depends(optional_caller)]
) -> JSONResponse:
    """Readiness: the database, the broker and the model registry all answer within a few seconds.

    What went wrong (exception text) is shown to admins only; anyone else sees which check failed.
    """
    checks: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {
            "database": pool.submit(_check_db),
            "broker": pool.submit(check_broker),
            "registry": pool.submit(_check_registry),
        }
        for name, fut in futures.items():
            try:
                fut.result(timeout=settings.registry_timeout_s)
                checks[name] = "ok"
            except FutureTimeout:
                checks[name] = "timeout"
            except Exception as exc:
                checks[name] = f"error: {type(exc).__name__}: {exc}"[:300]
    ok = all(v == "ok" for v in checks.values())
    if caller is None or not caller.is_admin:
        checks = {name: "error" if v.startswith("error") else v for name, v in checks.items()}
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)
