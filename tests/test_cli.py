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

from tests.conftest import HISTORY_START, ROOT, Stack, free_port
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
    assert [c.split()[1] for c in commands] == ["submit", "status", "download", "list", "link"]
    with stack.client() as c:
        c.post("/api/v1/partners", json={"code": "demo-partner", "name": "Demo Partner"})  # as the demo makes it
    outputs = []
    for line in commands:
        done = run(line, stack=stack, cwd=tmp_path)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout)
    submitted, status, _, listed, linked = outputs
    job_id = re.search(r"retro test ([0-9a-f-]{36})", submitted).group(1)  # type: ignore[union-attr]
    assert re.search(rf"^{job_id[:8]}\s+succeeded\s+demo-partner\s+churn/\d+", listed, re.MULTILINE), listed
    assert re.fullmatch(rf"{re.escape(stack.base_url)}/d/\S+\n", linked), linked
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


def test_list_cancel_and_link_take_an_id_prefix(stack: Stack, tmp_path: Path) -> None:
    from app.db import get_session_factory
    from tests.factories import make_retro_test

    done_id = _job_with_manifest(stack, scores=b"scores")
    with get_session_factory()() as s, s.begin():
        queued_id = str(make_retro_test(s, start=HISTORY_START, end=HISTORY_START, partner_prefix="cli-queued"))

    listed = run(["list", "--limit", "5"], stack=stack, cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout.startswith("ID ")
    assert queued_id[:8] in listed.stdout and done_id[:8] in listed.stdout

    # The 8 characters the list shows name the job; a succeeded job cannot be cancelled, a queued one can.
    refused = run(["cancel", done_id[:8]], stack=stack, cwd=tmp_path)
    assert refused.returncode == 2 and "409" in refused.stderr and "Traceback" not in refused.stderr
    cancelled = run(["cancel", queued_id[:8].upper()], stack=stack, cwd=tmp_path)
    assert cancelled.returncode == 0 and f"retro test {queued_id} cancelled" in cancelled.stdout
    linked = run(["link", done_id[:10], "--days", "2"], stack=stack, cwd=tmp_path)
    assert linked.returncode == 0 and linked.stdout.startswith(stack.base_url + "/d/"), linked.stderr
    assert "shown only now" in linked.stderr
    with stack.client() as c:
        assert len(c.get(f"/api/v1/retro-tests/{done_id}/links").json()) == 1

    short = run(["status", done_id[:6]], stack=stack, cwd=tmp_path)
    assert short.returncode == 2 and "first 8 or more characters" in short.stderr
    unknown = run(["status", "00000000"], stack=stack, cwd=tmp_path)
    assert unknown.returncode == 2 and "none of your retro tests has an id starting with 00000000" in unknown.stderr


def test_download_refuses_a_folder_holding_another_jobs_files_unless_forced(stack: Stack, tmp_path: Path) -> None:
    first = _job_with_manifest(stack, scores=b"first")
    second = _job_with_manifest(stack, scores=b"second")
    manifest = {"retro_test": {"id": first}, "files": []}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))

    refused = run(["download", second, "--to", "out"], stack=stack, cwd=tmp_path)
    assert refused.returncode == 2 and f"holds the files of another retro test ({first})" in refused.stderr
    assert "--force" in refused.stderr and not (tmp_path / "out" / "scores.parquet").exists()
    forced = run(["download", second, "--to", "out", "--force"], stack=stack, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "out" / "scores.parquet").read_bytes() == b"second"


def test_a_missing_token_or_a_url_without_scheme_is_explained_in_the_clis_terms(stack: Stack, tmp_path: Path) -> None:
    env = {**os.environ, "RETRO_API_URL": stack.base_url, "RETRO_API_TOKEN": ""}
    no_token = subprocess.run(
        [str(RETROTEST), "status"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert no_token.returncode == 2 and "RETRO_API_TOKEN" in no_token.stderr and "create-token" in no_token.stderr
    bare = run(["list"], stack=stack, cwd=tmp_path, api=stack.base_url.removeprefix("http://"))
    assert bare.returncode == 2 and bare.stderr.count("\n") == 1
    assert "it must be the API's address with its scheme" in bare.stderr and "at ://" not in bare.stderr


def test_create_token_on_a_missing_or_empty_database_says_so_in_one_line_and_creates_nothing(tmp_path: Path) -> None:
    import sqlite3

    missing = tmp_path / "mistyped.db"
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("CREATE TABLE unrelated (x)").connection.close()
    for url, words in (
        (f"sqlite:///{missing}", f"no database at {missing}"),
        (f"sqlite:///{empty}", "has no retrotest tables: run `retrotest migrate` first"),
    ):
        env = {**os.environ, "RETRO_DATABASE_URL": url}
        done = subprocess.run(
            [str(RETROTEST), "create-token", "--username", "alice"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 1 and words in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not missing.exists()
