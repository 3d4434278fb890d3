"""How every process that reads or runs a model's code starts: a minimal environment and, where it works, a sandbox.

A model version's code (its pickles, its `predict`, a wheel's `.pth` file) and its requirements are written by
its author, not by a retrotest administrator (docs/security.md). The processes that run them (uv resolving and
installing the model's environment, the in-process reference scoring, the local model server) therefore never
inherit the worker's environment: they get the variables of MODEL_ENV_ALLOWED and those their caller adds, a
HOME of their own, and nothing of RETRO_*, cloud or Kubernetes credentials, the broker, the database or MLflow.

With RETRO_MODEL_SANDBOX=auto (the default) or bwrap they also run under bubblewrap: new user, PID, IPC and UTS
namespaces as an unprivileged user (65534), a filesystem of /usr, a few files of /etc and only the folders the
caller names, so neither the worker's /proc/<pid>/environ nor its configuration files are in reach. `auto`
falls back to the minimal environment alone where bwrap is missing or cannot create namespaces (the worker's
log says so once); `bwrap` refuses to run a model without it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

SandboxMode = Literal["auto", "bwrap", "none"]
SANDBOX_UID = 65534  # nobody, inside the sandbox's own user namespace

# What a model process may inherit from the worker: locale, time zone and how Python writes, nothing else.
MODEL_ENV_ALLOWED = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "TZ",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "PYTHONIOENCODING",
)
MODEL_ENV_PREFIXES = ("LC_",)
# The local model server also takes MLServer's own settings (MLSERVER_*) from the worker's environment.
SERVER_ENV_PREFIXES = ("MLSERVER_",)
# uv also takes the index, cache, TLS and proxy settings an administrator gave the worker.
UV_ENV_ALLOWED = (
    "UV_INDEX_URL",
    "UV_DEFAULT_INDEX",
    "UV_INDEX",
    "UV_EXTRA_INDEX_URL",
    "UV_INDEX_STRATEGY",
    "UV_NATIVE_TLS",
    "UV_INSECURE_HOST",
    "UV_HTTP_TIMEOUT",
    "UV_CONCURRENT_DOWNLOADS",
    "UV_OFFLINE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
)

# The files of /etc a Python process needs (names, TLS roots, time zone, the loader); never all of /etc, where a
# worker's configuration and env files may live.
_ETC = (
    "alternatives",
    "ca-certificates",
    "gai.conf",
    "group",
    "host.conf",
    "hosts",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "pki",
    "resolv.conf",
    "ssl",
    "timezone",
    "uv",
)
_ROOT_LINKS = ("bin", "lib", "lib32", "lib64", "libx32", "sbin")


def model_environment(
    *, home: Path, allowed: Iterable[str] = (), prefixes: Iterable[str] = (), extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a model process: the allowed variables of the worker's, a HOME and TMPDIR of its own."""
    names = {*MODEL_ENV_ALLOWED, *allowed}
    starts = (*MODEL_ENV_PREFIXES, *prefixes)
    env = {k: v for k, v in os.environ.items() if k in names or k.startswith(starts)}
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env |= {"HOME": str(home), "TMPDIR": str(tmp), "PATH": env.get("PATH") or "/usr/local/bin:/usr/bin:/bin"}
    return env | dict(extra or {})


def python_roots(executable: str | Path) -> list[Path]:
    """The folders a Python program needs to run: its virtualenv (or prefix) and its base interpreter's prefix."""
    path = Path(executable)
    roots = [path.parent.parent]
    python = path.parent / "python"
    for candidate in (python, path):
        if candidate.exists():
            roots.append(Path(os.path.realpath(candidate)).parent.parent)
    return list(dict.fromkeys(roots))


@dataclass(frozen=True)
class ModelSandbox:
    """Wraps a model process's command in bubblewrap (RETRO_MODEL_SANDBOX), or leaves it as it is."""

    mode: SandboxMode = "auto"
    bwrap: str = "bwrap"

    def active(self) -> bool:
        """Whether model processes run under bwrap."""
        if self.mode == "none":
            return False
        problem = _bwrap_problem(self.bwrap)
        if problem is None:
            return True
        if self.mode == "bwrap":
            raise SandboxUnavailable(f"RETRO_MODEL_SANDBOX=bwrap, but bubblewrap does not work here: {problem}")
        _warn_once(problem)
        return False

    def command(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        readable: Iterable[Path] = (),
        writable: Iterable[Path] = (),
        network: bool = True,
        die_with_parent: bool = True,
    ) -> list[str]:
        """argv as run in the sandbox, seeing only the system, `readable` (read-only) and `writable`; argv if none."""
        if not self.active():
            return list(argv)
        mounts: list[tuple[str, Path]] = [("--ro-bind", p) for p in readable] + [("--bind", p) for p in writable]
        args = [_bwrap_path(self.bwrap), *_base_args(network=network)]
        if die_with_parent:
            args.append("--die-with-parent")
        # Parents before children, so a folder inside another one (a model inside a scratch folder) stays visible.
        for flag, path in sorted(mounts, key=lambda m: len(m[1].parts)):
            args += [flag, str(path), str(path)]
        return [*args, "--chdir", str(cwd), "--", *argv]


class SandboxUnavailable(RuntimeError):
    """RETRO_MODEL_SANDBOX=bwrap and bubblewrap cannot run here."""


def _base_args(*, network: bool) -> list[str]:
    args = ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not network:
        args.append("--unshare-net")
    args += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--ro-bind", "/usr", "/usr"]
    for name in _ROOT_LINKS:
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    for name in _ETC:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    return [*args, "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]


def _bwrap_path(name: str) -> str:
    return shutil.which(name) or name


@lru_cache(maxsize=4)
def _bwrap_problem(name: str) -> str | None:
    """Why bwrap cannot sandbox a process on this machine, or None when it can (tried once per process)."""
    path = shutil.which(name)
    if path is None:
        return f"{name!r} is not installed (Debian: apt-get install bubblewrap)"
    try:
        out = subprocess.run(
            [path, *_base_args(network=False), "--", "/bin/true"],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{path} did not run: {exc}"
    if out.returncode != 0:
        return f"{path} failed: {out.stderr.strip()[:300] or out.returncode}"
    return None


@lru_cache(maxsize=4)
def _warn_once(problem: str) -> None:
    log.warning("model processes run without a sandbox (minimal environment only): %s", problem)


ERROR_CHARS = 300  # an error a model process reports reaches the job (and the UI) at most this long


def reported_error(kind: object, message: object) -> str:
    """`Type: message` of an exception a model process reported: one line, bounded, control characters dropped."""
    name = "".join(c for c in str(kind) if c.isalnum() or c in "._")[:80] or "Error"
    text = " ".join("".join(c if c.isprintable() else " " for c in str(message)).split())
    line = f"{name}: {text}" if text else name
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 4] + " ..."


def hide_process_environment() -> bool:
    """Make this process non-dumpable, so processes of the same user cannot read its /proc/<pid>/environ or memory.

    The worker calls it at start: where bubblewrap cannot run, a model process runs as the worker's user, and the
    kernel then refuses it the worker's environ (PR_SET_DUMPABLE, prctl(2); root's processes keep access). Whether
    it took effect; False where prctl is not available.
    """
    import ctypes

    pr_set_dumpable = 4
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(pr_set_dumpable, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
