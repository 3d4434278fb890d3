"""The `retrotest` command: serve, worker, beat, submit, status, demo, migrate, envs."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from app.i18n import _, current_language, default_language, supported, use_language
from app.job_progress import print_job, wait_for

app = typer.Typer(help="Retro tests of MLflow models over a partner's feature history.", no_args_is_help=True)


def migrate_database() -> None:
    """Bring the database schema to the latest migration."""
    from alembic import command
    from alembic.config import Config

    from app.config import get_settings

    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent
    command.upgrade(Config(str(root / "alembic.ini")), "head")


@app.command()
def migrate() -> None:
    """Apply database migrations."""
    migrate_database()
    typer.echo(_("database is at the latest migration"))


SHUTDOWN_GRACE_S = 5


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Server processes [default: RETRO_API_WORKERS, 2]", show_default=False)
    ] = None,
    skip_migrations: Annotated[bool, typer.Option(help="Do not run migrations first")] = False,
) -> None:
    """Run the REST API (migrations first, unless told not to)."""
    import uvicorn

    from app.config import get_settings
    from app.logging_setup import configure_logging, logging_config

    settings = get_settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    if not skip_migrations:
        migrate_database()
    # uvicorn applies log_config in each worker process it starts, so every process logs through our root
    # handler, as JSON; uvicorn's own loggers propagate to it.
    uvicorn.run(
        "app.main:app",
        host=host,
        port=port,
        workers=workers or settings.api_workers,
        log_level=settings.log_level.lower(),
        access_log=False,
        log_config=logging_config(level=settings.log_level, fmt=settings.log_format),
        # uvicorn would believe X-Forwarded-For from 127.0.0.1 (its forwarded_allow_ips default, or the
        # FORWARDED_ALLOW_IPS variable); the app decides by RETRO_TRUSTED_PROXIES alone (app/client_address.py).
        proxy_headers=False,
        # On SIGTERM, requests get this long to finish (they take milliseconds); the job pages' event streams
        # (app/retro_tests/live.py) last minutes and are cut then: their browsers reconnect to another process.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )


def _use_multiprocess_metrics(port: int) -> None:
    """Tasks run in forked children: prometheus_client must use multiprocess mode, chosen before it is imported."""
    if port == 0 or "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="retrotest-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not in a forked child that happens to run exit handlers
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(remove)


@app.command()
def worker(
    concurrency: int = 1,
    loglevel: Annotated[str | None, typer.Option()] = None,
    name: Annotated[str, typer.Option(help="node name, unique per host when several workers run there")] = "retrotest",
) -> None:
    """Run a Celery worker that executes retro tests; its metrics are on RETRO_WORKER_METRICS_PORT."""
    from app.config import get_settings

    settings = get_settings()
    _use_multiprocess_metrics(settings.worker_metrics_port)
    from app.metrics import start_worker_metrics
    from worker.celery_app import celery_app

    start_worker_metrics(settings.worker_metrics_port)
    celery_app.worker_main(
        [
            "worker",
            f"--loglevel={loglevel or settings.log_level}",
            f"--concurrency={concurrency}",
            f"--hostname={name}@%h",
            "-Q",
            settings.queue_name,
            "--without-gossip",
            "--without-mingle",
        ]
    )


@app.command()
def beat(loglevel: Annotated[str | None, typer.Option()] = None) -> None:
    """Run the control process: Celery beat plus a worker for its periodic tasks (deployment reaper, job reconciler)."""
    from app.config import get_settings
    from app.queue import control_queue
    from worker.celery_app import celery_app

    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    # Beat runs inside a small worker of its own that consumes only the control queue, so the reaper and
    # the reconciler never wait behind a long retro test in the job queue.
    celery_app.worker_main(
        [
            "worker",
            "--beat",
            f"--loglevel={loglevel or settings.log_level}",
            "--pool=solo",
            "-Q",
            control_queue(settings),
            "--without-gossip",
            "--without-mingle",
            "--hostname=control@%h",
        ]
    )


def exit_code(state: str) -> int:
    """0 for a job that succeeded or is still going, 1 for one that failed or was cancelled."""
    return 1 if state in ("failed", "cancelled") else 0


@dataclass(frozen=True)
class Api:
    """Where the REST API is and the personal token to send (the options before a command)."""

    url: str
    token: str

    @property
    def web_url(self) -> str:
        return self.url.rstrip("/")

    def client(self, *, timeout: float) -> httpx.Client:
        if not re.match(r"^https?://[^/\s]+", self.url):
            typer.echo(
                _(
                    "RETRO_API_URL (or --api) is {url}: it must be the API's address with its scheme, for example http://127.0.0.1:8000"
                ).format(url=repr(self.url)),
                err=True,
            )
            raise typer.Exit(2)
        headers = {"Accept-Language": current_language()}  # the API's messages in the CLI's language
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return httpx.Client(base_url=self.url, timeout=timeout, headers=headers)


@app.callback()
def api_options(
    ctx: typer.Context,
    api: Annotated[
        str,
        typer.Option(envvar="RETRO_API_URL", help="The REST API, for submit, status and download (the demo: :8765)"),
    ] = "http://127.0.0.1:8000",
    token: Annotated[str, typer.Option(envvar="RETRO_API_TOKEN", help="Personal API token")] = "",
) -> None:
    ctx.obj = Api(url=api, token=token)


def model_ref(text: str) -> dict[str, str]:
    """`name/3` (a version) or `name@champion` (an alias), as a request's `models` item."""
    from app.retro_tests.schemas import parse_model_ref  # here: the client commands start without the service's imports

    ref = parse_model_ref(text)
    if ref is None:
        raise typer.BadParameter(
            _("{text}: give the model as NAME/VERSION (churn/3) or NAME@ALIAS (churn@champion)").format(text=repr(text))
        )
    return ref


