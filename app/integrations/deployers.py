"""Temporary model deployments: start exactly one model version, wait until it serves, stop it.

Each deployment has a name derived from the job, so any process (the worker, a cancel, the reaper)
can stop it by name, and stop is idempotent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from app.errors import DeploymentFailed, JobCancelled
from app.integrations.registry import ModelVersionInfo


@dataclass(frozen=True)
class Deployment:
    """A running model server that accepts inference requests."""

    name: str
    base_url: str
    model_name: str
    protocol: str = "v2"
    headers: dict[str, str] = field(default_factory=dict)


class Deployer(Protocol):
    """Starts and stops temporary model deployments."""

    def start(self, *, name: str, model: ModelVersionInfo) -> Deployment:
        """Create the deployment; return at once, before it is ready."""

    def wait_ready(self, deployment: Deployment, *, timeout_s: float, should_stop: Callable[[], bool]) -> None:
        """Block until the deployment serves, it fails, should_stop() is true, or the deadline passes."""

    def stop(self, name: str) -> None:
        """Tear the deployment down; a deployment that is already gone is fine."""


def deployment_name(job_id: object) -> str:
    """A DNS-1123 label unique to the job."""
    return f"retro-{str(job_id).replace('-', '')[:24]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalMLServerDeployer:
    """Runs `mlserver start` with the MLflow runtime as a child process on a free loopback port."""

    def __init__(self, *, work_dir: Path, executable: str = "mlserver") -> None:
        self._work_dir = work_dir
        self._executable = executable

    def _dir(self, name: str) -> Path:
        return self._work_dir / name

    def start(self, *, name: str, model: ModelVersionInfo) -> Deployment:
        self.stop(name)  # a leftover from a crashed attempt must not keep the port or the model
        folder = self._dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        model_dir = self._fetch_model(model, folder / "model")
        http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
        settings = {
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": metrics_port,
            # parallel_workers >= 1 crashes at start with uvloop 0.23 ("There is no current event loop").
            "parallel_workers": 0,
            "debug": False,
        }
        model_settings = {
            "name": name,
            "implementation": "mlserver_mlflow.MLflowRuntime",
            "parameters": {"uri": str(model_dir), "version": model.version},
        }
        (folder / "settings.json").write_text(json.dumps(settings))
        (folder / "model-settings.json").write_text(json.dumps(model_settings))
        log = (folder / "mlserver.log").open("ab")
        exe = _find_executable(self._executable)
        proc = subprocess.Popen(
            [exe, "start", str(folder)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so stop() takes every child with it
            cwd=folder,
        )
        log.close()
        (folder / "pid").write_text(str(proc.pid))
        return Deployment(name=name, base_url=f"http://127.0.0.1:{http_port}", model_name=name)

    @staticmethod
    def _fetch_model(model: ModelVersionInfo, dest: Path) -> Path:
        import mlflow

        if dest.exists():
            shutil.rmtree(dest)
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_uri, dst_path=str(dest)))
        except Exception as exc:
            raise DeploymentFailed(f"cannot fetch model artifacts from {model.artifact_uri}: {exc}") from exc

    def wait_ready(self, deployment: Deployment, *, timeout_s: float, should_stop: Callable[[], bool]) -> None:
        url = f"{deployment.base_url}/v2/models/{deployment.model_name}/ready"
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if should_stop():
                    raise JobCancelled("cancelled while the model server was starting")
                if not self._alive(deployment.name):
                    raise DeploymentFailed(f"the model server exited while starting: {self._log_tail(deployment.name)}")
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise DeploymentFailed(
                        f"the model server was not ready at {url} within {timeout_s:.0f} s; "
                        f"last log lines: {self._log_tail(deployment.name)}"
                    )
                time.sleep(0.25)

    def _pid(self, name: str) -> int | None:
        try:
            pid = int((self._dir(name) / "pid").read_text())
        except (OSError, ValueError):
            return None
        # The pid may have been reused by an unrelated process since; only ours has our folder in its cmdline.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if str(self._dir(name)).encode() in cmdline else None

    def _alive(self, name: str) -> bool:
        pid = self._pid(name)
        if pid is None:
            return False
        try:
            status = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            return False
        return status != "Z"

    def _log_tail(self, name: str, lines: int = 5) -> str:
        try:
            text = (self._dir(name) / "mlserver.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    def stop(self, name: str) -> None:
        pid = self._pid(name)
        if pid is not None:
            _kill_group(pid)
        shutil.rmtree(self._dir(name), ignore_errors=True)

    def list_names(self) -> list[str]:
        """Deployments this machine still has files or processes for."""
        if not self._work_dir.is_dir():
            return []
        return sorted(p.name for p in self._work_dir.iterdir() if p.is_dir())

    def is_running(self, name: str) -> bool:
        return self._alive(name)


def _find_executable(name: str) -> str:
    """name on PATH, or beside this Python (a virtualenv's bin/ is often not on PATH)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise DeploymentFailed(f"cannot find the model server executable {name!r}; set RETRO_MLSERVER_EXECUTABLE")
    return found


def _kill_group(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after the grace period."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        _reap(pid)
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect the exit status if it is our child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
