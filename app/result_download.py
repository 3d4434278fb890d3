"""`retrotest download`: a succeeded job's result files onto this machine, resumable and checked.

Each file goes to `<name>.part` first and is renamed when whole; a `.part` left by an interrupted run is continued
with a Range request (a published file never changes). manifest.json is checked against
the sha256 the API lists, every other file against the manifest's own sha256.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import IO, Any

import httpx

from app.i18n import _

CHUNK = 1 << 20
MANIFEST = "manifest.json"


class DownloadFailed(Exception):
    """The files cannot be downloaded or do not match; the message says why and what to do."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def download_results(*, client: httpx.Client, job_id: str, folder: Path, progress: IO[str]) -> list[Path]:
    """Download every result file of a job into folder; return the paths written."""
    files = _listed_files(client=client, job_id=job_id)
    folder.mkdir(parents=True, exist_ok=True)
    by_name = {f["name"]: f for f in files}
    manifest = by_name.get(MANIFEST)
    expected = {f["name"]: f["sha256"] for f in files}
    written = []
    if manifest is not None:
        written.append(
            _fetch(client=client, file=manifest, folder=folder, sha256=manifest["sha256"], progress=progress)
        )
        listed = json.loads(written[0].read_text())["files"]
        expected.update({f["name"]: f["sha256"] for f in listed})
    for file in files:
        if file["name"] != MANIFEST:
            sha = expected[file["name"]]
            written.append(_fetch(client=client, file=file, folder=folder, sha256=sha, progress=progress))
    return written


def _listed_files(*, client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    resp = client.get(f"/api/v1/retro-tests/{job_id}")
    if resp.status_code >= 400:
        raise DownloadFailed(
            _("retro test {job_id}: {value}").format(job_id=job_id, value=resp.json().get("detail", resp.text)),
            exit_code=2,
        )
    job = resp.json()
    if job["state"] != "succeeded":
        raise DownloadFailed(
            _("retro test {job_id} is {state}: only a succeeded job has result files").format(
                job_id=job_id, state=job["state"]
            )
        )
    return list(job["files"])


def _fetch(*, client: httpx.Client, file: dict[str, Any], folder: Path, sha256: str, progress: IO[str]) -> Path:
    """One file, continued from its .part if there is one, checked, then renamed into place."""
    target = folder / str(file["name"])
    if target.exists() and _sha256(target) == sha256:
        progress.write(f"{file['name']}: already here, sha256 matches\n")
        return target
    part = folder / f"{file['name']}.part"
    have = part.stat().st_size if part.exists() else 0
    if have >= file["bytes"]:
        part.unlink()
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.stream("GET", file["download_url"], headers=headers) as resp:
        if resp.status_code not in (200, 206):
            resp.read()
            raise DownloadFailed(
                _("{name}: the API answered {status_code}: {value}").format(
                    name=file["name"], status_code=resp.status_code, value=resp.text[:200]
                )
            )
        resumed = resp.status_code == 206
        with part.open("ab" if resumed else "wb") as out:
            _copy(resp, out, name=file["name"], start=have if resumed else 0, size=file["bytes"], progress=progress)
    if (got := _sha256(part)) != sha256:
        part.unlink()
        raise DownloadFailed(
            _("{name}: sha256 {got} does not match the manifest's {sha256}; run it again").format(
                name=file["name"], got=got, sha256=sha256
            )
        )
    part.replace(target)
    return target


def _copy(resp: httpx.Response, out: IO[bytes], *, name: str, start: int, size: int, progress: IO[str]) -> None:
    """Stream the body to out, drawing a progress bar with the rate."""
    done, began, shown = start, time.monotonic(), 0.0
    for chunk in resp.iter_bytes(CHUNK):
        out.write(chunk)
        done += len(chunk)
        now = time.monotonic()
        if now - shown >= 0.2 or done >= size:
            progress.write("\r" + _bar(name=name, done=done, size=size, rate=(done - start) / max(now - began, 1e-6)))
            progress.flush()
            shown = now
    note = f" (resumed at {start:,} bytes)" if start else ""
    progress.write(f"\r{_bar(name=name, done=done, size=size, rate=0)}{note}\n")


def _bar(*, name: str, done: int, size: int, rate: float) -> str:
    pct = 100.0 * done / size if size else 100.0
    filled = int(pct / 100 * 24)
    speed = f"  {rate / 2**20:6.1f} MiB/s" if rate else ""
    return f"{name:<22} [{'#' * filled}{'.' * (24 - filled)}] {pct:5.1f}%  {done / 2**20:8.1f} MiB{speed}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def job_in_folder(folder: Path) -> str | None:
    """The id of the retro test whose files a folder holds, by its manifest.json; None when it holds none."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    job = manifest.get("retro_test") if isinstance(manifest, dict) else None
    found = job.get("id") if isinstance(job, dict) else None
    return str(found) if found else None
