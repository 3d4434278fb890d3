"""The `retrotest` command against a running API and worker: README's "Using it" commands as written, status exit
codes, downloads that resume and are checked against the manifest, and one-line answers to a missing API or a
malformed day."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import uuid
from pathlib import Path

from tests.conftest import ROOT, Stack, free_port
from tests.web_helpers import succeeded_job

RETROTEST = ROOT / ".venv" / "bin" / "retrotest"


def run(
    args: list[str] | str, *, stack: Stack | None, cwd: Path, api: str | None = None
) -> subprocess.CompletedProcess[str]:
    """retrotest (or a shell line) with the API and token of the stack, as a user who ran `source .venv/bin/activate`."""
    env = {**os.environ, "PATH": f"{RETROTEST.parent}:{os.environ['PATH']}"}
    env["RETRO_API_URL"] = api or (stack.base_url if stack else "")
    env["RETRO_API_TOKEN"] = stack.token if stack else ""
    shell = isinstance(args, str)
    cmd: list[str] | str = args if shell else [str(RETROTEST), *args]
    return subprocess.run(cmd, shell=shell, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def using_it_commands() -> list[str]:
    """The `retrotest` lines of the first shell block under README's "## Using it"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using it", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    assert (
        "export RETRO_API_URL=" in block and "export RETRO_API_TOKEN=" in block and "source .venv/bin/activate" in block
    )
    return [line for line in block.splitlines() if line.startswith("retrotest ")]


def test_the_readme_using_it_commands_work_as_written(stack: Stack, tmp_path: Path) -> None:
    """Submit, status and download exactly as README writes them (its exports become this stack's URL and token)."""
    commands = using_it_commands()
    assert [c.split()[1] for c in commands] == ["submit", "status", "download"]
    with stack.client() as c:
        c.post("/api/v1/partners", json={"code": "demo-partner", "name": "Demo Partner"})  # as the demo makes it
    outputs = []
    for line in commands:
        done = run(line, stack=stack, cwd=tmp_path)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout)
    submitted, status, _ = outputs
    job_id = re.search(r"retro test ([0-9a-f-]{36})", submitted).group(1)  # type: ignore[union-attr]
    assert f"{stack.base_url}/jobs/{job_id}" in submitted
    assert f"retro test {job_id}: succeeded, 100.0%" in status and "elapsed" in status
    files = {p.name for p in (tmp_path / "results").iterdir()}
    assert {"manifest.json", "scores.parquet"} <= files and not any(n.endswith(".part") for n in files)
    manifest = json.loads((tmp_path / "results" / "manifest.json").read_text())
    for f in manifest["files"]:
        assert hashlib.sha256((tmp_path / "results" / f["name"]).read_bytes()).hexdigest() == f["sha256"]
    assert manifest["retro_test"]["id"] == job_id


def _job_with_manifest(stack: Stack, *, scores: bytes, listed_sha: str | None = None) -> str:
    """A succeeded job with scores.parquet and a manifest.json that lists its sha256 (or listed_sha)."""
    from app.db import get_session_factory

    code = f"cli-{uuid.uuid4().hex[:6]}"
    with stack.client() as c:
        c.post("/api/v1/partners", json={"code": code, "name": code})
    sha = listed_sha or hashlib.sha256(scores).hexdigest()
    manifest = json.dumps({"files": [{"name": "scores.parquet", "sha256": sha, "bytes": len(scores)}]}).encode()
    with get_session_factory()() as session:
        job = succeeded_job(session, code, {"scores.parquet": scores, "manifest.json": manifest})
        session.commit()
        return str(job.id)


def test_download_resumes_a_partial_file_and_checks_it_against_the_manifest(stack: Stack, tmp_path: Path) -> None:
    scores = os.urandom(3 * 2**20 + 17)
    job_id = _job_with_manifest(stack, scores=scores)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scores.parquet.part").write_bytes(scores[: 2**20])  # an interrupted earlier run

    done = run(["download", job_id, "--to", "out"], stack=stack, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert "resumed at 1,048,576 bytes" in done.stderr and "100.0%" in done.stderr
    assert (tmp_path / "out" / "scores.parquet").read_bytes() == scores
    assert not (tmp_path / "out" / "scores.parquet.part").exists()


def test_download_refuses_a_file_whose_sha256_differs_from_the_manifest(stack: Stack, tmp_path: Path) -> None:
    job_id = _job_with_manifest(stack, scores=b"the real bytes", listed_sha="0" * 64)

    done = run(["download", job_id, "--to", "out"], stack=stack, cwd=tmp_path)

    assert done.returncode == 1
    assert f"does not match the manifest's {'0' * 64}" in done.stderr
    assert not (tmp_path / "out" / "scores.parquet").exists()


def test_status_exits_1_for_a_failed_job_and_names_why(stack: Stack, tmp_path: Path) -> None:
    from app.core.jobs import RetroTest, State
    from app.db import get_session_factory

    job_id = _job_with_manifest(stack, scores=b"x")
    with get_session_factory()() as session:
        job = session.get(RetroTest, uuid.UUID(job_id))
        assert job is not None
        job.state, job.error_code, job.error_message = State.failed, "model_failed", "the model server exited"
        session.commit()

    done = run(["status", job_id], stack=stack, cwd=tmp_path)

    assert done.returncode == 1
    assert "failed" in done.stdout and "model_failed: the model server exited" in done.stdout
    assert "rows total None" not in done.stdout


def test_an_unreachable_api_is_one_line_naming_where_and_how_to_point_at_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    done = run(["status", str(uuid.uuid4())], stack=None, cwd=tmp_path, api=url)

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and url in done.stderr and "RETRO_API_URL" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_day_is_yyyy_mm_dd_or_yyyymmdd_and_anything_else_is_refused_before_calling_the_api(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a day that parses gets as far as the connection
    base = ["submit", "--partner", "p", "--model", "churn/1", "--end", "2026-01-02", "--start"]

    compact = run([*base, "20260101"], stack=None, cwd=tmp_path, api=url)
    wrong = run([*base, "2026111"], stack=None, cwd=tmp_path, api=url)

    assert compact.returncode == 2 and "cannot reach the retrotest API" in compact.stderr
    assert wrong.returncode == 2 and "'2026111' is not a day; write it as YYYY-MM-DD" in wrong.stderr
