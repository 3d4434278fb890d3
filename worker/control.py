"""A running attempt's hold on its job: the lease, its heartbeat, cancel and the deadline.

One attempt at a time owns a job through `lease_token`. It renews `heartbeat_at` from a background thread; an
attempt whose heartbeat is older than RETRO_STALE_AFTER_S is presumed dead and the next delivery takes the lease.
Every checkpoint and the verdict are written only while the writer's lease is still the job's.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from app.clock import utcnow
from app.db import once_more_if_dropped
from app.errors import DeadlineExceeded, JobCancelled
from app.retro_tests.runs import Beat, Counts, LeaseLost

log = logging.getLogger(__name__)

__all__ = ["BeatWriter", "JobControl", "LeaseLost", "holder_is_dead", "this_process"]

# Writes one heartbeat: (live counters or None, whether to renew heartbeat_at) -> what the job row said.
# worker/run.py's beat, bound to the job and the lease.
BeatWriter = Callable[[Counts | None, bool], Beat]


class JobControl:
    """The running attempt's link to its job row: heartbeat, lease, cancel, deadline and progress.

    A background thread renews the heartbeat every heartbeat_interval_s while the attempt holds the lease,
    so a job in a long call (a model server starting, a COUNT over a quarter) is not taken for dead. A partition
    helper (heartbeat_s=None) only watches the lease: the heartbeat is its coordinator's to keep.
    """

    def __init__(
        self,
        *,
        write_beat: BeatWriter,
        job_id: uuid.UUID,
        lease: str,
        deadline: datetime,
        heartbeat_s: float | None,
        interval_s: float = 1.0,
    ) -> None:
        self._write_beat = write_beat
        self._job_id = job_id
        self.lease = lease
        self._deadline = deadline
        self._heartbeat_s = heartbeat_s
        self._interval_s = interval_s
        self._last = 0.0
        self._cancelled = False
        self._lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> JobControl:
        if self._heartbeat_s is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _beat(self) -> None:
        assert self._heartbeat_s is not None
        while not self._stop.wait(self._heartbeat_s):
            try:
                self._write(None)
            except Exception:
                log.warning("heartbeat of retro test %s failed; will try again", self._job_id, exc_info=True)

    def cancel_requested(self) -> bool:
        self._sync(None, force=False)
        return self._cancelled or self._lost

    def stop_now(self) -> bool:
        """Cancel asked or lease lost, read from the job row now (between retries of a failing request)."""
        self._sync(None, force=True)
        return self._cancelled or self._lost

    def check(self) -> None:
        """Raise if the attempt must stop: lease lost, cancel asked, deadline passed."""
        self._sync(None, force=False)
        self._raise_if_stopped()

    def progress(self, counts: Counts) -> None:
        """The job's live counters (at most once a second), then stop if the attempt must."""
        self._sync(counts, force=False)
        self._raise_if_stopped()

    def _raise_if_stopped(self) -> None:
        if self._lost:
            raise LeaseLost(f"retro test {self._job_id} was taken over by another attempt")
        if self._cancelled:
            raise JobCancelled("cancelled on request")
        if utcnow() > self._deadline:
            raise DeadlineExceeded(
                f"the job passed its deadline of {self._deadline:%Y-%m-%d %H:%M} UTC (RETRO_JOB_DEADLINE_S)"
            )

    def _sync(self, counts: Counts | None, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last < self._interval_s:
            return
        self._last = now
        self._write(counts)

    def _write(self, counts: Counts | None) -> None:
        once_more_if_dropped(lambda: self._beat_once(counts), what=f"retro test {self._job_id}")

    def _beat_once(self, counts: Counts | None) -> None:
        found = self._write_beat(counts, self._heartbeat_s is not None)
        self._lost = not found.held
        self._cancelled = found.cancel_requested


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_is_dead(holder: str | None) -> bool:
    """True only when the lease holder ran on this host and its process is gone (a killed pool process).

    Elsewhere, or when unsure, the heartbeat decides: a holder on another host is dead once it is stale.
    """
    host, _, pid = (holder or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed process its parent has not reaped yet is a zombie: dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
