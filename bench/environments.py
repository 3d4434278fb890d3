"""Benchmark: preparing a model's own environment, cold and warm, side by side with pip in one run.

    .venv/bin/python -m bench.environments [--python 3.10] [--skip-pip]

For two models, one logged two years ago (mlflow 2.9.2, scikit-learn 1.3.2, numpy 1.26.4, pandas 2.1.4) and one
logged with the worker's own stack, it times EnvironmentCache.prepare (app/integrations/environments/cache.py):
  cold, empty uv cache   a new worker: every package downloaded from the index, resolved, installed
  cold, warm uv cache    a worker that has built other environments: resolution and linking only
  warm                   the same model again: found in the environment cache
and, as the baseline, what rebuilding the environment by hand costs: `python -m venv` + `pip install` of the same
pinned packages with pip's cache off (roughly what a server that installs a model's requirements at start does).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.integrations.environments.cache import EnvironmentCache, ModelRequirements, choose_python, discover_pythons

SERVER_VERSIONS = ("1.7.1", "1.6.1", "1.5.0", "1.4.0", "1.3.5")
OLD_STACK = ("mlflow==2.9.2", "cloudpickle==2.2.1", "numpy==1.26.4", "pandas==2.1.4", "scikit-learn==1.3.2")


def worker_stack() -> tuple[str, ...]:
    import cloudpickle
    import mlflow
    import numpy
    import pandas
    import sklearn

    return (
        f"mlflow=={mlflow.__version__}",
        f"cloudpickle=={cloudpickle.__version__}",
        f"numpy=={numpy.__version__}",
        f"pandas=={pandas.__version__}",
        f"scikit-learn=={sklearn.__version__}",
    )


def timed_prepare(root: Path, requirements: ModelRequirements, uv_cache: Path) -> tuple[float, str, int]:
    os.environ["UV_CACHE_DIR"] = str(uv_cache)
    cache = EnvironmentCache(root=root, server_versions=SERVER_VERSIONS, constraints=("setuptools<70",))
    started = time.perf_counter()
    env = cache.prepare(requirements)
    return time.perf_counter() - started, env.lock, len(env.packages())


def timed_pip(python: str, lock: str, scratch: Path) -> float:
    venv = scratch / "pip-venv"
    (scratch / "lock.txt").write_text(lock)
    started = time.perf_counter()
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-cache-dir"]
    out = subprocess.run([*pip, "-r", str(scratch / "lock.txt")], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"pip failed: {out.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default="3.10", help="the old model's Python (minor version)")
    parser.add_argument("--skip-pip", action="store_true", help="leave out the pip baseline (minutes)")
    args = parser.parse_args()
    pythons = discover_pythons()
    here = ".".join(str(p) for p in sys.version_info[:3])
    models = {
        f"old stack, Python {args.python}": ModelRequirements(python=args.python + ".0", requirements=OLD_STACK),
        f"worker's stack, Python {here}": ModelRequirements(python=here, requirements=worker_stack()),
    }
    print(
        f"{'model':<28} {'packages':>8} {'cold, empty uv cache':>21} {'cold, warm uv cache':>20} {'warm':>7} "
        f"{'pip (no cache)':>15} {'pip / cold':>11} {'cold / warm':>12}"
    )
    for label, requirements in models.items():
        interpreter, _ = choose_python(requirements.python, pythons, nearest=False)
        with tempfile.TemporaryDirectory(prefix="bench-envs-") as tmp:
            scratch = Path(tmp)
            empty_uv = scratch / "uv-cache"
            cold, lock, packages = timed_prepare(scratch / "envs-1", requirements, empty_uv)
            cold_warm_uv, _, _ = timed_prepare(scratch / "envs-2", requirements, empty_uv)
            warm, _, _ = timed_prepare(scratch / "envs-2", requirements, empty_uv)
            pip = float("nan") if args.skip_pip else timed_pip(interpreter.path, lock, scratch)
        print(
            f"{label:<28} {packages:>8} {cold:>20.1f}s {cold_warm_uv:>19.1f}s {warm:>6.2f}s {pip:>14.1f}s "
            f"{pip / cold:>10.1f}x {cold_warm_uv / warm:>11.0f}x"
        )


if __name__ == "__main__":
    main()
