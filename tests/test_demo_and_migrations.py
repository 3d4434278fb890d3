"""The demo command a newcomer runs first, and the migrations every deployment runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port


@pytest.mark.integration  # starts the whole demo: its API, worker and model server
def test_demo_runs_a_real_retro_test_on_embedded_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRO_")}  # embedded defaults only
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "demo",
            "--dir",
            str(tmp_path / "demo"),
            "--days",
            "3",
            "--rows-per-day",
            "700",
            "--port",
            str(free_port()),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "source rows 2,100; result rows 2,100: equal" in out
    assert ": succeeded" in out and "scores.parquet" in out and "retrotest download" in out
    assert "partner download link (7 days): http://127.0.0.1:" in out and "/d/" in out
    assert "the API stops now" in out and "--keep-running" in out
    assert "INFO mlflow" not in out and "Hint: Inferred schema" not in out and "Successfully registered" not in out
    assert (tmp_path / "demo" / "retrotest.db").exists() and (tmp_path / "demo" / "broker.db").exists()


def test_the_demo_leaves_a_folder_it_did_not_make_alone(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("not the demo's")
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--dir", str(tmp_path), "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "holds files that are not a previous demo's; give --dir an empty or new folder" in proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "not the demo's"


def _alembic(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RETRO_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_migrations_match_the_models_and_go_both_ways(tmp_path: Path, database_url: str) -> None:
    check = _alembic("check", url=database_url)
    assert check.returncode == 0, check.stderr
    sqlite = f"sqlite:///{tmp_path / 'm.db'}"
    for step in (("upgrade", "head"), ("downgrade", "base"), ("upgrade", "head")):
        run = _alembic(*step, url=sqlite)
        assert run.returncode == 0, run.stderr
    assert _alembic("check", url=sqlite).returncode == 0
