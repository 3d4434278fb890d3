"""The job's state machine (app/core/transitions.py), without a database: the moves the pipeline makes."""

from __future__ import annotations

import uuid

import pytest

from app.core.jobs import RetroTest, State
from app.core.transitions import advance
from app.errors import Conflict


def _job(state: State) -> RetroTest:
    return RetroTest(id=uuid.uuid4(), state=state, stage_started={})


@pytest.mark.parametrize("down_while", [State.validating, State.scoring])
def test_a_model_server_that_goes_down_is_recreated_from_validating_or_scoring(down_while: State) -> None:
    """worker/pipeline.py _deploy_and_score re-enters deploying after ModelServerDown, which the reference check
    raises too (a server that stops answering while it scores the reference): that move must be allowed, or the
    job ends with an internal error instead of the server's own."""
    job = _job(down_while)
    advance(job, State.deploying)
    assert job.state == State.deploying and "deploying" in job.stage_started


def test_moves_the_pipeline_never_makes_are_refused() -> None:
    job = _job(State.validating)
    with pytest.raises(Conflict, match="cannot go from validating to publishing"):
        advance(job, State.publishing)
    done = _job(State.succeeded)
    with pytest.raises(Conflict):
        advance(done, State.deploying)
