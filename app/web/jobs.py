"""Web pages for retro tests: the list, the new-request form, and the job page with its links and downloads."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile as StarletteUpload

from app.config import Settings
from app.core.jobs import TERMINAL_STATES, State, get_retro_test
from app.core.periods import days_text
from app.db import get_session, release_connection
from app.downloads import service as links
from app.errors import AppError, Conflict, Invalid
from app.i18n import N_, _, translate_values
from app.integrations.registry.mlflow import MlflowRegistry
from app.integrations.storage.results import ResultStore
from app.integrations.wiring import get_history_source, get_registry, get_result_store
from app.partners import service as partners
from app.request_guard import allow_upload
from app.retro_tests import dispatch
from app.retro_tests import service as retro_tests
from app.retro_tests.population import PopulationUpload, read_upload
from app.retro_tests.schemas import JobFilters, RetroTestCreate, parse_model_ref
from app.retro_tests.service import RetroTestRequest
from app.retro_tests.views import files_url, job_out
from app.validation import QueryInt
from app.web.deps import NO_FEEDBACK, Feedback, Page, WebPage, WebScope, WebUser, csrf_guard, form_errors, render

router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf_guard)])

PAGE_SIZE = 25
FORMATS = [("", N_("Parquet and CSV (gzip)")), ("parquet", N_("Parquet only")), ("csv.gz", N_("CSV (gzip) only"))]
LABELS = {
    "partner_code": N_("Partner"),
    "model_name": N_("Model"),
    "model_ref": N_("Version or alias"),
    "period_start": N_("First day"),
    "period_end": N_("Last day"),
    "output_format": N_("Output format"),
    "population": N_("Population file"),
    "lookback_days": N_("Lookback days"),
    "require_full_period": N_("Full period only"),
    "compare_with": N_("Compare with"),
    "note": N_("Note"),
}
# Where the API's field names land on this form; a model-level refusal ("give exactly one ...") lands on model_ref.
FIELD_OF = {
    "model_version": "model_ref",
    "model_alias": "model_ref",
    "output_formats": "output_format",
    "__root__": "model_ref",
    "as_of_column": "population",
    "outcome_column": "population",
    "models": "compare_with",
    "allow_partial": "compare_with",
}
EXPIRY_CHOICES = (1, 3, 7, 14, 30, 90, 365)


@router.get("/")
def home(_: WebUser) -> RedirectResponse:
    return RedirectResponse("/jobs", status_code=303)


@router.get("/jobs", response_class=HTMLResponse)
def job_list(
    web: WebPage,
    partner: Annotated[str, Query(max_length=64)] = "",
    model: Annotated[str, Query(max_length=256)] = "",
    state: Annotated[str, Query(max_length=16)] = "",
    page: Annotated[QueryInt, Query(ge=1, le=1_000_000)] = 1,
) -> HTMLResponse:
    """Retro tests of the user's partners, newest first, with filters and pages."""
    chosen_state = State(state) if state in State.__members__ else None
    jobs, total = retro_tests.list_retro_tests(
        session=web.session,
        scope=web.scope,
        filters=JobFilters(
            partner=partner or None,
            state=chosen_state,
            model=model or None,
            limit=PAGE_SIZE,
            offset=(page - 1) * PAGE_SIZE,
        ),
    )
    filters = {"partner": partner, "model": model, "state": chosen_state.value if chosen_state else ""}
    pages = max(1, -(-total // PAGE_SIZE))

    def page_url(n: int) -> str:
        return "/jobs?" + urlencode({**{k: v for k, v in filters.items() if v}, "page": n})

    return render(
        web.request,
        "jobs/list.html",
        {
            "active": "jobs",
            "jobs": [job_out(j, files_url(web.request), staff=web.scope.everything) for j in jobs],
            "total": total,
            "first": (page - 1) * PAGE_SIZE + 1,
            "last": (page - 1) * PAGE_SIZE + len(jobs),
            "page": page,
            "pages": pages,
            "prev_url": page_url(page - 1) if page > 1 else None,
            "next_url": page_url(page + 1) if page < pages else None,
            "filters": filters,
            "partners": partners.list_partners(session=web.session, scope=web.scope),
            "states": [s.value for s in State],
        },
        user=web.user,
    )


def model_ref_groups(registry: MlflowRegistry, model_name: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """The choices of version or alias for one model: aliases first (with the version each points at)."""
    if not model_name:
        return []
    try:
        versions = registry.list_versions(name=model_name)
    except AppError:
        return []
    aliases = sorted((alias, v["version"]) for v in versions for alias in v["aliases"])
    groups = []
    if aliases:
        now = _("{alias} (now version {version})")
        groups.append((_("Aliases"), [(f"alias:{a}", now.format(alias=a, version=v)) for a, v in aliases]))
    if versions:
        label = _("version {version}")
        groups.append(
            (_("Versions"), [(f"version:{v['version']}", label.format(version=v["version"])) for v in versions])
        )
    return groups


def history_hint(registry: MlflowRegistry, model_name: str) -> str:
    """Which days the newest version's history table covers, where the source tells it cheaply; else ""."""
    if not model_name:
        return ""
    try:
        versions = registry.list_versions(name=model_name)
        if not versions:
            return ""
        newest = max(versions, key=lambda v: int(v["version"]))
        spec = registry.resolve(name=model_name, version=str(newest["version"])).source_spec()
        days = get_history_source().history_days(table=spec.table, date_column=spec.date_column)
    except (AppError, ValueError):
        return ""
    if not days:
        return ""
    return _("{table} has history from {first} to {last}.").format(table=spec.table, first=days[0], last=days[-1])


@router.get("/jobs/model-options")
def model_options(
    _: WebUser,
    registry: Annotated[MlflowRegistry, Depends(get_registry)],
    model: Annotated[str, Query(max_length=256)] = "",
) -> dict[str, Any]:
    """JSON for the form: the versions and aliases of one registry model."""
    groups = model_ref_groups(registry, model)
    return {
        "groups": [
            {"label": label, "options": [{"value": v, "label": text} for v, text in options]}
            for label, options in groups
        ],
        "history": history_hint(registry, model),
    }


def _form_page(
    web: Page, *, registry: MlflowRegistry, form: dict[str, str], feedback: Feedback = NO_FEEDBACK
) -> HTMLResponse:
    errors = feedback.errors
    try:
        models = registry.list_models()
    except AppError as exc:
        models = []
        errors = {**errors, "form": errors.get("form", exc.detail)}
    return render(
        web.request,
        "jobs/new.html",
        {
            "active": "new",
            "form": form,
            "errors": errors,
            "labels": translate_values(LABELS),
            "partners": partners.list_partners(session=web.session, scope=web.scope),
            "models": models,
            "model_names": {m["name"] for m in models},
            "model_refs": model_ref_groups(registry, form.get("model_name", "")),
            "history_hint": history_hint(registry, form.get("model_name", "")),
            "formats": [(value, _(label)) for value, label in FORMATS],
            "today": date.today().isoformat(),
        },
        user=web.user,
        status_code=feedback.status_code,
    )


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job_form(web: WebPage, registry: Annotated[MlflowRegistry, Depends(get_registry)]) -> HTMLResponse:
    """The form an account manager fills in when a partner asks for a retro test."""
    return _form_page(web, registry=registry, form=dict.fromkeys(LABELS, ""))


def request_body(form: dict[str, str]) -> dict[str, Any]:
    """The API request the form stands for; empty fields are left out so they are reported as required."""
    body: dict[str, Any] = {k: form[k] for k in ("partner_code", "model_name", "period_start", "period_end") if form[k]}
    kind, _, value = form["model_ref"].partition(":")
    if kind == "version":
        body["model_version"] = value
    elif kind == "alias":
        body["model_alias"] = value
    if form["output_format"]:
        body["output_formats"] = [form["output_format"]]
    if form["note"].strip():
        body["note"] = form["note"]
    if lookback := form.get("lookback_days", "").strip():
        body["lookback_days"] = int(lookback) if re.fullmatch(r"[0-9]{1,6}", lookback) else lookback
    if form.get("require_full_period"):
        body["require_full_period"] = True
    others = [line.strip() for line in form.get("compare_with", "").splitlines() if line.strip()]
    if others and "model_name" in body:  # without a first model the form says that first (submit_job)
        first = {
            k.removeprefix("model_"): body.pop(k) for k in ("model_name", "model_version", "model_alias") if k in body
        }
        body["models"] = [first, *(_model_line(line, n) for n, line in enumerate(others, start=2))]
        if form.get("allow_partial"):
            body["allow_partial"] = True
    return body


def _model_line(line: str, n: int) -> dict[str, str]:
    """One line of "Compare with": NAME/VERSION or NAME@ALIAS, as the CLI's --model takes it."""
    ref = parse_model_ref(line)
    if ref is None:
        raise Invalid(
            _("model {n} ({line}): write it as NAME/VERSION (churn/3) or NAME@ALIAS (churn@champion)").format(
                n=n, line=repr(line)
            ),
            field="models",
        )
    return ref


def _error_field(field: str | None) -> str:
    name = FIELD_OF.get(field or "", field or "form")
    return name if name in LABELS else "form"


class JobForm(BaseModel):
    """The new-job form as the browser sends it: text fields, validated by the API's schema once read."""

    partner_code: str = Field(default="", max_length=200)
    model_name: str = Field(default="", max_length=400)
    model_ref: str = Field(default="", max_length=400)
    period_start: str = Field(default="", max_length=40)
    period_end: str = Field(default="", max_length=40)
    output_format: str = Field(default="", max_length=40)
    lookback_days: str = Field(default="", max_length=10)
    require_full_period: str = Field(default="", max_length=10)  # a checkbox: "1" when ticked, absent when not
    compare_with: str = Field(default="", max_length=4000)  # other models, one per line: NAME/VERSION or NAME@ALIAS
    allow_partial: str = Field(default="", max_length=10)  # a checkbox
    note: str = Field(default="", max_length=4000)


@dataclass(frozen=True)
class SubmittedForm:
    """The new-job form as sent: its text fields and the population file, if one was chosen."""

    fields: dict[str, str]
    population: StarletteUpload | None


async def job_form(request: Request, _: WebUser) -> AsyncIterator[SubmittedForm]:
    """The form's body, read only once the user is signed in and the CSRF token in the action URL checked
    (csrf_guard): FastAPI reads declared Form fields before any dependency, so the route declares none."""
    allow_upload(request.scope)
    form = await request.form(max_files=1, max_fields=len(JobForm.model_fields) + 8)
    try:
        texts = {k: v for k, v in form.items() if isinstance(v, str) and k in JobForm.model_fields}
        try:
            fields = JobForm.model_validate(texts).model_dump()
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        value = form.get("population")
        population = value if isinstance(value, StarletteUpload) and value.filename else None
        yield SubmittedForm(fields=fields, population=population)
    finally:
        await form.close()


@router.post("/jobs/new", response_class=HTMLResponse)
def submit_job(
    web: WebPage,
    submitted: Annotated[SubmittedForm, Depends(job_form)],
    registry: Annotated[MlflowRegistry, Depends(get_registry)],
    store: Annotated[ResultStore, Depends(get_result_store)],
) -> Response:
    """Validate the form with the API's own schema and service function; errors go next to their fields."""
    form, population = submitted.fields, submitted.population
    try:
        data = RetroTestCreate.model_validate(request_body(form))
        upload = None
        if population is not None:
            upload = PopulationUpload(
                data=read_upload(population.file, limit=web.settings.population_max_bytes),
                filename=population.filename or "",
            )
        job, created = dispatch.submit(
            session=web.session,
            registry=registry,
            settings=web.settings,
            request=RetroTestRequest(data=data, actor=web.user.username, scope=web.scope, upload=upload),
            history=get_history_source(),
            store=store,
        )
    except (ValidationError, AppError) as exc:
        web.session.rollback()
        errors, status = form_errors(exc, _error_field)
        if not form["model_name"]:  # the API's "give model_name ... or models", said where the form asks for it
            errors.pop("model_ref", None)
            errors["model_name"] = _("Choose a model")
        return _form_page(web, registry=registry, form=form, feedback=Feedback(errors=errors, status_code=status))
    suffix = "" if created else "?existing=1"
    return RedirectResponse(f"/jobs/{job.id}{suffix}", status_code=303)


def _expiry_choices(settings: Settings) -> list[int]:
    wanted = {d for d in EXPIRY_CHOICES if d <= settings.download_link_max_days}
    wanted.add(min(settings.download_link_default_days, settings.download_link_max_days))
    return sorted(wanted)


# What each stage is called on the pages (the API keeps the state names).
STAGE_LABELS = {
    "queued": N_("Waiting in the queue"),
    "resolving": N_("Finding the model version"),
    "extracting": N_("Reading the customers' history"),
    "preparing_environment": N_("Preparing the model's own environment"),
    "deploying": N_("Starting the model server"),
    "validating": N_("Checking the server against reference scores"),
    "scoring": N_("Scoring the rows"),
    "publishing": N_("Writing the results and the report"),
    "succeeded": N_("Finished"),
    "failed": N_("Failed"),
    "cancelled": N_("Cancelled"),
}

# report.json is a few KiB; a file past this is not read into a page.
_REPORT_JSON_MAX_BYTES = 4 << 20


def result_summary(store: ResultStore, *, partner_id: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any] | None:
    """The figures a results page leads with, from the job's report.json: rows, and AUC/Gini when outcomes were
    given. None when the report cannot be read (the page then shows the job's own counts)."""
    rel = f"{partner_id}/{job_id}/report.json"
    try:
        if store.size(rel) > _REPORT_JSON_MAX_BYTES:
            return None
        with store.open_read(rel) as fh:
            report = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    quality = report.get("quality") if isinstance(report, dict) else None
    overall = quality.get("overall") if isinstance(quality, dict) else None
    return {
        "rows": report.get("rows") or {},
        "outcome_column": report.get("outcome_column"),
        "quality": overall if isinstance(overall, dict) else None,
    }


def _job_page(web: Page, *, job_id: uuid.UUID, status_code: int = 200, **extra: Any) -> HTMLResponse:
    session, settings = web.session, web.settings
    read = retro_tests.read_retro_test(session=session, job_id=job_id, scope=web.scope)
    job = job_out(read, files_url(web.request), staff=web.scope.everything)
    context = {
        "active": "jobs",
        "job": job,
        "report": next((f for f in job.files if f.kind == "report" and f.format == "html"), None),
        "stage_labels": translate_values(STAGE_LABELS),
        "terminal": job.state in TERMINAL_STATES,
        "links": [links.link_out(link) for link in links.list_links(session=session, job_id=job.id)],
        "downloads": links.download_history(session=session, job_id=job.id),
        "expiry_choices": _expiry_choices(settings),
        "default_days": min(settings.download_link_default_days, settings.download_link_max_days),
        "summary": None,
        "missing_days": days_text(job.days_without_history or []),
        **extra,
    }
    release_connection(session)  # before the result store is read (a network call on s3://)
    if job.state == State.succeeded and any(f.name == "report.json" for f in job.files):
        context["summary"] = result_summary(get_result_store(), partner_id=job.partner_id, job_id=job.id)
    return render(web.request, "jobs/detail.html", context, user=web.user, status_code=status_code)


# The session key holding a link just made, shown once on the job page the POST redirects to.
NEW_LINK_KEY = "new_link"


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: uuid.UUID, web: WebPage, existing: Annotated[str, Query(max_length=8)] = "") -> HTMLResponse:
    """One retro test: stages, live progress, error, result files, partner links and downloads."""
    notice = _("An identical request is already running; this is that retro test.") if existing else None
    return _job_page(web, job_id=job_id, notice=notice, **_new_link(web, job_id=job_id))


def _new_link(web: Page, *, job_id: uuid.UUID) -> dict[str, Any]:
    """The link created just before this page was asked for, taken out of the session: it is shown once."""
    made = web.request.session.get(NEW_LINK_KEY)
    if not isinstance(made, dict) or made.get("job") != str(job_id):
        return {}
    del web.request.session[NEW_LINK_KEY]
    return {"new_link_url": made["url"], "new_link_expires": datetime.fromisoformat(made["expires"])}


@router.post("/jobs/{job_id}/cancel", response_class=HTMLResponse)
def cancel_job(job_id: uuid.UUID, web: WebPage) -> Response:
    try:
        retro_tests.request_cancel(session=web.session, job_id=job_id, actor=web.user.username, scope=web.scope)
    except Conflict as exc:
        web.session.rollback()
        return _job_page(web, job_id=job_id, status_code=409, action_error=exc.detail)
    web.session.commit()
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.get("/jobs/{job_id}/links")
def links_section(job_id: uuid.UUID) -> RedirectResponse:
    """The links live on the job page (an address bar left at the form's target lands there, not on a 405)."""
    return RedirectResponse(f"/jobs/{job_id}#links-heading", status_code=303)


@router.post("/jobs/{job_id}/links", response_class=HTMLResponse)
def create_link(job_id: uuid.UUID, web: WebPage, expires_in_days: Annotated[int, Form(ge=1, le=3650)] = 7) -> Response:
    """Make a partner link, then show it once on the job page (post, redirect, get: a reload makes no second link)."""
    settings = web.settings
    job = get_retro_test(session=web.session, job_id=job_id, scope=web.scope)
    try:
        link, token = links.create_link(
            session=web.session,
            job=job,
            expires_in_days=expires_in_days,
            max_days=settings.download_link_max_days,
            actor=web.user.username,
        )
    except AppError as exc:
        web.session.rollback()
        return _job_page(web, job_id=job_id, status_code=exc.status_code, action_error=exc.detail)
    web.session.commit()
    web.request.session[NEW_LINK_KEY] = {
        "job": str(job_id),
        "url": links.link_url(settings.public_base_url, token),
        "expires": link.expires_at.isoformat(),
    }
    return RedirectResponse(f"/jobs/{job_id}#new-link", status_code=303)


@router.post("/jobs/{job_id}/links/{link_id}/revoke")
def revoke_link(
    job_id: uuid.UUID,
    link_id: uuid.UUID,
    user: WebUser,
    scope: WebScope,
    session: Annotated[Session, Depends(get_session)],
) -> RedirectResponse:
    job = get_retro_test(session=session, job_id=job_id, scope=scope)
    links.revoke_link(session=session, job_id=job.id, link_id=link_id, actor=user.username)
    session.commit()
    return RedirectResponse(f"/jobs/{job_id}#links-heading", status_code=303)
