"""The `retrotest` command: serve, worker, submit, status, demo, migrate."""

from __future__ import annotations

import os
import sys
import time
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

app = typer.Typer(help="Retro tests of MLflow models over a partner's feature history.", no_args_is_help=True)

TERMINAL = {"succeeded", "failed", "cancelled"}


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
    typer.echo("database is at the latest migration")


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    skip_migrations: Annotated[bool, typer.Option(help="Do not run migrations first")] = False,
) -> None:
    """Run the REST API (migrations first, unless told not to)."""
    import uvicorn

    if not skip_migrations:
        migrate_database()
    uvicorn.run("app.main:app", host=host, port=port, workers=workers, log_level="info", access_log=False)


@app.command()
def worker(concurrency: int = 1, loglevel: str = "INFO") -> None:
    """Run a Celery worker that executes retro tests."""
    from app.config import get_settings
    from worker.celery_app import celery_app

    queue = get_settings().queue_name
    celery_app.worker_main(
        [
            "worker",
            f"--loglevel={loglevel}",
            f"--concurrency={concurrency}",
            "-Q",
            queue,
            "--without-gossip",
            "--without-mingle",
        ]
    )


def _bar(job: dict[str, Any]) -> str:
    p = job["progress"]
    pct = p["percent"] or 0.0
    filled = int(pct / 100 * 30)
    total = f"{p['rows_total']:,}" if p["rows_total"] is not None else "?"
    return f"[{'#' * filled}{'.' * (30 - filled)}] {pct:5.1f}%  {job['state']:<10} rows {p['rows_scored'] + p['rows_rejected']:,}/{total}"


def wait_for(client: httpx.Client, job_url: str, *, interval: float = 1.0) -> dict[str, Any]:
    """Poll a job until it ends, drawing a progress bar on the terminal."""
    last = ""
    while True:
        job = client.get(job_url).raise_for_status().json()
        line = _bar(job)
        if line != last:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
            last = line
        if job["state"] in TERMINAL:
            sys.stderr.write("\n")
            return dict(job)
        time.sleep(interval)


def _print_job(job: dict[str, Any]) -> None:
    typer.echo(f"retro test {job['id']}: {job['state']}")
    typer.echo(
        f"  partner {job['partner_code']}, model {job['model_name']} version {job['model_version']}, period {job['period_start']}..{job['period_end']}"
    )
    p = job["progress"]
    typer.echo(
        f"  rows total {p['rows_total']}, read {p['rows_read']}, scored {p['rows_scored']}, rejected {p['rows_rejected']}"
    )
    for stage in job["stages"]:
        secs = f"{stage['seconds']:.1f} s" if stage["seconds"] is not None else ""
        typer.echo(f"  {stage['state']:<11} {stage['started_at']}  {secs}")
    if job["error"]:
        typer.echo(f"  error: {job['error']['code']}: {job['error']['message']}")
    if job["result_location"]:
        typer.echo(f"  results: {job['result_location']}")
    for f in job["files"]:
        typer.echo(
            f"  {f['name']:<16} {f['rows'] if f['rows'] is not None else '':>10} rows {f['bytes']:>12,} bytes  sha256 {f['sha256']}"
        )
        typer.echo(f"    {f['download_url']}")


@app.command()
def submit(
    partner: Annotated[str, typer.Option(help="Partner code")],
    model: Annotated[str, typer.Option(help="Registry model name")],
    start: Annotated[str, typer.Option(help="First day, YYYY-MM-DD")],
    end: Annotated[str, typer.Option(help="Last day, YYYY-MM-DD")],
    version: Annotated[str | None, typer.Option(help="Model version number")] = None,
    alias: Annotated[str | None, typer.Option(help="Model alias, e.g. champion")] = None,
    api: Annotated[str, typer.Option(envvar="RETRO_API_URL")] = "http://127.0.0.1:8000",
    wait: bool = True,
) -> None:
    """Submit a retro test through the REST API and, by default, follow it to the end."""
    body = {
        "partner_code": partner,
        "model_name": model,
        "period_start": start,
        "period_end": end,
        "model_version": version,
        "model_alias": alias,
    }
    with httpx.Client(base_url=api, timeout=60) as client:
        resp = client.post("/api/v1/retro-tests", json={k: v for k, v in body.items() if v is not None})
        if resp.status_code >= 400:
            err = resp.json()
            typer.echo(f"refused ({resp.status_code}): {err.get('detail', err)}", err=True)
            raise typer.Exit(2)
        job = resp.json()
        typer.echo(
            f"retro test {job['id']} {'queued' if resp.status_code == 202 else 'already running'}: {resp.headers['location']}"
        )
        if wait:
            job = wait_for(client, resp.headers["location"])
            _print_job(job)
            raise typer.Exit(0 if job["state"] == "succeeded" else 1)


@app.command()
def status(job_id: str, api: Annotated[str, typer.Option(envvar="RETRO_API_URL")] = "http://127.0.0.1:8000") -> None:
    """Show a retro test's state, progress and files."""
    with httpx.Client(base_url=api, timeout=30) as client:
        resp = client.get(f"/api/v1/retro-tests/{job_id}")
        if resp.status_code >= 400:
            typer.echo(f"{resp.status_code}: {resp.json().get('detail')}", err=True)
            raise typer.Exit(2)
        _print_job(resp.json())


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the demo keeps its registry, data and results")
    ] = Path("var/demo"),
    days: Annotated[int, typer.Option(min=1)] = 100,
    rows_per_day: Annotated[int, typer.Option(min=1)] = 10_000,
    port: int = 8765,
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


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
