"""The processes of this machine as /proc shows them: what a local model server's stop and the benchmarks' clean-up
walk to find a process group's members or a process's descendants."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str  # the state letter: R, S, D, ... Z for a zombie (exited, not yet reaped by its parent)
    ppid: int
    pgrp: int


def proc_stats() -> Iterator[ProcStat]:
    """Every process that /proc lists now; one that exits while it is read is left out."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name (field 2) is in parentheses and may hold spaces or ')': split after the last one.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            yield ProcStat(pid=int(entry.name), state=fields[0], ppid=int(fields[1]), pgrp=int(fields[2]))
        except (OSError, IndexError, ValueError):
            continue