def day(text: str) -> str:
    """A day as YYYY-MM-DD (or YYYYMMDD), sent to the API as YYYY-MM-DD."""
    digits = text.replace("-", "") if re.fullmatch(r"\d{4}-\d{2}-\d{2}|\d{8}", text) else ""
    with contextlib.suppress(ValueError):
        return datetime.strptime(digits, "%Y%m%d").date().isoformat()
    raise typer.BadParameter(
        _("{text} is not a day; write it as YYYY-MM-DD, for example 2026-11-20").format(text=repr(text))
    )


def refusal(resp: httpx.Response) -> str:
    """The API's reason for a 4xx/5xx, as one line."""
    try:
        err = resp.json()
    except ValueError:
        return f"{resp.status_code} {resp.reason_phrase}"
    detail = err.get("detail", err) if isinstance(err, dict) else err
    return f"{detail} ({resp.status_code} {err.get('error', '') if isinstance(err, dict) else ''})".replace(" )", ")")


@app.command()
def submit(
    ctx: typer.Context,
    partner: Annotated[str, typer.Option(help="Partner code")],
    model: Annotated[
        list[str],
        typer.Option(
            help="The model version: NAME/VERSION (churn/3) or NAME@ALIAS (churn@champion); repeat it to compare "
            "several models on the same rows"
        ),
    ],
    start: Annotated[str, typer.Option(help="First day, YYYY-MM-DD", callback=day)],
    end: Annotated[str, typer.Option(help="Last day, YYYY-MM-DD", callback=day)],
    output_format: Annotated[
        list[str] | None,
        typer.Option(help="parquet or csv.gz; repeat for both [default: the server's RETRO_OUTPUT_FORMATS]"),
    ] = None,
    note: Annotated[str | None, typer.Option(help="A note kept with the job (why it was run)")] = None,
    population: Annotated[
        Path | None,
        typer.Option(
            help="The partner's own customers (CSV or Parquet: id column(s), as_of, optional 0/1 outcome), "
            "each scored as of its date",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ] = None,
    lookback_days: Annotated[
        int, typer.Option(help="With --population: the latest snapshot up to this many days before each as-of date")
    ] = 0,
    require_full_period: Annotated[
        bool, typer.Option(help="Refuse the request if any day of the period has no history")
    ] = False,
    allow_partial: Annotated[
        bool,
        typer.Option(help="With several --model: publish the others when one fails its deployment or check"),
    ] = False,
    wait: Annotated[bool, typer.Option(help="Follow the job to the end (exit 1 if it fails)")] = True,
) -> None:
    """Submit a retro test through the REST API and, by default, follow it to the end."""
    body: dict[str, Any] = {"partner_code": partner, "period_start": start, "period_end": end}
    refs = [model_ref(m) for m in model]
    if len(refs) == 1:  # a request of one model, as every version of the API takes it
        body |= {f"model_{key}": value for key, value in refs[0].items()}
    else:
        body["models"] = refs
    if allow_partial:
        body["allow_partial"] = True
    if require_full_period:
        body["require_full_period"] = True
    if output_format:
        body["output_formats"] = output_format
    if note:
        body["note"] = note
    if lookback_days:
        body["lookback_days"] = lookback_days
    with ctx.obj.client(timeout=300 if population else 60) as client:
        if population is None:
            resp = client.post("/api/v1/retro-tests", json=body)
        else:
            with population.open("rb") as fh:
                resp = client.post(
                    "/api/v1/retro-tests/with-population",
                    data={"request": json.dumps(body)},
                    files={"population": (population.name, fh)},
                )
        if resp.status_code == 401:
            _refused_exits(resp)
        if resp.status_code >= 400:
            typer.echo(_("refused: {resp}").format(resp=refusal(resp)), err=True)
            raise typer.Exit(2)
        job = resp.json()
        typer.echo(
            (
                _("retro test {id} queued: {web_url}/jobs/{id}")
                if resp.status_code == 202
                else _("retro test {id} already running: {web_url}/jobs/{id}")
            ).format(id=job["id"], web_url=ctx.obj.web_url)
        )
        for warning in job.get("warnings") or []:
            typer.echo(_("warning: {warning}").format(warning=warning), err=True)
        if wait:
            job = wait_for(client, resp.headers["location"])
            print_job(job, web_url=ctx.obj.web_url)
            raise typer.Exit(exit_code(job["state"]))


JobArgument = Annotated[
    str | None, typer.Argument(help="The retro test's id [default: your newest retro test]", show_default=False)
]


def newest_job_id(client: httpx.Client) -> str:
    """The id of the newest retro test the caller may see."""
    resp = client.get("/api/v1/retro-tests", params={"limit": 1})
    _refused_exits(resp)
    items = resp.json()["items"]
    if not items:
        typer.echo(_("no retro tests yet; submit one with `retrotest submit`"), err=True)
        raise typer.Exit(2)
    return str(items[0]["id"])


_FULL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_ID_START = re.compile(r"^[0-9a-f-]{8,36}$")


def job_id_of(client: httpx.Client, given: str | None) -> str:
    """The whole id of the retro test meant: the newest when none is given, else the one whose id starts with what
    was given (8 characters or more, as `retrotest list` and the web pages show them)."""
    if not given:
        return newest_job_id(client)
    text = given.strip().lower()
    if _FULL_ID.fullmatch(text):
        return text
    if not _ID_START.fullmatch(text):
        typer.echo(
            _(
                "{given} is not a retro test id: give the whole id or its first 8 or more characters, as `retrotest list` shows them"
            ).format(given=repr(given)),
            err=True,
        )
        raise typer.Exit(2)
    resp = client.get("/api/v1/retro-tests", params={"id_prefix": text, "limit": 2})
    _refused_exits(resp)
    items = resp.json()["items"]
    if not items:
        typer.echo(
            _("none of your retro tests has an id starting with {text}; `retrotest list` shows them").format(text=text),
            err=True,
        )
        raise typer.Exit(2)
    if len(items) > 1:
        typer.echo(
            _("{text} starts the ids of more than one retro test; give more characters").format(text=text), err=True
        )
        raise typer.Exit(2)
    return str(items[0]["id"])


def _refused_exits(resp: httpx.Response) -> None:
    """Exit 2 with the API's reason when it refused; a missing or bad token is explained in the CLI's terms."""
    if resp.status_code == 401:
        typer.echo(
            _(
                "the API wants a personal API token: set RETRO_API_TOKEN (or --token); make one on the web page "
                "'API tokens' or ask an administrator (`retrotest create-token --username YOU`)"
            ),
            err=True,
        )
        raise typer.Exit(2)
    if resp.status_code >= 400:
        typer.echo(refusal(resp), err=True)
        raise typer.Exit(2)


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    partner: Annotated[str | None, typer.Option(help="Only this partner's (its code)")] = None,
    state: Annotated[
        str | None, typer.Option(help="Only in this state: queued, scoring, succeeded, failed, ...")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="How many, newest first")] = 20,
) -> None:
    """Your newest retro tests, one line each: id, state, partner, model, period, when."""
    params: dict[str, Any] = {"limit": limit}
    if partner:
        params["partner"] = partner
    if state:
        params["state"] = state
    with ctx.obj.client(timeout=30) as client:
        resp = client.get("/api/v1/retro-tests", params=params)
        _refused_exits(resp)
        page = resp.json()
    if not page["items"]:
        typer.echo(
            _("no retro tests match")
            if partner or state
            else _("no retro tests yet; submit one with `retrotest submit`")
        )
        return
    rows = [
        (
            str(j["id"])[:8],
            j["state"],
            j["partner_code"],
            f"{j['model_name']}/{j['model_version']}" + (f" +{len(j['models']) - 1}" if j.get("models") else ""),
            f"{j['period_start']}..{j['period_end']}",
            str(j["created_at"])[:16].replace("T", " "),
        )
        for j in page["items"]
    ]
    head = ("ID", "STATE", "PARTNER", "MODEL", "PERIOD", "CREATED (UTC)")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if page["total"] > len(rows):
        typer.echo(_("({rows} of {total}; --limit shows more)").format(rows=len(rows), total=page["total"]))


