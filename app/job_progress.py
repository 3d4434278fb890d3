"""How the CLI and the demo show a job read from the REST API: a progress bar while it runs, a summary after."""

from __future__ import annotations

import sys
import time
from typing import Any

import httpx
import typer

from app.i18n import _

TERMINAL = {"succeeded", "failed", "cancelled"}


def duration(seconds: float | None) -> str:
    """83.4 -> '1 min 23 s'."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s >= 3600:
        return _("{hours} h {minutes} min").format(hours=s // 3600, minutes=s % 3600 // 60)
    if s >= 60:
        return _("{minutes} min {seconds} s").format(minutes=s // 60, seconds=s % 60)
    return _("{seconds} s").format(seconds=s)


def pace(progress: dict[str, Any]) -> str:
    """'1 min 2 s elapsed, 41,200 rows/s, about 12 s left' (rate and time left once rows flow)."""
    parts = [_("{time} elapsed").format(time=duration(progress.get("elapsed_s")))]
    if progress.get("rows_per_s"):
        parts.append(_("{rate} rows/s").format(rate=f"{progress['rows_per_s']:,.0f}"))
    if progress.get("eta_s") is not None:
        parts.append(_("about {time} left").format(time=duration(progress["eta_s"])))
    return ", ".join(parts)


def _bar(job: dict[str, Any]) -> str:
    p = job["progress"]
    pct = p["percent"] or 0.0
    filled = int(pct / 100 * 30)
    total = f"{p['rows_total']:,}" if p["rows_total"] is not None else "?"
    done = p["rows_scored"] + p["rows_rejected"]
    return f"[{'#' * filled}{'.' * (30 - filled)}] {pct:5.1f}%  " + _("rows {done}/{total}  {pace}  {activity}").format(
        done=f"{done:,}", total=total, pace=pace(p), activity=p["activity"]
    )


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
    typer.echo(
        _("retro test {id}: {state}, {percent} ({activity}; {p})").format(
            id=job["id"], state=job["state"], percent=percent, activity=p["activity"], p=pace(p)
        )
    )
    typer.echo(_("  page: {web_url}/jobs/{id}").format(web_url=web_url, id=job["id"]))
    typer.echo(
        _(
            "  partner {partner_code}, model {model_name} version {model_version}, period {period_start}..{period_end}"
        ).format(
            partner_code=job["partner_code"],
            model_name=job["model_name"],
            model_version=job["model_version"],
            period_start=job["period_start"],
            period_end=job["period_end"],
        )
    )
    total = f"{p['rows_total']:,}" if p["rows_total"] is not None else "not counted yet"
    typer.echo(
        _("  rows: total {total}, read {rows_read:,}, scored {rows_scored:,}, rejected {rows_rejected:,}").format(
            total=total, rows_read=p["rows_read"], rows_scored=p["rows_scored"], rows_rejected=p["rows_rejected"]
        )
    )
    for m in job.get("models") or []:
        state = (
            _("left out: {message}").format(message=m["left_out"]["message"])
            if m["left_out"]
            else _("scored {rows_scored:,}, rejected {rows_rejected:,}").format(
                rows_scored=m["rows_scored"], rows_rejected=m["rows_rejected"]
            )
        )
        typer.echo(
            _("  model {name} version {version} (columns {prefix}...): {state}").format(
                name=m["model_name"], version=m["model_version"], prefix=m["column_prefix"], state=state
            )
        )
    for warning in job.get("warnings") or []:
        typer.echo(_("  warning: {warning}").format(warning=warning))
    for stage in job["stages"]:
        secs = f"{stage['seconds']:.1f} s" if stage["seconds"] is not None else ""
        typer.echo(
            _("  {state:<21} {started_at}  {secs}").format(
                state=stage["state"], started_at=stage["started_at"], secs=secs
            )
        )
    if job["error"]:
        typer.echo(_("  error: {code}: {message}").format(code=job["error"]["code"], message=job["error"]["message"]))
    for f in job["files"]:
        rows = f"{f['rows']:,} rows" if f["rows"] is not None else ""
        typer.echo(
            _("  {name:<22} {rows:>15} {bytes:>14,} bytes  sha256 {sha256}").format(
                name=f["name"], rows=rows, bytes=f["bytes"], sha256=f["sha256"]
            )
        )
    if job["files"]:
        typer.echo(_("  download them with: retrotest download {id}").format(id=job["id"]))
