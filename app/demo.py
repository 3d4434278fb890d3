"""`retrotest demo`: a real retro test on embedded defaults, from an empty folder to result files."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date, timedelta
from pathlib import Path

import httpx
import typer

from app.demo_data import DEMO_MODEL, register_demo_model, write_history
from app.job_progress import print_job, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEMO_USER = "demo"
DEMO_PARTNER = "demo-partner"
MARKER = ".retrotest-demo"  # written into the demo's folder: only a folder holding it is ever removed


class NotADemoFolder(Exception):
    """--dir names a folder the demo did not make; it is left alone."""


def fresh_folder(directory: Path) -> None:
    """Empty the demo's folder for a new run; refuse to remove a folder that is not a previous demo's."""
    if directory.exists() and any(directory.iterdir()):
        if not (directory / MARKER).exists():
            raise NotADemoFolder(
                f"{directory} holds files that are not a previous demo's; give --dir an empty or new folder"
            )
        typer.echo(f"removing the previous demo in {directory}")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("made by `retrotest demo`; removed by the next run with the same --dir\n")


def quiet_mlflow() -> None:
    """MLflow's INFO lines and its integer-schema hint say nothing to someone trying the demo."""
    import logging
    import warnings

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="mlflow")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    fh = log.open("ab")
    return subprocess.Popen(
        args, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """SIGTERM the process's group (it was started in a session of its own), SIGKILL it after grace_s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_until_ready(
    url: str,
    *,
    procs: Sequence[subprocess.Popen[bytes]] = (),
    timeout_s: float = 120,
    logs: Callable[[], str] = lambda: "",
) -> None:
    """Poll `url` (the API's /ready or /health) until it answers 200.

    RuntimeError, ending with `logs()`, when one of `procs` exits first or the time runs out.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        exited = [p for p in procs if p.poll() is not None]
        if exited:
            raise RuntimeError(f"a process exited with {exited[0].returncode} while starting:\n{logs()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s:\n{logs()}")
        time.sleep(0.3)


def prepare_database(database_url: str) -> tuple[str, str]:
    """Migrate the demo database and add its admin through the service layer; returns (password, API token)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy.orm import Session

    from app.auth import service
    from app.auth.models import Role
    from app.auth.schemas import UserCreate
    from app.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            config = Config(str(ROOT / "alembic.ini"))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        password = secrets.token_urlsafe(12)
        with Session(engine) as session:
            admin = service.create_user(
                session=session,
                data=UserCreate(username=DEMO_USER, role=Role.admin, password=password),
                actor="demo",
            )
            _, token = service.create_api_token(session=session, user=admin, name="demo", actor="demo")
            session.commit()
    finally:
        engine.dispose()
    return password, token


def share_with_partner(client: httpx.Client, job_id: str) -> str:
    """Make a 7-day partner download link through the API and check that it opens; returns its URL."""
    url = str(
        client.post(f"/api/v1/retro-tests/{job_id}/links", json={"expires_in_days": 7}).raise_for_status().json()["url"]
    )
    httpx.get(url, timeout=30).raise_for_status()  # the partner's landing page, without any credentials
    return url


def run_demo(*, directory: Path, days: int, rows_per_day: int, port: int, keep_running: bool, today: date) -> int:
    """Set everything up, run one retro test through the REST API, print the outcome; returns an exit code."""
    t0 = time.monotonic()
    directory = directory.resolve()
    try:
        fresh_folder(directory)
    except NotADemoFolder as exc:
        typer.echo(str(exc), err=True)
        return 2
    quiet_mlflow()
    env = {
        **os.environ,
        "RETRO_VAR_DIR": str(directory),
        "RETRO_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "PYTHONUNBUFFERED": "1",
    }
    # The model's environment takes half a minute to build: it is kept beside the folder each run replaces.
    env.setdefault("RETRO_ENV_CACHE_DIR", str(directory.with_name(f"{directory.name}-environments")))
    for key in (
        "RETRO_DATABASE_URL",
        "RETRO_BROKER_URL",
        "RETRO_MLFLOW_TRACKING_URI",
        "RETRO_MLFLOW_REGISTRY_URI",
        "RETRO_RESULTS_URL",
        "RETRO_HISTORY_DIR",
    ):
        env.pop(key, None)
    tracking = f"sqlite:///{directory / 'mlflow.db'}"

    typer.echo(f"1/5 registering a sample churn model in a local MLflow registry ({tracking})")
    chatter = io.StringIO()  # MLflow prints "Successfully registered model ..." and friends to stderr
    try:
        with contextlib.redirect_stderr(chatter):
            version = register_demo_model(tracking_uri=tracking, artifact_root=directory / "mlflow-artifacts")
    except Exception:
        sys.stderr.write(chatter.getvalue())
        raise
    start = today - timedelta(days=days + 7)
    typer.echo(f"2/5 writing synthetic feature history: {days} days x {rows_per_day:,} customers")
    stats = write_history(root=directory / "history", start=start, days=days, rows_per_day=rows_per_day)
    typer.echo(f"    {stats.rows:,} rows, {stats.start} .. {stats.end}")

    typer.echo(f"3/5 starting the API on port {port} and a worker (SQLite database, SQLite broker)")
    password, token = prepare_database(f"sqlite:///{directory / 'retrotest.db'}")
    typer.echo(f"    admin {DEMO_USER!r} with an API token, made through the service layer in the demo database")
    exe = [sys.executable, "-m", "app.cli"]
    api = _start([*exe, "serve", "--port", str(port)], env, directory / "api.log")
    worker = _start([*exe, "worker"], env, directory / "worker.log")
    try:
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=auth) as client:
            wait_until_ready(
                f"http://127.0.0.1:{port}/ready", procs=[api, worker], logs=lambda: f"see the logs in {directory}"
            )
            client.post("/api/v1/partners", json={"code": DEMO_PARTNER, "name": "Demo Partner"}).raise_for_status()
            body = {
                "partner_code": DEMO_PARTNER,
                "model_name": DEMO_MODEL,
                "model_alias": "champion",
                "period_start": stats.start.isoformat(),
                "period_end": stats.end.isoformat(),
            }
            typer.echo(f"4/5 submitting: POST /api/v1/retro-tests {body}")
            resp = client.post("/api/v1/retro-tests", json=body)
            if resp.status_code != 202:
                typer.echo(f"the API refused the request ({resp.status_code}): {resp.text}", err=True)
                return 1
            t_submit = time.monotonic()
            job = wait_for(client, resp.headers["location"], interval=0.5)
            t_done = time.monotonic()
            typer.echo("5/5 done")
            sys.stderr.flush()
            print_job(job, web_url=f"http://127.0.0.1:{port}")
            scored = job["progress"]["rows_scored"]
            ok = job["state"] == "succeeded" and scored == stats.rows and job["progress"]["rows_read"] == stats.rows
            typer.echo(
                f"\nsource rows {stats.rows:,}; result rows {scored:,}: {'equal' if scored == stats.rows else 'NOT EQUAL'}"
            )
            typer.echo(
                f"model version {version}; job wall time {t_done - t_submit:.1f} s "
                f"({stats.rows / (t_done - t_submit):,.0f} rows/s end to end); demo wall time {t_done - t0:.1f} s"
            )
            if ok:
                typer.echo(f"partner download link (7 days): {share_with_partner(client, job['id'])}")
            if ok and not keep_running:
                typer.echo(
                    "the API stops now, so these URLs and the link answer only while a demo runs: "
                    "`./scripts/demo.sh --keep-running` leaves it up, with the web UI and a sign-in"
                )
            if keep_running and ok:
                typer.echo(
                    f"\nthe web UI stays up at http://127.0.0.1:{port}/ (API docs at /docs)\n"
                    f"  sign in as:  {DEMO_USER}\n"
                    f"  password:    {password}\n"
                    "for the CLI, paste into another terminal in this folder:\n"
                    "  source .venv/bin/activate\n"
                    f"  export RETRO_API_URL=http://127.0.0.1:{port}\n"
                    f"  export RETRO_API_TOKEN={token}\n"
                    f"press Ctrl-C to stop: the API and the worker stop; {directory} stays (the next demo replaces "
                    f"it) and so does the environment cache {env['RETRO_ENV_CACHE_DIR']}"
                )
                with contextlib.suppress(KeyboardInterrupt):
                    api.wait()
            return 0 if ok else 1
    finally:
        stop_process(worker)
        stop_process(api)
