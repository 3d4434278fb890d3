"""A pod's cold start with a model's environment: install at start (the init container's uv script, empty cache,
from the index) against the packed tarball (extract, then MLServer from it), side by side, for one packed
environment and model folder. Each pod's MLServer runs in a folder of its own; the time is until the model is ready.

    python -m bench.k8s_env_cold_start <environment.tar.gz> <requirements.lock> <python> <model folder>

<python> is an interpreter path: the init container's `--managed-python` download of python-build-standalone is
left out (it needs GitHub or a mirror), so install at start is timed without it, from the index with an empty cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from app.integrations.deployers.kubernetes import ENV_BUILD_SCRIPT, ENV_DIR, ENV_RUN_SCRIPT


def wait_ready(proc: subprocess.Popen[bytes], port: int, started: float, timeout_s: float = 900) -> float:
    url = f"http://127.0.0.1:{port}/v2/models/model/ready"
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit("not ready in time")


# What reaches the index from this machine (a pod gets the same through RETRO_K8S_* proxy and CA settings).
_EGRESS = ("SSL_CERT_FILE", "SSL_CERT_DIR", "UV_INDEX_URL", "UV_DEFAULT_INDEX", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def server_env(models: Path, port: int) -> dict[str, str]:
    return {
        **{k: os.environ[k] for k in _EGRESS if k in os.environ},
        "PATH": os.environ["PATH"],
        "HOME": str(models.parent),
        "RETRO_MODELS_DIR": str(models),
        "MLSERVER_HTTP_PORT": str(port),
        "MLSERVER_GRPC_PORT": str(port + 1),
        "MLSERVER_METRICS_PORT": str(port + 2),
        "MLSERVER_MODEL_NAME": "model",
        "MLSERVER_MODEL_IMPLEMENTATION": "mlserver_mlflow.MLflowRuntime",
        "MLSERVER_MODEL_URI": str(models),
        "MLSERVER_PARALLEL_WORKERS": "0",
    }


def main() -> None:
    tarball, lock, python, model = (Path(a) for a in sys.argv[1:5])
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        root = Path(tmp)
        # Install at start: the init container's script, then the server container's mlserver.
        env_dir, models = root / "install" / "env", root / "install" / "models"
        shutil.copytree(model, models)
        env_dir.mkdir(parents=True)
        script = ENV_BUILD_SCRIPT.replace(ENV_DIR, str(env_dir)).replace("--managed-python ", "")
        env = server_env(models, 18080) | {
            "RETRO_PYTHON": str(python),
            "RETRO_REQUIREMENTS_LOCK": lock.read_text(),
            "UV_PYTHON_INSTALL_DIR": f"{env_dir}/python",
            "UV_CACHE_DIR": f"{env_dir}/cache",
        }
        started = time.monotonic()
        subprocess.run(["sh", "-c", script], env=env, check=True)
        installed = time.monotonic() - started
        proc = subprocess.Popen([f"{env_dir}/venv/bin/mlserver", "start", str(models)], env=env, cwd=root / "install")
        install_s = wait_ready(proc, 18080, started)
        proc.terminate()
        proc.wait(30)
        # The tarball: the server container's script (the operator's download of it is not counted here).
        pod, models = root / "tarball", root / "tarball" / "models"
        shutil.copytree(model, models)
        shutil.copy(tarball, models / "environment.tar.gz")
        script = ENV_RUN_SCRIPT.replace(ENV_DIR, str(pod / "volume"))
        started = time.monotonic()
        proc = subprocess.Popen(["sh", "-c", script], env=server_env(models, 18180), cwd=pod)
        tarball_s = wait_ready(proc, 18180, started)
        proc.terminate()
        proc.wait(30)
    print(f"install at start: {install_s:.1f} s to ready ({installed:.1f} s of it installing)")
    print(f"tarball:          {tarball_s:.1f} s to ready ({tarball.stat().st_size / 1e6:.0f} MB)")
    print(f"ratio:            {install_s / tarball_s:.1f}x")


if __name__ == "__main__":
    main()