@app.command()
def cancel(ctx: typer.Context, job_id: JobArgument = None) -> None:
    """Cancel a retro test: a queued one at once, a running one within seconds (its model server is stopped)."""
    with ctx.obj.client(timeout=30) as client:
        job_id = job_id_of(client, job_id)
        resp = client.post(f"/api/v1/retro-tests/{job_id}/cancel")
        _refused_exits(resp)
        job = resp.json()
    word = _("cancelled") if job["state"] == "cancelled" else _("asked to stop; it stops within seconds")
    typer.echo(
        _("retro test {job_id} {word}: {web_url}/jobs/{job_id}").format(
            job_id=job_id, word=word, web_url=ctx.obj.web_url
        )
    )


@app.command()
def link(
    ctx: typer.Context,
    job_id: JobArgument = None,
    days: Annotated[
        int | None, typer.Option(min=1, help="Days the link works [default: RETRO_DOWNLOAD_LINK_DEFAULT_DAYS]")
    ] = None,
) -> None:
    """Make a download link for the partner to a succeeded retro test and print it (it is shown only now)."""
    body = {"expires_in_days": days} if days else {}
    with ctx.obj.client(timeout=30) as client:
        job_id = job_id_of(client, job_id)
        resp = client.post(f"/api/v1/retro-tests/{job_id}/links", json=body)
        _refused_exits(resp)
        made = resp.json()
    typer.echo(
        _("download link for the partner, shown only now; it works until {expires_at}:").format(
            expires_at=made["expires_at"]
        ),
        err=True,
    )
    typer.echo(made["url"])


