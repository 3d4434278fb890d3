"""A benchmark ends what it started on every path: a normal end, an error, Ctrl-C (SIGINT) or SIGTERM.

SIGINT and SIGTERM raise in the main thread, so the benchmark's own `finally` blocks stop what they hold (model
servers, a Thrift Server). Then every process still below the benchmark is ended: SIGTERM, a grace period, SIGKILL.
The benchmark is made a child subreaper (Linux prctl), so a model server whose parent was killed first (a child
process that `subprocess.run` killed on the interrupt) is re-parented to it, not to init, and is found too.
Issue 32: `python -m bench.e2e` interrupted with Ctrl-C left its MLServer running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

from app.integrations.deployers.procs import proc_stats

_PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def owned_processes(*, grace_s: float = 10.0) -> Iterator[None]:
    """Run the block with SIGINT/SIGTERM raising; whatever way it ends, end every process left below this one."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    raise_on_signals()
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        left = end_descendants(grace_s=grace_s)
        if left:
            print(f"stopped {len(left)} process(es) the benchmark left running: {sorted(left)}", flush=True)


def raise_on_signals() -> None:
    """SIGINT raises KeyboardInterrupt and SIGTERM SystemExit(143), once: later ones are ignored.

    A signal handler's exception lands wherever the main thread is; inside a weakref callback or a __del__ Python
    prints "Exception ignored in" and carries on (seen: a ThreadPoolExecutor's weakref callback swallowed a Ctrl-C,
    and the benchmark ran to its end). Such an interrupt is delivered again (sys.unraisablehook), so it ends the
    benchmark at the next place that can raise.
    """
    caught: list[int] = []

    def interrupted(signum: int, _frame: FrameType | None) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        caught[:] = [signum]
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = sys.unraisablehook

    def swallowed(unraisable: sys.UnraisableHookArgs) -> None:
        previous(unraisable)
        if caught and isinstance(unraisable.exc_value, (KeyboardInterrupt, SystemExit)):
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, interrupted)
            # From another thread, a moment later: sent now, it would be handled here, and swallowed again.
            threading.Timer(0.05, os.kill, (os.getpid(), caught.pop())).start()

    sys.unraisablehook = swallowed
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupted)


def end_descendants(*, grace_s: float) -> set[int]:
    """SIGTERM every process below this one, SIGKILL what is left after grace_s; returns the pids found."""
    found: set[int] = set()
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        _reap()
        alive = descendants(os.getpid())
        if not alive:
            return found
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for pid in alive - found if sig == signal.SIGTERM else alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        found |= alive
        time.sleep(0.1)


def descendants(pid: int) -> set[int]:
    """Live (not zombie) processes below pid, by their parent pids in /proc."""
    children: dict[int, list[int]] = {}
    for p in proc_stats():
        if p.state != "Z":
            children.setdefault(p.ppid, []).append(p.pid)
    below: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in below:
                below.add(child)
                todo.append(child)
    return below


def _reap() -> None:
    """Collect exited children (orphans re-parented here included), so they do not stay as zombies."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
