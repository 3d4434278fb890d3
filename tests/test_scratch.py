"""Worker processes' temporary files (worker/scratch.py): each in a folder of its own under RETRO_VAR_DIR/tmp, and
what a process that is gone left there removed by the next one to start. No service: real processes only."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from worker.scratch import scratch_root, sweep_scratch, take_scratch


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_process_takes_its_own_folder_and_the_next_one_removes_what_a_killed_one_left(tmp_path: Path) -> None:
    saved = tempfile.tempdir
    try:
        # A pool process killed while scoring: its model copy and multiprocessing folder stay behind.
        dead = _dead_pid()
        killed = scratch_root(tmp_path) / f"host-a-{dead}"
        (killed / "retro-model-x1y2" / "model").mkdir(parents=True)
        (killed / "retro-model-x1y2" / "model" / "model.pkl").write_bytes(b"\0" * 1024)
        (killed / "pymp-abc").mkdir()
        other_host = scratch_root(tmp_path) / f"host-b-{dead}"  # another host's process: not ours to judge
        other_host.mkdir()

        mine = take_scratch(tmp_path, host="host-a")
        assert mine == scratch_root(tmp_path) / f"host-a-{os.getpid()}"
        assert tempfile.gettempdir() == str(mine)
        with tempfile.TemporaryDirectory(prefix="retro-model-") as copy:
            assert Path(copy).parent == mine
        assert not killed.exists() and other_host.exists()
        # A live process's folder is never swept.
        assert sweep_scratch(tmp_path, host="host-a") == [] and mine.exists()
    finally:
        tempfile.tempdir = saved