@app.command()
def status(ctx: typer.Context, job_id: JobArgument = None) -> None:
    """Show a retro test's state, progress and files; exit 1 if it failed or was cancelled."""
    with ctx.obj.client(timeout=30) as client:
        job_id = job_id_of(client, job_id)
        resp = client.get(f"/api/v1/retro-tests/{job_id}")
        _refused_exits(resp)
        job = resp.json()
    print_job(job, web_url=ctx.obj.web_url)
    raise typer.Exit(exit_code(job["state"]))


@app.command()
def download(
    ctx: typer.Context,
    job_id: JobArgument = None,
    to: Annotated[Path | None, typer.Option(help="Folder to write the files to [default: ./retrotest-JOB_ID]")] = None,
    force: Annotated[bool, typer.Option(help="Replace another retro test's files in that folder")] = False,
) -> None:
    """Download a succeeded job's result files, resuming partial ones, each checked against the manifest's sha256."""
    from app.result_download import DownloadFailed, download_results, job_in_folder

    with ctx.obj.client(timeout=60) as client:
        job_id = job_id_of(client, job_id)
        folder = to or Path(f"retrotest-{job_id}")
        other = job_in_folder(folder)
        if other is not None and other != job_id and not force:
            typer.echo(
                _(
                    "{folder} holds the files of another retro test ({other}); choose another folder or add --force to replace them"
                ).format(folder=folder, other=other),
                err=True,
            )
            raise typer.Exit(2)
        try:
            written = download_results(client=client, job_id=job_id, folder=folder, progress=sys.stderr)
        except DownloadFailed as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(exc.exit_code) from None
    typer.echo(
        _("{written} file(s) in {folder}, every sha256 matching the manifest").format(
            written=len(written), folder=folder
        )
    )


