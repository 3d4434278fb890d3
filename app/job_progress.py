"""How the CLI and the demo show a job read from the REST API: a progress bar while it runs, a summary after."""

from __future__ import annotations

import sys
import time
from typing import Any

import httpx
import typer

TERMINAL = {"succeeded", "failed", "cancelled"}


def duration(seconds: float | None) -> str:
    """83.4 -> '1 min 23 s'."""
    if seconds is None:
        return "?"
    s = round(seconds)
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def pace(progress: dict[str, Any]) -> str:
    """'1 min 2 s elapsed, 41,200 rows/s, about 12 s left' (rate and time left once rows flow)."""
    parts = [f"{duration(progress.get('elapsed_s'))} elapsed"]
    if progress.get("rows_per_s"):
        parts.append(f"{progress['rows_per_s']:,.0f} rows/s")
    if progress.get("eta_s") is not None:
        parts.append(f"about {duration(progress['eta_s'])} left")
    return ", ".join(parts)


def _bar(job: dict[str, Any]) -> str:
    p = job["progress"]
    pct = p["percent"] or 0.0
    filled = int(pct / 100 * 30)
    total = f"{p['rows_total']:,}" if p["rows_total"] is not None else "?"
    done = p["rows_scored"] + p["rows_rejected"]
    return f"[{'#' * filled}{'.' * (30 - filled)}] {pct:5.1f}%  rows {done:,}/{total}  {pace(p)}  {p['activity']}"


def wait_for(client: httpx.Client, job_url: str, *, interval: float = 1.0) -> dict[str, Any]:
    """Poll a job until it ends, drawing a progress bar on the terminal."""
    last = ""
    while True:
        job = client.get(job_url).raise_for_status().json()
        line = _bar(job)
        if line != last:
            sys.stderr.write("\r" + line.ljust(len(last)))
            sys.stderr.flush()
            last = line
        if job["state"] in TERMINAL:
            sys.stderr.write("\n")
            return dict(job)
        time.sleep(interval)


def print_job(job: dict[str, Any], *, web_url: str) -> None:
    """A job's state, progress, stages, error and files, as the REST API shows it, on the terminal."""
    p = job["progress"]
    percent = f"{p['percent']:.1f}%" if p["percent"] is not None else "not counted yet"
    typer.echo(f"retro test {job['id']}: {job['state']}, {percent} ({p['activity']}; {pace(p)})")
    typer.echo(f"  page: {web_url}/jobs/{job['id']}")
    typer.echo(
        f"  partner {job['partner_code']}, model {job['model_name']} version {job['model_version']}, period {job['period_start']}..{job['period_end']}"
    )
    total = f"{p['rows_total']:,}" if p["rows_total"] is not None else "not counted yet"
    typer.echo(
        f"  rows: total {total}, read {p['rows_read']:,}, scored {p['rows_scored']:,}, rejected {p['rows_rejected']:,}"
    )
    for warning in job.get("warnings") or []:
        typer.echo(f"  warning: {warning}")
    for stage in job["stages"]:
        secs = f"{stage['seconds']:.1f} s" if stage["seconds"] is not None else ""
        typer.echo(f"  {stage['state']:<21} {stage['started_at']}  {secs}")
    if job["error"]:
        typer.echo(f"  error: {job['error']['code']}: {job['error']['message']}")
    for f in job["files"]:
        rows = f"{f['rows']:,} rows" if f["rows"] is not None else ""
        typer.echo(f"  {f['name']:<22} {rows:>15} {f['bytes']:>14,} bytes  sha256 {f['sha256']}")
    if job["files"]:
        typer.echo(f"  download them with: retrotest download {job['id']}")
