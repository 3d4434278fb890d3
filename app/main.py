"""The FastAPI application: routers and the one mapping of errors to responses."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError, DisconnectionError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from app.auth.router import router as auth_router
from app.client_address import TrustedProxies
from app.config import get_settings
from app.db import describe_database_error, get_session_factory, is_transient
from app.downloads.router import api_router as links_router
from app.errors import AppError, DatabaseUnavailable, Unauthorized
from app.i18n import RequestLanguage, _
from app.load_shedding import InFlightLimit
from app.partners.router import router as partners_router
from app.registry.router import router as registry_router
from app.request_guard import RequestGuard
from app.retro_tests.router import router as retro_tests_router
from app.retro_tests.views import without_server_paths
from app.system.job_metrics import register_jobs_collector
from app.system.router import router as system_router
from app.validation import error_message
from app.web import account as web_account
from app.web import admin as web_admin
from app.web import docs as web_docs
from app.web import jobs as web_jobs
from app.web.errors import error_page
from app.web.partner import router as partner_links_router
from app.web.templating import STATIC_DIR

log = logging.getLogger(__name__)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    messages, first_field = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(loc)
        first_field = first_field or (loc[0] if loc else None)
        msg = error_message(err)
        messages.append(f"{where}: {msg}" if where else msg)
    return "; ".join(messages), first_field


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    """Startup: size the threadpool, and take what is loaded by now out of garbage collection."""
    # Sync endpoints and dependencies run on these threads. Under the GIL more threads add no throughput, only
    # requests that all progress at once and finish late; with no more threads than pooled connections, no
    # thread ever waits for a connection either.
    anyio.to_thread.current_default_thread_limiter().total_tokens = get_settings().api_threads
    # The modules and the app (~150k objects) live as long as the process, yet every full collection would walk
    # them again: ~100 ms with every thread stopped, several times a minute under load.
    gc.collect()
    gc.freeze()
    yield


RETRY_AFTER_S = 5  # what a client told the database is down should wait before trying again


def create_app() -> FastAPI:
    settings = get_settings()
    settings.check_secrets()
    app = FastAPI(
        lifespan=lifespan,
        docs_url=None,  # app/web/docs.py serves Swagger UI from the package, not from a CDN
        redoc_url=None,
        title="retrotest",
        version="0.1.0",
        description=(
            "Score a partner's feature history with an exact MLflow model version over a period. "
            "Submit a retro test, follow its progress, download its result files. "
            'Errors are JSON: `{"error": code, "detail": message, "field": optional}`.'
        ),
    )

    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError) -> Response:
        # An error names no place on the server to whoever reads it (issue 26, N13); the log keeps the original.
        detail = without_server_paths(exc.detail) or exc.detail
        if detail != exc.detail:
            log.info("%s (answered without its server paths)", exc.detail)
        if (page := error_page(request, status_code=exc.status_code, detail=detail)) is not None:
            return page
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse({**exc.to_dict(), "detail": detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        detail, field = _describe_validation(exc)
        if (page := error_page(request, status_code=422, detail=detail)) is not None:
            return page
        body = {"error": "invalid_request", "detail": detail}
        if field:
            body["field"] = field
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if (page := error_page(request, status_code=exc.status_code, detail=str(exc.detail))) is not None:
            return page
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(DisconnectionError)
    async def database_error(request: Request, exc: Exception) -> Response:
        if not is_transient(exc):
            return await unexpected(request, exc)
        log.warning("the database is unreachable: %s", describe_database_error(exc))
        down = DatabaseUnavailable(
            _("the job database is unreachable; nothing was changed, try again in a few seconds")
        )
        if (page := error_page(request, status_code=down.status_code, detail=down.detail)) is not None:
            page.headers["Retry-After"] = str(RETRY_AFTER_S)
            return page
        return JSONResponse(down.to_dict(), status_code=down.status_code, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            {"error": "internal_error", "detail": "an unexpected error occurred; it has been logged"}, status_code=500
        )

    register_jobs_collector(get_session_factory)
    app.include_router(system_router)
    app.include_router(partners_router)
    app.include_router(retro_tests_router)
    app.include_router(registry_router)
    app.include_router(auth_router)
    app.include_router(links_router)
    app.include_router(partner_links_router)
    app.include_router(web_docs.router)
    for web_pages in (web_account.router, web_jobs.router, web_admin.router):  # the server-rendered UI
        app.include_router(web_pages, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Signed (not encrypted) cookie holding the user id and CSRF token; HttpOnly and SameSite=Lax.
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.secret_key.get_secret_value(),
        session_cookie="retrotest_session",
        max_age=settings.session_max_age_s,
        same_site="lax",
        https_only=settings.resolved_session_cookie_secure(),
    )
    app.add_middleware(RequestGuard, settings=settings)  # before anything reads the request
    app.add_middleware(  # before any work: shed, don't queue
        InFlightLimit, limit=settings.api_max_in_flight, floor=settings.api_threads, target_s=settings.api_shed_after_s
    )
    app.add_middleware(TrustedProxies, trusted=settings.trusted_proxies)  # every reader sees the client
    app.add_middleware(RequestLanguage)  # outermost: every message, even a shed request's, in the caller's language
    return app


app = create_app()