@app.command("create-admin")
def create_admin(
    username: Annotated[str, typer.Option(help="The admin's username")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input (one line)")
    ] = False,
) -> None:
    """Create an admin who signs in with a password; migrates the database first, so it works on a fresh install."""
    from pydantic import ValidationError

    from app.auth import service
    from app.auth.models import Role
    from app.auth.schemas import UserCreate
    from app.db import get_session_factory
    from app.errors import AppError

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        data = UserCreate(username=username, role=Role.admin, password=password)
    except ValidationError as exc:
        for err in exc.errors():
            typer.echo(_("{value}: {msg}").format(value=".".join(str(p) for p in err["loc"]), msg=err["msg"]), err=True)
        raise typer.Exit(2) from None
    migrate_database()
    with get_session_factory()() as session:
        try:
            user = service.create_user(session=session, data=data, actor="cli")
        except AppError as exc:
            typer.echo(exc.detail, err=True)
            raise typer.Exit(1) from None
        session.commit()
    typer.echo(
        _("created admin {username}; sign in at /login or make an API token with create-token").format(
            username=repr(user.username)
        )
    )


def require_database() -> None:
    """Exit with one line when the configured database is missing, unreachable or has no retrotest tables, rather
    than a traceback (and, for SQLite, an empty file left at a mistyped path)."""
    import sqlalchemy as sa

    from app.config import get_settings
    from app.db import get_engine

    url = sa.make_url(get_settings().resolved_database_url())
    where = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        typer.echo(
            _(
                "no database at {database}: point RETRO_DATABASE_URL at the service's database, or create this one with `retrotest migrate` (or `retrotest create-admin`)"
            ).format(database=url.database),
            err=True,
        )
        raise typer.Exit(1)
    try:
        with get_engine().connect() as conn:
            if not sa.inspect(conn).has_table("users"):
                typer.echo(
                    _("the database {where} has no retrotest tables: run `retrotest migrate` first").format(
                        where=where
                    ),
                    err=True,
                )
                raise typer.Exit(1)
    except sa.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
        typer.echo(_("cannot use the database {where}: {reason}").format(where=where, reason=reason), err=True)
        raise typer.Exit(1) from None


@app.command("create-token")
def create_token(
    username: Annotated[str, typer.Option(help="Whose token it is")],
    name: Annotated[str, typer.Option(help="What the token is for")] = "cli",
    days: Annotated[
        int | None,
        typer.Option(min=1, help="Days it lives [default: RETRO_API_TOKEN_DEFAULT_DAYS]", show_default=False),
    ] = None,
) -> None:
    """Create a personal API token for a user and print it once (only its sha256 is stored)."""
    from app.auth import service
    from app.db import get_session_factory

    require_database()
    with get_session_factory()() as session:
        user = service.find_user(session=session, username=username)
        if user is None or not user.is_active:
            typer.echo(_("no active user named {username}").format(username=repr(username)), err=True)
            raise typer.Exit(1)
        _token, secret = service.create_api_token(
            session=session, user=user, name=name[:100], actor="cli", expires_in_days=days
        )
        session.commit()
    typer.echo(
        _("API token for {username} ({name}); it is shown only now:").format(username=repr(username), name=name),
        err=True,
    )
    typer.echo(secret)


