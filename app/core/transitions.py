"""The job's state machine: which moves are allowed, and the one function that makes them."""

from __future__ import annotations

from datetime import datetime

from app.clock import utcnow
from app.core.jobs import RUNNING_STATES, TERMINAL_STATES, RetroTest, State
from app.core.records import StageTimeline
from app.errors import Conflict
from app.i18n import _
from app.metrics import STAGE_SECONDS

# Allowed moves of the state machine; anything else is a bug or a race that must not win.
TRANSITIONS: dict[State, tuple[State, ...]] = {
    State.queued: (State.resolving, State.cancelled, State.failed),
    State.resolving: (State.extracting, State.cancelled, State.failed),
    # publishing: every chunk was scored by an earlier attempt; deploying: the worker's own packages serve the model
    State.extracting: (State.preparing_environment, State.deploying, State.publishing, State.cancelled, State.failed),
    State.preparing_environment: (State.deploying, State.cancelled, State.failed),
    State.deploying: (State.validating, State.cancelled, State.failed),
    # deploying: a server that went down while it scored the reference is re-created, as one that went down scoring
    State.validating: (State.scoring, State.deploying, State.cancelled, State.failed),
    State.scoring: (State.publishing, State.deploying, State.cancelled, State.failed),  # deploying: re-created
    State.publishing: (State.succeeded, State.cancelled, State.failed),
    State.succeeded: (),
    State.failed: (),
    State.cancelled: (),
}


def advance(job: RetroTest, to: State, *, error_code: str | None = None, error_message: str | None = None) -> None:
    """Move a job to a new state, recording when the stage started; refuse moves the machine does not allow."""
    restart = job.state in RUNNING_STATES and to == State.resolving  # a redelivered job starts its stages again
    if to not in TRANSITIONS[job.state] and not restart and to != job.state:
        raise Conflict(
            _("retro test {id} cannot go from {value} to {value2}").format(
                id=job.id, value=job.state.value, value2=to.value
            )
        )
    now = utcnow()
    _observe_stage(job, now)
    log = stage_log_of(job)
    job.state = to
    job.stage_started = {**(job.stage_started or {}), to.value: now.isoformat()}
    job.stage_log = [*log, [to.value, now.isoformat()]]
    if to in TERMINAL_STATES:
        job.finished_at = now
        job.error_code = error_code
        job.error_message = error_message


def _observe_stage(job: RetroTest, now: datetime) -> None:
    """Record how long the job spent in the stage it is leaving (queued or a running stage)."""
    started = timeline_of(job).latest_start(job.state.value) if job.state is not None else None
    if started is None or job.state in TERMINAL_STATES:
        return
    try:
        seconds = (now - datetime.fromisoformat(started)).total_seconds()
    except (TypeError, ValueError):
        return
    STAGE_SECONDS.labels(job.state.value).observe(max(0.0, seconds))


def timeline_of(job: RetroTest) -> StageTimeline:
    """When the job entered each stage (its stage log, or for a job from before the log its latest starts)."""
    return StageTimeline(log=job.stage_log, started=job.stage_started)


def stage_log_of(job: RetroTest) -> list[list[str]]:
    """The job's stage log so far; for a job from before the log, its latest start of each stage, in order."""
    return timeline_of(job).as_log()
