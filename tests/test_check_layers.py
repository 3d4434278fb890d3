"""scripts/check_layers.py, the layer rules lint.sh holds app/ and worker/ to: it passes on this repository and
fails on a planted import cycle, a planted import upward from app.core, or a planted function with 7 parameters."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "scripts" / "check_layers.py"


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECK), str(root)], capture_output=True, text=True, timeout=120)


def plant(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for top in ("app", "worker"):
        (root / top).mkdir(exist_ok=True)
        (root / top / "__init__.py").touch()


def test_the_repository_keeps_its_layers() -> None:
    result = check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no import cycle" in result.stdout


# The import back from beta to alpha, written in each way that hides it from a reader but not from the check.
BACK_EDGES = {
    "top level": "from app.alpha.service import run\n",
    "in a function": "def late():\n    from app.alpha import service\n\n    return service\n",
    "type checking only": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from app.alpha.service import run\n",
    "relative": "from ..alpha import service\n",
    "from the top package": "from app import alpha\n",
}


@pytest.mark.parametrize("back", BACK_EDGES.values(), ids=BACK_EDGES.keys())
def test_a_planted_cycle_fails_and_names_the_imports(tmp_path: Path, back: str) -> None:
    plant(
        tmp_path,
        {
            "app/alpha/__init__.py": "",
            "app/alpha/service.py": "from app.beta.models import Thing\n\n\ndef run() -> Thing:\n    return Thing()\n",
            "app/beta/__init__.py": "",
            "app/beta/models.py": "class Thing:\n    pass\n",
            "app/beta/views.py": back,
        },
    )
    result = check(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "import cycle between packages: app.alpha <-> app.beta" in result.stdout
    assert "app/alpha/service.py:1: app.alpha imports app.beta" in result.stdout
    assert "app/beta/views.py" in result.stdout


def test_a_cycle_through_worker_and_app_fails_and_downward_imports_pass(tmp_path: Path) -> None:
    files = {
        "app/contract.py": "X = 1\n",
        "app/feature/__init__.py": "from app.contract import X\n",
        "worker/run.py": "from app.feature import X\n",
        "worker/pipeline.py": "from worker.run import X\nimport app.contract\n",
    }
    plant(tmp_path, files)
    assert check(tmp_path).returncode == 0, check(tmp_path).stdout

    plant(tmp_path, {"app/contract.py": "X = 1\n\n\ndef tasks():\n    import worker.pipeline\n"})
    result = check(tmp_path)
    assert result.returncode == 1
    assert "app.contract <-> app.feature <-> worker.pipeline <-> worker.run" in result.stdout


def test_an_import_upward_from_the_core_fails_without_a_cycle(tmp_path: Path) -> None:
    files = {
        "app/db.py": "Base = object\n",
        "app/core/__init__.py": "",
        "app/core/jobs.py": "from app.db import Base\n",
        "app/retro_tests/__init__.py": "",
        "app/retro_tests/service.py": "def submit():\n    pass\n",
    }
    plant(tmp_path, files)
    assert check(tmp_path).returncode == 0, check(tmp_path).stdout

    plant(
        tmp_path,
        {"app/core/jobs.py": "from app.db import Base\n\n\ndef late():\n    from app.retro_tests import service\n"},
    )
    result = check(tmp_path)
    assert result.returncode == 1
    assert "import cycle" not in result.stdout
    assert "app.core is below app.retro_tests and may not import it: app/core/jobs.py:5" in result.stdout


def test_a_planted_function_with_seven_parameters_fails(tmp_path: Path) -> None:
    allowed = """
        import typer
        from fastapi import APIRouter

        router = APIRouter()
        app = typer.Typer()


        def six(a, b, c, d, e, f, *args, **kwargs):
            pass


        class Service:
            def method(self, a, b, c, *, d, e, f):
                pass

            @classmethod
            def build(cls, a, b, c, d, e, f):
                pass


        @router.post("/jobs")
        def route(a, b, c, d, e, f, g):
            pass


        @app.command()
        def command(a, b, c, d, e, f, g):
            pass
        """
    plant(tmp_path, {"app/allowed.py": allowed})
    assert check(tmp_path).returncode == 0, check(tmp_path).stdout

    plant(tmp_path, {"worker/stage.py": "class Stage:\n    def run(self, a, b, /, c, d, *, e, f, g):\n        pass\n"})
    result = check(tmp_path)
    assert result.returncode == 1
    assert "worker/stage.py:2 run (7 parameters)" in result.stdout
    assert "allowed.py" not in result.stdout


def test_a_cycle_between_two_ports_of_the_adapters_fails(tmp_path: Path) -> None:
    plant(
        tmp_path,
        {
            "app/integrations/__init__.py": "",
            "app/integrations/deployers/__init__.py": "",
            "app/integrations/deployers/local.py": "from app.integrations.scoring.scorers import Scorer\n",
            "app/integrations/scoring/__init__.py": "",
            "app/integrations/scoring/scorers.py": "from app.integrations.deployers.local import x\n\nScorer = 1\n",
        },
    )
    result = check(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "app.integrations.deployers <-> app.integrations.scoring" in result.stdout


def passes_then_fails(root: Path, allowed: dict[str, str], planted: dict[str, str]) -> str:
    """The check passes on `allowed`, then fails once `planted` is written over it; returns what it printed."""
    plant(root, allowed)
    assert check(root).returncode == 0, check(root).stdout
    plant(root, planted)
    result = check(root)
    assert result.returncode == 1, result.stdout
    return result.stdout


# Each way a worker module other than worker/run.py could write the running job's row itself.
JOB_WRITES = {
    "a transaction": "def stage(run):\n    with run.transaction() as s:\n        return s\n",
    "the module": "from app.retro_tests import runs\n",
    "the module, dotted": "import app.retro_tests.runs as r\n",
    "a function": "from app.retro_tests.runs import JobSpec, record_chunk\n",
    "a function, relative": "from ..app.retro_tests.runs import finish\n",
}


@pytest.mark.parametrize("write", JOB_WRITES.values(), ids=JOB_WRITES.keys())
def test_a_worker_module_that_writes_the_running_job_itself_fails(tmp_path: Path, write: str) -> None:
    files = {
        "app/retro_tests/__init__.py": "",
        "app/retro_tests/runs.py": "class JobSpec:\n    pass\n\n\ndef record_chunk():\n    pass\n",
        # JobRun may do all of it; the stages may import runs' types.
        "worker/run.py": "from app.retro_tests import runs\n\n\ndef commit(run):\n    with run.transaction() as s:\n"
        "        return runs.record_chunk(s)\n",
        "worker/chunks.py": "from app.retro_tests.runs import JobSpec\nfrom worker.run import commit\n",
    }
    printed = passes_then_fails(tmp_path, files, {"worker/chunks.py": f"from worker.run import commit\n{write}"})
    assert "a write to the running job outside JobRun: worker/chunks.py:" in printed
    assert "JobRun: worker/run.py" not in printed


@pytest.mark.parametrize(
    "read",
    [
        'job.population["path"]',
        'run.spec.environment.get("packages")',
        "tally.validation.items()",
        '(job.stage_started or {}).get("scoring")',
    ],
)
def test_a_job_fact_read_by_key_fails(tmp_path: Path, read: str) -> None:
    files = {
        "app/core/__init__.py": "",
        "app/core/records.py": 'def public(record):\n    return record.population["rows"]\n',  # its own type: allowed
        "worker/publish.py": "def manifest(job, run, tally):\n    return job.population.rows, run.spec.environment\n",
    }
    printed = passes_then_fails(
        tmp_path, files, {"worker/publish.py": f"def manifest(job, run, tally):\n    return {read}\n"}
    )
    assert "a job's fact read as a dict: worker/publish.py:2 reads ." in printed
    assert "records.py" not in printed