@app.command("link-sso")
def link_sso(
    username: Annotated[str, typer.Option(help="The existing user")],
    issuer: Annotated[str, typer.Option(help="The identity provider's issuer URL (its `iss`)")],
    subject: Annotated[str, typer.Option(help="The identity's stable `sub` at that issuer")],
) -> None:
    """Link a single sign-on identity to an existing user: SSO never takes an account by its name alone."""
    from app.auth import service
    from app.db import get_session_factory
    from app.errors import Conflict

    with get_session_factory()() as session:
        user = service.find_user(session=session, username=username)
        if user is None:
            typer.echo(_("no user named {username}").format(username=repr(username)), err=True)
            raise typer.Exit(1)
        try:
            service.link_oidc_identity(session=session, user=user, subject=f"{issuer} {subject}", actor="cli")
        except Conflict as exc:
            typer.echo(exc.detail, err=True)
            raise typer.Exit(1) from None
        session.commit()
    typer.echo(
        _("{username} now signs in as {subject} of {issuer}").format(
            username=repr(username), subject=repr(subject), issuer=issuer
        )
    )


@app.command()
def demo(
    directory: Annotated[
        Path,
        typer.Option(
            "--dir",
            help="Where the demo keeps its registry, data and results; a previous demo there is replaced, "
            "any other non-empty folder is refused",
        ),
    ] = Path("var/demo"),
    days: Annotated[int, typer.Option(min=1, help="Days of synthetic feature history to write and score")] = 100,
    rows_per_day: Annotated[int, typer.Option(min=1, help="Customers (rows) per day of history")] = 10_000,
    port: Annotated[int, typer.Option(help="Port of the demo's API and web UI")] = 8765,
    keep_running: Annotated[bool, typer.Option(help="Leave the API up after the job, to download results")] = False,
) -> None:
    """Run a real retro test on embedded defaults: registry, history, API and worker on this machine."""
    from app.demo import run_demo

    raise typer.Exit(
        run_demo(
            directory=directory,
            days=days,
            rows_per_day=rows_per_day,
            port=port,
            keep_running=keep_running,
            today=date.today(),
        )
    )


envs_app = typer.Typer(help="The model environments cached on this worker (RETRO_ENV_CACHE_DIR).", no_args_is_help=True)
app.add_typer(envs_app, name="envs")


def _environments() -> Any:
    from app.config import get_settings
    from app.integrations.wiring import make_environments

    settings = get_settings()
    cache = make_environments(settings.model_copy(update={"model_env": "model"}))
    assert cache is not None
    return cache


@envs_app.command("list")
def envs_list() -> None:
    """Every environment in the cache, least recently used first, with its size and whether it is in use."""
    cache = _environments()
    found = cache.cached()
    if not found:
        typer.echo(f"no model environments in {cache.root}")
        return
    typer.echo(f"{'environment':<22} {'python':<8} {'mlserver':<9} {'size':>9}  {'last used':<19}  in use")
    for env in found:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(env.last_used))
        in_use = "yes" if env.in_use else "no"
        typer.echo(
            f"{env.key:<22} {env.python:<8} {env.server_version:<9} {env.size_bytes / 2**30:>7.2f}GB  {used}  {in_use}"
        )
    total = sum(e.size_bytes for e in found) / 2**30
    typer.echo(
        f"{len(found)} environment(s), {total:.2f} GB of {cache.max_bytes / 2**30:.0f} GB (RETRO_ENV_CACHE_MAX_GB)"
    )


@envs_app.command("prune")
def envs_prune(
    max_gb: Annotated[
        float | None,
        typer.Option(min=0, help="Shrink to this size [default: RETRO_ENV_CACHE_MAX_GB]", show_default=False),
    ] = None,
    all_unused: Annotated[bool, typer.Option("--all", help="Remove every environment not in use")] = False,
) -> None:
    """Remove least recently used environments until the cache fits; never one a job or model server uses."""
    cache = _environments()
    limit = 0 if all_unused else (None if max_gb is None else int(max_gb * 2**30))
    removed = cache.evict(max_bytes=limit)
    left = cache.cached()
    typer.echo(
        f"removed {len(removed)} environment(s){': ' + ', '.join(removed) if removed else ''}; "
        f"{len(left)} left ({sum(e.size_bytes for e in left) / 2**30:.2f} GB, {sum(e.in_use for e in left)} in use)"
    )


