"""The local deployer: one MLServer process on this machine per deployment (the embedded default and the tests').
What a deployer is (the port) lives in app/integrations/deployers/port.py."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from app.core.model_types import ModelVersionInfo
from app.errors import DeploymentFailed, JobCancelled, ModelServerDown
from app.integrations.deployers.port import Deployment, ManagedDeployment
from app.integrations.deployers.procs import proc_stats
from app.integrations.environments.cache import ModelEnvironment, hold
from app.integrations.environments.sandbox import (
    SERVER_ENV_PREFIXES,
    ModelSandbox,
    SandboxUnavailable,
    model_environment,
    python_roots,
    reported_error,
)
from app.integrations.registry.mlflow import fetch_model

_log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalMLServerDeployer:
    """Runs `mlserver start` with the MLflow runtime as a child process on a free loopback port.

    Each deployment is a folder under work_dir named after it, holding the settings, the model, the log,
    the pid, the job id and the expiry time.
    """

    def __init__(
        self,
        *,
        work_dir: Path,
        executable: str = "mlserver",
        ttl_s: float | None = None,
        sandbox: ModelSandbox | None = None,
    ) -> None:
        self._work_dir = work_dir
        self._executable = executable
        self._ttl_s = ttl_s
        self._sandbox = sandbox or ModelSandbox()

    def _dir(self, name: str) -> Path:
        return self._work_dir / name

    def start(
        self, *, name: str, job_id: str, model: ModelVersionInfo, environment: ModelEnvironment | None = None
    ) -> Deployment:
        env_key = environment.key if environment else ""
        adopted = self._adopt(name, job_id, model, env_key)
        if adopted is not None:
            return adopted
        self.stop(name)  # a leftover from a crashed attempt must not keep the port or the model
        folder = self._claim(name, job_id)
        (folder / "environment").write_text(env_key)
        model_dir = fetch_model(model.artifact_uri, folder / "model")
        http_port, grpc_port, metrics_port = self._listen_ports(name)
        settings = {
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": metrics_port,
            # parallel_workers >= 1 crashes at start with uvloop 0.23 ("There is no current event loop").
            "parallel_workers": 0,
            # Debug on, MLServer's own default (as on every Seldon or KServe server): with it off, starlette answers
            # a model that raises with a bare "Internal Server Error" over REST and a refused row loses the model's
            # reason. The traceback goes only to this worker over loopback, which keeps its last exception line
            # (protocols.model_message): the same words gRPC carries.
            "debug": True,
        }
        model_settings = {
            "name": name,
            "implementation": "mlserver_mlflow.MLflowRuntime",
            "parameters": {"uri": str(model_dir), "version": model.version},
        }
        (folder / "settings.json").write_text(json.dumps(settings))
        (folder / "model-settings.json").write_text(json.dumps(model_settings))
        log = (folder / "mlserver.log").open("ab")
        exe = environment.mlserver_executable if environment else find_server_executable(self._executable)
        argv = self._server_command(exe, folder)
        with contextlib.ExitStack() as held:
            # The server holds its environment against eviction for as long as it runs (a shared flock it inherits).
            in_use = held.enter_context(hold(environment)) if environment else None
            proc = subprocess.Popen(
                argv,
                env=model_environment(home=folder / "home", prefixes=SERVER_ENV_PREFIXES),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so stop() takes every child with it
                cwd=folder,
                pass_fds=(in_use,) if in_use is not None else (),
            )
        log.close()
        (folder / "pid").write_text(str(proc.pid))
        return _local_deployment(name, settings)

    def _listen_ports(self, name: str) -> tuple[int, int, int]:
        """The HTTP, gRPC and metrics ports the server of this deployment listens on: free loopback ports."""
        return _free_port(), _free_port(), _free_port()

    def _server_command(self, exe: str, folder: Path) -> list[str]:
        """`mlserver start` as a model process: it sees its environment and its own folder (app/integrations/environments/sandbox.py).

        It outlives the worker on purpose (a killed worker's next attempt adopts it), so not --die-with-parent.
        """
        try:
            return self._sandbox.command(
                [exe, "start", str(folder)],
                cwd=folder,
                readable=python_roots(exe),
                writable=[folder],
                die_with_parent=False,
            )
        except SandboxUnavailable as exc:
            raise DeploymentFailed(str(exc)) from exc

    def _adopt(self, name: str, job_id: str, model: ModelVersionInfo, env_key: str) -> Deployment | None:
        """The server a killed attempt of the same job left running, if it serves this model version and is ready.

        A worker killed mid-job leaves its model server behind (its own process group); the next attempt
        takes it over instead of paying for a cold start.
        """
        folder = self._dir(name)
        try:
            same_job = (folder / "job-id").read_text().strip() == job_id
            same_job = same_job and (folder / "environment").read_text().strip() == env_key
            settings = json.loads((folder / "settings.json").read_text())
            version = json.loads((folder / "model-settings.json").read_text())["parameters"]["version"]
        except (OSError, ValueError, KeyError):
            return None
        if not (same_job and version == model.version and self._alive(name)):
            return None
        try:
            deployment = _local_deployment(name, settings)
        except KeyError:
            return None
        try:
            ready = httpx.get(f"{deployment.base_url}/v2/models/{name}/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            ready = False
        return deployment if ready else None

    def _claim(self, name: str, job_id: str) -> Path:
        """The deployment's folder, created with its job id and expiry already in it (list_managed never sees it half-made)."""
        self._work_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self._work_dir))
        (staging / "job-id").write_text(job_id)
        if self._ttl_s is not None:
            (staging / "expires-at").write_text(str(int(time.time() + self._ttl_s)))
        folder = self._dir(name)
        staging.rename(folder)
        return folder

    def wait_ready(self, deployment: Deployment, *, timeout_s: float, should_stop: Callable[[], bool]) -> None:
        url = f"{deployment.base_url}/v2/models/{deployment.model_name}/ready"
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if should_stop():
                    raise JobCancelled("cancelled while the model server was starting")
                if not self._alive(deployment.name):
                    cause = self._cause(deployment.name)
                    if cause == UNNAMED_EXIT:  # the pipeline re-creates a server that went down (max_redeploys)
                        raise ModelServerDown(f"the model server exited while starting: {cause}")
                    raise DeploymentFailed(f"the model server exited while starting: {cause}")
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise DeploymentFailed(
                        f"the model server was not ready at {url} within {timeout_s:.0f} s: {self._cause(deployment.name)}"
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

    def _cause(self, name: str) -> str:
        try:
            text = (self._dir(name) / "mlserver.log").read_text(errors="replace")
        except OSError:
            return "(it left no log)"
        # The log is the model's output: the worker's log keeps its end, the job only the exception it names.
        _log.warning("model server %s did not start; its log ends: %r", name, text[-2000:])
        return startup_failure(text)

    def stop(self, name: str) -> None:
        pid = self._pid(name)
        if pid is not None:
            _kill_group(pid)
        shutil.rmtree(self._dir(name), ignore_errors=True)

    def list_names(self) -> list[str]:
        """Deployments this machine still has files or processes for."""
        if not self._work_dir.is_dir():
            return []
        return sorted(p.name for p in self._work_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def list_managed(self) -> list[ManagedDeployment]:
        """Deployment folders on this machine, with the job id and expiry written into them at start."""
        return [
            ManagedDeployment(
                name=name,
                job_id=_read_text(self._dir(name) / "job-id"),
                expires_at=_read_float(self._dir(name) / "expires-at"),
            )
            for name in self.list_names()
        ]

    def memory_bytes(self, name: str) -> int:
        """Resident memory of the deployment's server: every process of its process group (0 when it is gone)."""
        pid = self._pid(name)
        total = 0
        for member, _state in _group_members(pid) if pid is not None else []:
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return total

    def has_exited(self, name: str) -> bool:
        """The server process of a deployment this worker started is gone (killed, crashed, out of memory)."""
        return (self._dir(name) / "pid").exists() and not self._alive(name)


def _local_deployment(name: str, settings: dict[str, object]) -> Deployment:
    """The endpoints of a local MLServer, from its settings.json."""
    return Deployment(
        name=name,
        base_url=f"http://127.0.0.1:{settings['http_port']}",
        model_name=name,
        grpc_target=f"127.0.0.1:{settings['grpc_port']}",
    )


# Exceptions that say only that something else went wrong: a start-up log's real cause is another one.
_SECONDARY = ("CancelledError", "KeyboardInterrupt", "SystemExit")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure)\b(?::.*)?$")


# What startup_failure says of a server whose log names no exception: killed from outside (SIGKILL, the OOM killer)
# rather than refused by the model, so a new server may well start.
UNNAMED_EXIT = "it exited without naming an exception (the worker's log has the end of its output)"


def startup_failure(log_text: str) -> str:
    """Why a model server failed to start, from its log: the exception the model raised, as `Type: message`.

    MLServer logs the model's own exception (an unpicklable class, a missing package) in a traceback, then shuts
    down, often with a second, meaningless one (CancelledError). The last exception that is not one of those is
    the cause. Only that line reaches the job, bounded (reported_error); the rest of the log is the model's output
    and goes to the worker's log only.
    """
    lines = log_text.strip().splitlines()
    causes = []
    in_traceback = False
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            in_traceback = False
            if _EXCEPTION_LINE.match(line.strip()):
                causes.append(line.strip())
    real = [c for c in causes if not c.split(":")[0].endswith(_SECONDARY)]
    if causes:
        kind, _, message = (real or causes)[-1].partition(":")
        return reported_error(kind, message)
    return UNNAMED_EXIT


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _read_float(path: Path) -> float | None:
    text = _read_text(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


# MLServer pins a fastapi the API cannot use, so bootstrap --dev gives it a venv of its own beside the project's.
SERVER_VENV_BIN = Path(__file__).resolve().parents[3] / ".venv-server" / "bin"


def find_server_executable(name: str) -> str:
    """name on PATH, beside this Python (a virtualenv's bin/ is often not on PATH), or in the project's .venv-server."""
    found = (
        shutil.which(name)
        or shutil.which(name, path=str(Path(sys.executable).parent))
        or shutil.which(name, path=str(SERVER_VENV_BIN))
    )
    if found is None:
        raise DeploymentFailed(
            f"cannot find the model server executable {name!r}; run `bash scripts/bootstrap.sh --dev` "
            "(it builds .venv-server) or set RETRO_MLSERVER_EXECUTABLE"
        )
    return found


def _kill_group(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after the grace period."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not _group_running(pid):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    _reap(pid)


def _group_members(pgid: int) -> list[tuple[int, str]]:
    """The processes of a process group, each with its state letter (Z: a zombie), from /proc."""
    return [(p.pid, p.state) for p in proc_stats() if p.pgrp == pgid]


def _group_running(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: one whose parent is not this process (the
    sandbox's inner bwrap, re-parented to a child subreaper above this process when the outer one exits first) is
    not ours to reap, and waiting on it would wait out the whole grace period."""
    return any(state != "Z" for _pid, state in _group_members(pgid))


def _reap(pid: int) -> None:
    """Collect the exit status of every child of ours in the server's process group (pid is its leader), so none
    lingers as a zombie: a zombie still counts as a member of the group, and the wait in _kill_group would run out
    its grace period. Beside the server itself, a process that is a child subreaper (bench/teardown.py) inherits
    the sandbox's inner processes when bwrap exits before them."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-pid, os.WNOHANG)[0]:
            pass
