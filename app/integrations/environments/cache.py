"""Model environments: the Python packages a model version was logged with, rebuilt with uv on this worker.

MLflow logs a model's environment next to it: `python_env.yaml` (the Python version and `-r requirements.txt`)
and `conda.yaml`. An old model loaded by today's packages may fail to unpickle or, worse, load and score
differently, so the model server runs from a virtualenv holding the model's own pins plus the newest MLServer
release that resolves with them (`uv pip compile`, newest release first).

Environments are cached on the worker under RETRO_ENV_CACHE_DIR, one folder per hash of the interpreter version
and the resolved pins:
    <cache>/<key>/venv/          the virtualenv
    <cache>/<key>/requirements.lock   what was installed, pinned (kept with each job's results too)
    <cache>/<key>/env.json       python, server version, size, when built
    <cache>/<key>/ready          written last: a folder without it is a build that did not finish
    <cache>/<key>/in-use         shared-locked (flock) by every job and model server using the environment
    <cache>/<key>.lock           exclusive-locked while the environment is built or removed
    <cache>/resolutions/<hash>.json  a model's requirements -> the pins they resolved to, so a warm start
                                 needs neither the index nor the resolver
Concurrent jobs that need the same environment build it once (the first takes the .lock, the others wait for it
and find it ready). The cache is bounded by RETRO_ENV_CACHE_MAX_GB: least recently used environments go first,
never one a job or a model server holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from app.config import Settings
from app.core.records import EnvironmentRecord
from app.errors import EnvironmentFailed
from app.integrations.environments.requirements_policy import (
    check_python_version,
    check_requirement,
    has_control_character,
    shown,
)
from app.integrations.environments.sandbox import (
    UV_ENV_ALLOWED,
    ModelSandbox,
    SandboxUnavailable,
    model_environment,
    python_roots,
)

log = logging.getLogger(__name__)

SERVER_PACKAGES = ("mlserver", "mlserver-mlflow")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)")
_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class ModelRequirements:
    """What a model version asks for, read from the environment files MLflow logged with it."""

    python: str  # "3.11.7" as logged
    requirements: tuple[str, ...]  # requirement lines (pip syntax)
    constraints: tuple[str, ...] = ()
    source: str = "python_env.yaml"


@dataclass(frozen=True)
class Interpreter:
    """A Python on this worker."""

    path: str
    version: str  # "3.11.7"

    @property
    def minor(self) -> tuple[int, int]:
        return _minor(self.version)


@dataclass(frozen=True)
class ModelEnvironment:
    """A model's environment as resolved (and, on a worker, built): what the model server runs from."""

    key: str  # hash of the interpreter version and the pins: the cache folder's name
    python: str  # the interpreter's version, e.g. "3.11.7"
    python_requested: str  # what the model was logged with
    server_version: str  # the MLServer release in the environment
    lock: str  # the resolved requirements, one pin per line
    path: str = ""  # the environment's folder on this worker ("" where it was not built here)
    warnings: tuple[str, ...] = ()
    reused: bool = False  # found in the cache rather than built by this job

    @property
    def venv(self) -> Path:
        return Path(self.path) / "venv"

    @property
    def python_executable(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def mlserver_executable(self) -> str:
        return str(self.venv / "bin" / "mlserver")

    def packages(self) -> dict[str, str]:
        """The pinned packages, by name."""
        return parse_pins(self.lock)

    def to_record(self) -> EnvironmentRecord:
        """What the job, its manifest and its page show."""
        return EnvironmentRecord(
            key=self.key,
            python=self.python,
            python_requested=self.python_requested,
            server_version=self.server_version,
            packages=self.packages(),
            warnings=list(self.warnings),
            reused=self.reused,
        )


def parse_pins(lock: str) -> dict[str, str]:
    """name -> version of every `name==version` line (uv pip compile's output)."""
    pins = {}
    for line in lock.splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _minor(version: str) -> tuple[int, int]:
    m = _VERSION.match(version.strip())
    if not m:
        raise ValueError(f"not a Python version: {version!r}")
    return int(m.group(1)), int(m.group(2))


# Reading what the model asks for.


def read_requirements(model_dir: Path, *, what: str) -> ModelRequirements:
    """The Python version and requirements MLflow logged with the model (python_env.yaml, else conda.yaml).

    Every entry is checked against the requirements policy (app/integrations/environments/requirements_policy.py): a model may
    ask only for named packages from the configured index.
    """
    python_env = model_dir / "python_env.yaml"
    if python_env.is_file():
        doc = _yaml(python_env)
        python = str(doc.get("python") or "")
        lines: list[str] = []
        constraints: list[str] = []
        for dep in doc.get("dependencies") or []:
            _add_requirement(str(dep), model_dir, lines, constraints)
        if not python:
            raise EnvironmentFailed(f"{what}: python_env.yaml names no Python version")
        return ModelRequirements(
            python=check_python_version(python, what=what),
            requirements=tuple(lines),
            constraints=tuple(constraints),
            source="python_env.yaml",
        )
    conda = model_dir / "conda.yaml"
    if conda.is_file():
        python, lines = "", []
        for dep in _yaml(conda).get("dependencies") or []:
            if isinstance(dep, str) and re.match(r"^python\s*[=<>]", dep):
                python = re.sub(r"^python\s*=*\s*", "", dep)
            elif isinstance(dep, dict):
                for pip_dep in dep.get("pip") or []:
                    _add_requirement(str(pip_dep), model_dir, lines, [])
        if not python:
            raise EnvironmentFailed(f"{what}: conda.yaml names no Python version")
        return ModelRequirements(
            python=check_python_version(python, what=what), requirements=tuple(lines), source="conda.yaml"
        )
    raise EnvironmentFailed(
        f"{what} was logged without python_env.yaml or conda.yaml, so its environment cannot be rebuilt; "
        "log it again with a recent mlflow, or set RETRO_MODEL_ENV=worker to serve it from the worker's packages"
    )


def _yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EnvironmentFailed(f"cannot read the model's {path.name}: {exc}") from exc
    if not isinstance(doc, dict):
        raise EnvironmentFailed(f"the model's {path.name} is not a mapping")
    return doc


_MAX_INCLUDES = 20  # -r/-c files read for one model: a file that names itself must not loop


def _add_requirement(
    line: str, model_dir: Path, lines: list[str], constraints: list[str], *, included: list[Path] | None = None
) -> None:
    """One dependency entry, checked: `-r file` and `-c file` are read from the model's folder, comments dropped."""
    if has_control_character(line.rstrip("\r")):  # before anything is split off: a newline inside is refused
        check_requirement(line)
    line = line.rstrip("\r").split(" #", 1)[0].strip()
    if not line or line.startswith("#"):
        return
    included = [] if included is None else included
    for flag, into in (("-r", lines), ("-c", constraints)):
        if line.startswith(flag + " ") or (line.startswith(flag) and not line.startswith(flag + "-")):
            name = line[len(flag) :].strip()
            path = (model_dir / name).resolve()
            if model_dir.resolve() not in path.parents or not path.is_file():
                raise EnvironmentFailed(f"the model's environment refers to {shown(name)}, which is not in the model")
            included.append(path)
            if len(included) > _MAX_INCLUDES:
                raise EnvironmentFailed(f"the model's environment includes more than {_MAX_INCLUDES} files")
            # Split on newlines only, as uv does: any other line break or control character is refused.
            for sub in path.read_text(encoding="utf-8-sig", errors="replace").split("\n"):
                _add_requirement(sub, model_dir, into, constraints, included=included)
            return
    lines.append(check_requirement(line))


# Finding an interpreter.


def discover_pythons(search: Sequence[str] = ()) -> list[Interpreter]:
    """The Pythons on this worker: RETRO_ENV_PYTHONS (paths or globs) if set, else those on PATH and pyenv's."""
    candidates: list[str] = []
    if search:
        for pattern in search:
            candidates += sorted(str(p) for p in Path("/").glob(pattern.lstrip("/"))) if "*" in pattern else [pattern]
    else:
        for folder in os.environ.get("PATH", "").split(os.pathsep):
            if folder and Path(folder).is_dir() and "shims" not in folder:  # pyenv's shims are not interpreters
                candidates += sorted(
                    str(p) for p in Path(folder).glob("python3*") if re.fullmatch(r"python3(\.\d+)?", p.name)
                )
        pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
        candidates += sorted(str(p) for p in pyenv.glob("*/bin/python3"))
        candidates.append(getattr(sys, "_base_executable", sys.executable))
    found: dict[str, Interpreter] = {}
    for path in candidates:
        real = os.path.realpath(path)
        if real in found or not os.access(real, os.X_OK):
            continue
        version = _interpreter_version(real)
        if version:
            found[real] = Interpreter(path=real, version=version)
    return sorted(found.values(), key=lambda i: tuple(int(p) for p in i.version.split(".")))


@lru_cache(maxsize=64)
def _interpreter_version(path: str) -> str | None:
    try:
        out = subprocess.run(
            [path, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = out.stdout.strip()
    return version if out.returncode == 0 and _VERSION.match(version) else None


def choose_python(requested: str, available: Sequence[Interpreter], *, nearest: bool) -> tuple[Interpreter, str | None]:
    """The interpreter for a model logged with Python `requested`, and a warning when it is not the same minor."""
    want = _minor(requested)
    same = [i for i in available if i.minor == want]
    if same:
        exact = [i for i in same if i.version == requested]
        return (exact or same)[-1], None
    names = ", ".join(i.version for i in available) or "none"
    if not nearest or not available:
        raise EnvironmentFailed(
            f"the model was logged with Python {requested} and this worker has no Python {want[0]}.{want[1]} "
            f"(it has: {names}); install Python {want[0]}.{want[1]} on the worker (or list it in "
            "RETRO_ENV_PYTHONS), or set RETRO_ENV_NEAREST_PYTHON=true to use the nearest minor version"
        )
    best = min(available, key=lambda i: (abs(i.minor[1] - want[1]) if i.minor[0] == want[0] else 99, -i.minor[1]))
    if best.minor[0] != want[0]:
        raise EnvironmentFailed(f"the model was logged with Python {requested}; this worker has only {names}")
    return (
        best,
        f"the model was logged with Python {requested}; its environment uses Python {best.version}, the nearest on this worker",
    )


# Resolving and building.


@dataclass
class EnvironmentCache:
    """Builds model environments with uv and keeps them, bounded, under one folder."""

    root: Path
    uv: str = "uv"
    server_versions: tuple[str, ...] = ("1.7.1",)
    constraints: tuple[str, ...] = ()
    max_bytes: int = 20 * 2**30
    pythons: tuple[str, ...] = ()
    nearest_python: bool = False
    timeout_s: float = 1800.0
    sandbox: ModelSandbox = field(default_factory=ModelSandbox)
    index_url: str = ""  # the index uv resolves and installs from; "" keeps uv's own (UV_DEFAULT_INDEX, PyPI)
    build_allowed: tuple[str, ...] = ()  # packages that may be built from an sdist; every other one is wheels only
    _uv_path: str | None = field(default=None, init=False, repr=False)

    def prepare(
        self, requirements: ModelRequirements, *, progress: Callable[[str], None] = lambda _: None
    ) -> ModelEnvironment:
        """The model's environment, from the cache or built now; the caller holds it with hold()."""
        progress(f"finding a Python {requirements.python} on this worker")
        interpreter, warning = choose_python(
            requirements.python, discover_pythons(self.pythons), nearest=self.nearest_python
        )
        lock, server = self.resolve(requirements, interpreter, progress=progress)
        key = hashlib.sha256(f"{interpreter.version}\n{lock}".encode()).hexdigest()[:20]
        env = ModelEnvironment(
            key=key,
            python=interpreter.version,
            python_requested=requirements.python,
            server_version=server,
            lock=lock,
            path=str(self.root / key),
            warnings=(warning,) if warning else (),
        )
        with self._locked(key):
            folder = self.root / key
            if (folder / "ready").is_file():
                (folder / "ready").touch()  # its mtime is when it was last used
                return replace(env, reused=True)
            progress(f"installing {len(parse_pins(lock))} packages with Python {interpreter.version}")
            self._build(folder, interpreter, lock, env)
        self.evict(keep=key)
        return env

    def resolve(
        self, requirements: ModelRequirements, interpreter: Interpreter, *, progress: Callable[[str], None]
    ) -> tuple[str, str]:
        """The model's requirements pinned with the newest model server release that resolves with them."""
        inputs = json.dumps(
            [
                interpreter.version,
                requirements.requirements,
                requirements.constraints,
                self.constraints,
                self.server_versions,
                self.index_url,
                sorted(self.build_allowed),
            ]
        )
        known = self.root / "resolutions" / f"{hashlib.sha256(inputs.encode()).hexdigest()[:24]}.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = json.loads(known.read_text())
            return str(saved["lock"]), str(saved["server_version"])
        progress("resolving the model's requirements")
        own = self._compile(list(requirements.requirements), requirements, interpreter)
        if own.returncode != 0:
            raise EnvironmentFailed(
                f"the model's requirements cannot be installed with Python {interpreter.version}: "
                + _uv_reason(own.stderr, build_allowed=self.build_allowed)
            )
        reasons = []
        for version in self.server_versions:
            progress(f"resolving the model's requirements with MLServer {version}")
            server = [f"{name}=={version}" for name in SERVER_PACKAGES]
            out = self._compile([*requirements.requirements, *server], requirements, interpreter)
            if out.returncode == 0:
                known.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(known, json.dumps({"lock": out.stdout, "server_version": version}))
                return out.stdout, version
            reasons.append(f"MLServer {version}: {_uv_reason(out.stderr, build_allowed=self.build_allowed)}")
        raise EnvironmentFailed(
            "no MLServer release resolves with the model's requirements (RETRO_ENV_SERVER_VERSIONS): "
            + "; ".join(reasons)
        )

    def _compile(
        self, lines: list[str], requirements: ModelRequirements, interpreter: Interpreter
    ) -> subprocess.CompletedProcess[str]:
        constraints = [*requirements.constraints, *self.constraints]
        self.root.mkdir(parents=True, exist_ok=True)
        with _scratch(self.root, "constraints", "\n".join(constraints) + "\n") as constraint_file:
            return self._uv(
                "pip",
                "compile",
                "-",
                "--quiet",
                "--no-header",
                "--no-annotate",
                *build_options(self.build_allowed),
                "--python",
                interpreter.path,
                "--constraint",
                str(constraint_file),
                input="\n".join(lines) + "\n",
                readable=(constraint_file, *python_roots(interpreter.path)),
            )

    def _build(self, folder: Path, interpreter: Interpreter, lock: str, env: ModelEnvironment) -> None:
        started = time.monotonic()
        shutil.rmtree(folder, ignore_errors=True)  # a build that died half-way
        folder.mkdir(parents=True)
        (folder / "requirements.lock").write_text(lock)
        try:
            python = python_roots(interpreter.path)
            out = self._uv(
                "venv",
                "--quiet",
                "--python",
                interpreter.path,
                str(folder / "venv"),
                readable=python,
                writable=[folder],
            )
            sync = [
                "pip",
                "sync",
                "--quiet",
                *build_options(self.build_allowed),
                # Compiled once here: model servers and in-process references never write bytecode
                # (PYTHONDONTWRITEBYTECODE in the image), so each start would compile mlflow, pandas and
                # scikit-learn again (a local start: ~12 s without, ~7 s with).
                "--compile-bytecode",
                "--python",
                str(folder / "venv" / "bin" / "python"),
                str(folder / "requirements.lock"),
            ]
            if out.returncode == 0:
                out = self._uv(*sync, readable=python, writable=[folder])
            if out.returncode != 0 and "there is no version of" in out.stderr:
                # The index listed the version while resolving and not while installing: a release being published
                # or an index page cached from before it (seen once in a test run). Asked again, revalidated, once.
                log.warning("installing environment %s: the index lost a resolved version; trying again", env.key)
                out = self._uv(*sync, "--refresh", readable=python, writable=[folder])
            if out.returncode != 0:
                raise EnvironmentFailed(
                    "installing the model's environment failed: "
                    + _uv_reason(out.stderr, build_allowed=self.build_allowed)
                )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        meta = {
            "python": env.python,
            "python_requested": env.python_requested,
            "server_version": env.server_version,
            "size_bytes": _size(folder),
            "built_at": time.time(),
            "build_s": round(time.monotonic() - started, 1),
        }
        (folder / "env.json").write_text(json.dumps(meta))
        (folder / "ready").write_text("")
        log.info(
            "built model environment %s (Python %s, MLServer %s) in %.1f s",
            env.key,
            env.python,
            env.server_version,
            meta["build_s"],
        )

    def _uv(
        self,
        *args: str,
        input: str | None = None,
        readable: Sequence[Path] = (),
        writable: Sequence[Path] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run uv as a model process: a minimal environment, in the sandbox (it may build allow-listed sdists)."""
        if self._uv_path is None:
            self._uv_path = shutil.which(self.uv) or shutil.which(self.uv, path=str(Path(sys.executable).parent))
            if self._uv_path is None:
                raise EnvironmentFailed(f"cannot find uv ({self.uv!r}) on this worker; set RETRO_ENV_UV")
        cache = uv_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="retro-uv-") as scratch:
            home = Path(scratch)
            extra = {"UV_CACHE_DIR": str(cache)}
            if self.index_url:
                extra["UV_DEFAULT_INDEX"] = self.index_url
            env = model_environment(home=home, allowed=UV_ENV_ALLOWED, extra=extra)
            if self.index_url:
                env.pop("UV_INDEX_URL", None)  # the setting wins over the worker's own uv index
            uv = os.path.realpath(self._uv_path)  # what the sandbox sees is the file, not a symlink to it
            argv = self._sandboxed(
                [uv, *args],
                cwd=home,
                readable=[Path(uv), *readable],
                writable=[home, cache, *writable],
            )
            try:
                return subprocess.run(
                    argv, input=input, capture_output=True, text=True, timeout=self.timeout_s, env=env, cwd=home
                )
            except subprocess.TimeoutExpired as exc:
                raise EnvironmentFailed(f"uv {args[0]} {args[1]} took longer than {self.timeout_s:.0f} s") from exc

    def _sandboxed(
        self, argv: list[str], *, cwd: Path, readable: Sequence[Path], writable: Sequence[Path]
    ) -> list[str]:
        try:
            return self.sandbox.command(argv, cwd=cwd, readable=readable, writable=writable)
        except SandboxUnavailable as exc:
            raise EnvironmentFailed(str(exc)) from exc

    # Holding, listing and evicting.

    @contextlib.contextmanager
    def _locked(self, key: str, *, wait: bool = True) -> Iterator[bool]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def cached(self) -> list[CachedEnvironment]:
        """Every finished environment in the cache, least recently used first."""
        found = []
        if not self.root.is_dir():
            return []
        for folder in self.root.iterdir():
            if not (folder / "ready").is_file():
                continue
            try:
                meta = json.loads((folder / "env.json").read_text())
            except (OSError, ValueError):
                meta = {}
            found.append(
                CachedEnvironment(
                    key=folder.name,
                    python=str(meta.get("python", "?")),
                    server_version=str(meta.get("server_version", "?")),
                    size_bytes=int(meta.get("size_bytes", 0)),
                    last_used=(folder / "ready").stat().st_mtime,
                    in_use=_held(folder / "in-use"),
                )
            )
        return sorted(found, key=lambda e: e.last_used)

    def evict(self, *, keep: str | None = None, max_bytes: int | None = None) -> list[str]:
        """Remove least recently used environments until the cache fits; never one in use or being built."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        envs = self.cached()
        total = sum(e.size_bytes for e in envs)
        removed = []
        for env in envs:
            if total <= limit:
                break
            if env.key == keep or env.in_use:
                continue
            if self.remove(env.key):
                total -= env.size_bytes
                removed.append(env.key)
        return removed

    def remove(self, key: str) -> bool:
        """Remove one environment unless a job or model server holds it; whether it went."""
        folder = self.root / key
        with self._locked(key, wait=False) as mine:
            if not mine:
                return False
            fd = os.open(folder / "in-use", os.O_RDWR | os.O_CREAT, 0o644) if folder.is_dir() else None
            try:
                if fd is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        return False
                (folder / "ready").unlink(missing_ok=True)  # from here on it is a half-made folder
                shutil.rmtree(folder, ignore_errors=True)
                log.info("removed model environment %s", key)
                return True
            finally:
                if fd is not None:
                    os.close(fd)


@contextlib.contextmanager
def hold(env: ModelEnvironment) -> Iterator[int]:
    """Hold the environment against eviction; the yielded descriptor may be passed on to a model server."""
    fd = os.open(Path(env.path) / "in-use", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)


@dataclass(frozen=True)
class CachedEnvironment:
    """One environment in the cache, as `retrotest envs list` shows it."""

    key: str
    python: str
    server_version: str
    size_bytes: int
    last_used: float
    in_use: bool


def _held(path: Path) -> bool:
    """Whether anyone holds a shared lock on the file (a job or a model server using the environment)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def build_options(allowed: Sequence[str]) -> list[str]:
    """uv's options for wheels only, except the packages an administrator allowed to be built from source."""
    if not allowed:
        return ["--no-build"]
    return ["--only-binary", ":all:", *(arg for name in allowed for arg in ("--no-binary", name))]


def uv_cache_dir() -> Path:
    """The uv cache the worker's builds share (UV_CACHE_DIR, else uv's default under XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get("UV_CACHE_DIR"):
        return Path(os.environ["UV_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uv"


_NO_BUILD = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==\S+ has no usable wheels")


def _uv_reason(stderr: str, *, build_allowed: Sequence[str] = ()) -> str:
    """uv's explanation, without its hints and colour, on one line; a package with no wheel is named first."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in stderr.strip().splitlines()]
    kept = [line for line in lines if line and not line.startswith("hint:")]
    text = " ".join(kept)
    text = (text[:1500] + " ...") if len(text) > 1500 else text or "uv gave no reason"
    sdist_only = _NO_BUILD.search(text)
    if sdist_only:
        return (
            f"{sdist_only.group(1)} has no wheel for this Python and platform, and retrotest installs wheels only "
            "(building a package from source runs its code); an administrator may allow it in "
            f"RETRO_ENV_BUILD_ALLOWED_PACKAGES (now: {', '.join(build_allowed) or 'none'}). uv: {text}"
        )
    return text


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")  # jobs may resolve at once
    tmp.write_text(text)
    tmp.replace(path)


@contextlib.contextmanager
def _scratch(root: Path, name: str, text: str) -> Iterator[Path]:
    path = root / f".{name}.{os.getpid()}.{time.monotonic_ns()}.txt"
    path.write_text(text)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def environment_cache(settings: Settings) -> EnvironmentCache | None:
    """The worker's cache of model environments; None when models are served from the worker's own packages."""
    if settings.model_env == "worker":
        return None
    return EnvironmentCache(
        root=settings.resolved_env_cache_dir(),
        uv=settings.env_uv,
        server_versions=tuple(settings.env_server_versions),
        constraints=tuple(settings.env_constraints),
        max_bytes=int(settings.env_cache_max_gb * 2**30),
        pythons=tuple(settings.env_pythons),
        nearest_python=settings.env_nearest_python,
        timeout_s=settings.env_build_timeout_s,
        sandbox=ModelSandbox(settings.model_sandbox),
        index_url=settings.env_index_url,
        build_allowed=tuple(settings.env_build_allowed_packages),
    )