servers_app = typer.Typer(
    help="Warm model servers: deployments kept after their job for the next job of the same model (RETRO_WARM_TTL_S).",
    no_args_is_help=True,
)
app.add_typer(servers_app, name="servers")


@servers_app.command("list")
def servers_list() -> None:
    """Every warm deployment in the pool, most recently used first: its model, the jobs on it now, when it expires."""
    from app.db import get_session_factory
    from app.retro_tests import warm_pool

    require_database()
    with get_session_factory()() as s:
        found = warm_pool.entries(s)
    if not found:
        typer.echo("no warm model servers")
        return
    typer.echo(f"{'deployment':<31} {'deployer':<10} {'state':<9} {'model':<28} {'jobs':>4} {'served':>6}  expires")
    for e in found:
        expires = e.expires_at.strftime("%Y-%m-%d %H:%M:%S UTC") if e.expires_at else "in use"
        typer.echo(
            f"{e.name:<31} {e.deployer:<10} {e.state:<9} {e.model:<28} {e.jobs:>4} {e.jobs_served:>6}  {expires}"
        )
    typer.echo(f"{len(found)} warm model server(s), {sum(e.jobs for e in found)} job(s) on them now")


@servers_app.command("drain")
def servers_drain() -> None:
    """Empty the pool: no job attaches any more; idle servers stop now, busy ones when their last job ends."""
    from app.config import get_settings
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer
    from app.retro_tests import warm_pool
    from worker.warm import WarmPool

    require_database()
    settings = get_settings()
    pool = WarmPool(sessions=get_session_factory(), deployer=make_deployer(settings), settings=settings)
    stopped = pool.drain()
    typer.echo(
        f"stopped {len(stopped)} idle warm model server(s){': ' + ', '.join(name for name, _reason in stopped) if stopped else ''}"
    )
    with get_session_factory()() as s:
        busy = [e.name for e in warm_pool.entries(s)]
    if busy:
        typer.echo(f"{len(busy)} still in use, stopping when their jobs end: {', '.join(busy)}")


k8s_app = typer.Typer(help="Kubernetes deployments (RETRO_DEPLOYER seldon, seldon_v2 or kserve).", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("check")
def k8s_check() -> None:
    """Check what the configured Kubernetes deployer needs before its first job; exit 1 when anything is missing."""
    from app.config import get_settings
    from app.integrations.deployers.kubernetes_check import run_checks

    settings = get_settings()
    results = run_checks(settings=settings)
    for result in results:
        typer.echo(f"{'ok  ' if result.ok else 'FAIL'}  {result.name:<20} {result.detail}")
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def cli_language() -> str:
    """RETRO_LANG, else the locale (LC_ALL, LC_MESSAGES, LANG: ru_RU.UTF-8 -> ru), else RETRO_DEFAULT_LANGUAGE."""
    for name in ("RETRO_LANG", "LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(name)
        if value:  # the first one set decides, as for gettext; C or POSIX is no language of ours
            return supported(value) or default_language()
    return default_language()


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with use_language(cli_language()):
        try:
            app()
        except httpx.TransportError as exc:  # submit, status, download: where the API was looked for, not a traceback
            typer.echo(unreachable(exc), err=True)
            raise SystemExit(2) from None


def unreachable(exc: httpx.TransportError) -> str:
    """One line: where the API was looked for, why it did not answer, and how to point at it."""
    try:
        url = exc.request.url
        where = f"{url.scheme}://{url.netloc.decode()}"
    except RuntimeError:  # an error raised before any request was built
        where = _("the configured URL")
    return _(
        "cannot reach the retrotest API at {where} ({reason}): start it (`retrotest serve`, or "
        "`./scripts/demo.sh --keep-running` on :8765) or point RETRO_API_URL (or --api) at it"
    ).format(where=where, reason=exc or type(exc).__name__)


if __name__ == "__main__":
    main()
