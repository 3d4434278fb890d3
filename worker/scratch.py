"""Each worker process's temporary files under RETRO_VAR_DIR/tmp, in a folder named for its host and pid.

A job's model copy (`retro-model-*`, often gigabytes) and multiprocessing's `pymp-*` folders go through `tempfile`;
in the system's TMPDIR a killed process left them there for good (issue 32). Here each pool process takes a folder
of its own as `tempfile.tempdir`, and whoever starts next on the host removes the folders of processes that are
gone: a killed pool process's copy goes when its replacement starts, a whole worker's when it is restarted.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def scratch_root(var_dir: Path) -> Path:
    return var_dir.resolve() / "tmp"


def take_scratch(var_dir: Path, *, host: str | None = None, pid: int | None = None) -> Path:
    """This process's folder for temporary files, made now and made tempfile's default; the dead's are swept."""
    host = host or socket.gethostname()
    pid = pid or os.getpid()
    sweep_scratch(var_dir, host=host)
    folder = scratch_root(var_dir) / f"{host}-{pid}"
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(folder)
    return folder


def sweep_scratch(var_dir: Path, *, host: str | None = None) -> list[Path]:
    """Remove the folders of this host's processes that no longer run; returns what was removed."""
    host = host or socket.gethostname()
    root = scratch_root(var_dir)
    if not root.is_dir():
        return []
    removed = []
    for folder in root.iterdir():
        owner, _, pid = folder.name.rpartition("-")
        if owner != host or not pid.isdigit() or _running(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info("removed %d temporary folder(s) of worker processes that are gone", len(removed))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process of that pid: not ours to judge
    try:  # a zombie has exited: its folder is free
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
