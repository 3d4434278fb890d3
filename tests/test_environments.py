"""Model environments on their own: reading what a model asks for, choosing a Python, resolving and building with
the real uv, the cache's lock, bounds and holds, and the reference comparison."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from app.errors import EnvironmentFailed, ReferenceMismatch
from app.integrations.deployers.local import startup_failure
from app.integrations.environments.cache import (
    EnvironmentCache,
    Interpreter,
    ModelEnvironment,
    ModelRequirements,
    choose_python,
    discover_pythons,
    hold,
    read_requirements,
)
from worker.validation import Reference, _same, check


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_requirements_come_from_python_env_yaml_with_its_files_else_conda_yaml(tmp_path: Path) -> None:
    model = _write(
        tmp_path / "a",
        {
            "python_env.yaml": "python: 3.9.18\nbuild_dependencies: [pip]\ndependencies:\n- -r requirements.txt\n"
            "- -c constraints.txt\n",
            "requirements.txt": "mlflow==2.9.2\n# a comment\nscikit-learn==1.3.2  # pinned\n\n",
            "constraints.txt": "numpy<2\n",
        },
    )
    req = read_requirements(model, what="m")
    assert req == ModelRequirements(
        python="3.9.18",
        requirements=("mlflow==2.9.2", "scikit-learn==1.3.2"),
        constraints=("numpy<2",),
        source="python_env.yaml",
    )
    conda = _write(
        tmp_path / "b",
        {"conda.yaml": "dependencies:\n- python=3.8.10\n- pip<=23\n- pip:\n  - mlflow==1.30.0\n  - pandas==1.5.3\n"},
    )
    assert read_requirements(conda, what="m") == ModelRequirements(
        python="3.8.10", requirements=("mlflow==1.30.0", "pandas==1.5.3"), source="conda.yaml"
    )
    with pytest.raises(EnvironmentFailed, match=r"without python_env\.yaml or conda\.yaml"):
        read_requirements(_write(tmp_path / "c", {"MLmodel": "x: 1"}), what="m")
    escape = _write(tmp_path / "d", {"python_env.yaml": "python: 3.11\ndependencies: ['-r ../../etc/passwd']\n"})
    with pytest.raises(EnvironmentFailed, match="not in the model"):
        read_requirements(escape, what="m")


def test_the_python_of_the_models_minor_version_is_chosen_else_refused_naming_what_there_is() -> None:
    available = [
        Interpreter("/p/3.10.2", "3.10.2"),
        Interpreter("/p/3.10.13", "3.10.13"),
        Interpreter("/p/3.12.1", "3.12.1"),
    ]
    assert choose_python("3.10.13", available, nearest=False) == (available[1], None)
    assert choose_python("3.10.4", available, nearest=False) == (available[1], None)  # same minor, newest patch
    with pytest.raises(EnvironmentFailed) as refused:
        choose_python("3.11.7", available, nearest=False)
    assert "Python 3.11.7" in refused.value.detail and "3.10.2, 3.10.13, 3.12.1" in refused.value.detail
    assert "RETRO_ENV_NEAREST_PYTHON" in refused.value.detail
    chosen, warning = choose_python("3.11.7", available, nearest=True)
    assert chosen.version == "3.12.1" and warning and "3.11.7" in warning and "3.12.1" in warning


def test_discovery_reads_each_interpreters_own_version() -> None:
    pythons = discover_pythons()
    assert pythons, "this machine has at least the worker's Python"
    for p in pythons:
        assert os.access(p.path, os.X_OK) and p.version.count(".") == 2
    assert len({p.path for p in pythons}) == len(pythons)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> EnvironmentCache:
    return EnvironmentCache(
        root=tmp_path_factory.mktemp("envs"), server_versions=("1.7.1",), constraints=("setuptools<70",)
    )


def _worker_requirements() -> ModelRequirements:
    import sklearn

    version = ".".join(str(p) for p in sys.version_info[:3])
    return ModelRequirements(python=version, requirements=(f"scikit-learn=={sklearn.__version__}",))


@pytest.mark.integration  # builds a real environment from the package index
def test_jobs_that_need_the_same_environment_at_once_build_it_once(cache: EnvironmentCache) -> None:
    results: list[ModelEnvironment] = []
    errors: list[BaseException] = []

    def prepare() -> None:
        try:
            results.append(cache.prepare(_worker_requirements()))
        except BaseException as exc:  # the test reports it below
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len({e.key for e in results}) == 1
    assert sorted(e.reused for e in results) == [False, True, True]  # one built it, two waited and found it
    env = results[0]
    assert env.packages()["mlserver"] == "1.7.1" and env.server_version == "1.7.1"
    assert Path(env.mlserver_executable).is_file()
    built = json.loads((Path(env.path) / "env.json").read_text())
    assert built["size_bytes"] > 10_000_000 and built["python"] == env.python


def test_unresolvable_requirements_fail_naming_the_package_and_the_reason(cache: EnvironmentCache) -> None:
    bad = ModelRequirements(python=_worker_requirements().python, requirements=("scikit-learn==0.0.404",))
    with pytest.raises(EnvironmentFailed) as failed:
        cache.prepare(bad)
    assert "scikit-learn" in failed.value.detail and "0.0.404" in failed.value.detail
    conflict = ModelRequirements(python=bad.python, requirements=("protobuf<4",))  # every MLServer listed needs more
    with pytest.raises(EnvironmentFailed) as refused:
        cache.prepare(conflict)
    assert "no MLServer release resolves" in refused.value.detail and "protobuf" in refused.value.detail


def _fake_env(root: Path, key: str, *, size: int, used: float) -> ModelEnvironment:
    folder = _write(
        root / key,
        {"env.json": json.dumps({"python": "3.11.7", "server_version": "1.7.1", "size_bytes": size}), "ready": ""},
    )
    os.utime(folder / "ready", (used, used))
    return ModelEnvironment(
        key=key, python="3.11.7", python_requested="3.11.7", server_version="1.7.1", lock="", path=str(folder)
    )


def test_the_cache_evicts_least_recently_used_first_and_never_one_in_use(tmp_path: Path) -> None:
    cache = EnvironmentCache(root=tmp_path, max_bytes=2_500)
    now = time.time()
    oldest = _fake_env(tmp_path, "oldest", size=1_000, used=now - 300)
    old = _fake_env(tmp_path, "old", size=1_000, used=now - 200)
    _fake_env(tmp_path, "new", size=1_000, used=now - 100)
    with hold(oldest):  # a job or a model server is using it
        assert [e.in_use for e in cache.cached()] == [True, False, False]
        assert cache.evict() == ["old"]
    assert not Path(old.path).exists() and Path(oldest.path).exists()
    assert cache.evict(max_bytes=0, keep="new") == ["oldest"]
    assert [e.key for e in cache.cached()] == ["new"]


def test_a_model_server_holds_its_environment_for_as_long_as_it_runs(tmp_path: Path) -> None:
    """The flock is inherited: a server left running by a killed worker still keeps its environment."""
    import subprocess

    env = _fake_env(tmp_path, "served", size=1, used=time.time())
    with hold(env) as fd:
        server = subprocess.Popen(["sleep", "30"], pass_fds=(fd,))
    try:
        assert EnvironmentCache(root=tmp_path).remove("served") is False
    finally:
        server.kill()
        server.wait()
    assert EnvironmentCache(root=tmp_path).remove("served") is True


def test_the_startup_failure_named_is_the_models_exception_not_the_shutdown_noise() -> None:
    log = "\n".join(
        [
            "INFO - loading",
            "Traceback (most recent call last):",
            '  File "x.py", line 1, in load',
            "    cloudpickle.load(f)",
            "AttributeError: Can't get attribute '__pyx_unpickle_CyHalfBinomialLoss' on <module 'sklearn._loss._loss'>",
            "INFO - shutting down",
            "Traceback (most recent call last):",
            '  File "asyncio/runners.py", line 1',
            "asyncio.exceptions.CancelledError",
        ]
    )
    assert startup_failure(log).startswith("AttributeError: Can't get attribute '__pyx_unpickle_CyHalfBinomialLoss'")
    # A log without a traceback is the model's own output: it goes to the worker's log, never to the job.
    told = startup_failure("a\nb\nsecret-value")
    assert "exited without naming an exception" in told and "secret-value" not in told


def test_scores_agree_within_the_tolerance_nan_with_null_and_labels_exactly() -> None:
    assert _same([0.5, float("nan")], [0.5 + 1e-12, None], 1e-9)[0]
    assert not _same([0.5], [0.5 + 1e-6], 1e-9)[0]
    assert _same([1e6], [1e6 + 1e-4], 1e-9)[0]  # relative above 1
    assert _same(["yes"], ["yes"], 1e-9)[0] and not _same(["yes"], ["no"], 1e-9)[0]
    assert not _same([None], [0.0], 1e-9)[0] and not _same([1.0], [1.0, 2.0], 1e-9)[0]


def test_a_reference_the_deployment_disagrees_with_fails_showing_the_first_rows() -> None:
    import pyarrow as pa

    from app.core.model_types import Feature
    from app.integrations.scoring.scorers import ScoredBatch

    class Doubling:
        def score(self, batch: pa.RecordBatch) -> ScoredBatch:
            x = batch.column("x").to_pylist()
            return ScoredBatch(
                scored_rows=batch,
                scores=pa.table({"score": [2 * v for v in x]}),
                rejected_rows=batch.slice(0, 0),
                reject_reasons=[],
            )

    features = (Feature("x", "double"),)
    good = Reference(source="r", columns={"x": [1.0, 2.0]}, expected=[[2.0], [4.0]])
    assert check(good, scorer=Doubling(), features=features, tolerance=1e-9).passed is True
    bad = Reference(source="r", columns={"x": [1.0, 2.0, 3.0]}, expected=[[2.0], [4.5], [6.5]])
    with pytest.raises(ReferenceMismatch) as failed:
        check(bad, scorer=Doubling(), features=features, tolerance=1e-9)
    assert "2 of 3 rows differ" in failed.value.detail and "row 1: expected [4.5], got [4.0]" in failed.value.detail
    assert failed.value.outcome and failed.value.outcome["max_abs_diff"] == 0.5


def test_the_cli_lists_and_prunes_the_cache(tmp_path: Path) -> None:
    import subprocess
    import sys

    now = time.time()
    _fake_env(tmp_path, "aaaa", size=3 * 2**30, used=now - 100)
    _fake_env(tmp_path, "bbbb", size=2**30, used=now)
    run_env = {**os.environ, "RETRO_ENV_CACHE_DIR": str(tmp_path), "RETRO_ENV_CACHE_MAX_GB": "5"}

    def cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "app.cli", "envs", *args], env=run_env, capture_output=True, text=True, check=True
        )
        return out.stdout

    listed = cli("list")
    assert listed.index("aaaa") < listed.index("bbbb") and "3.00GB" in listed and "4.00 GB of 5 GB" in listed
    assert "removed 1 environment(s): aaaa; 1 left (1.00 GB, 0 in use)" in cli("prune", "--max-gb", "2")
    assert "removed 1 environment(s): bbbb; 0 left" in cli("prune", "--all")
