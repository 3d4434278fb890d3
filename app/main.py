"""The FastAPI application: routers and the one mapping of errors to responses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.config import get_settings
from app.errors import AppError
from app.partners.router import router as partners_router
from app.registry.router import router as registry_router
from app.retro_tests.router import router as retro_tests_router
from app.system.router import router as system_router

log = logging.getLogger(__name__)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    messages, first_field = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(loc)
        first_field = first_field or (loc[0] if loc else None)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        messages.append(f"{where}: {msg}" if where else msg)
    return "; ".join(messages), first_field


def create_app() -> FastAPI:
    settings = get_settings()
    settings.check_secrets()
    app = FastAPI(
        title="retrotest",
        version="0.1.0",
        description=(
            "Score a partner's feature history with an exact MLflow model version over a period. "
            "Submit a retro test, follow its progress, download its result files. "
            'Errors are JSON: `{"error": code, "detail": message, "field": optional}`.'
        ),
    )

    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail, field = _describe_validation(exc)
        body = {"error": "invalid_request", "detail": detail}
        if field:
            body["field"] = field
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            {"error": "internal_error", "detail": "an unexpected error occurred; it has been logged"}, status_code=500
        )

    app.include_router(system_router)
    app.include_router(partners_router)
    app.include_router(retro_tests_router)
    app.include_router(registry_router)
    return app


app = create_app()
