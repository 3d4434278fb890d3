"""Benchmark: one job comparing two models against two one-model jobs run one after the other (issue 30), side by
side in one run.

    .venv/bin/python -m bench.compare [--rows 1000000] [--repeat 3] [--batch 5000] [--dir D]

Two versions of the demo model (churn and churn_challenger, trained alike) score the same synthetic history of
`--rows` rows over 10 days. Each round runs, in a worker-like process, as a worker runs them:
  compare   one job of both models: the history read once, both servers started side by side, every batch
            scored by both, one result file and the comparison report
  one+one   a job of churn, then a job of churn_challenger: the history read twice, a server started for each in
            turn, two result files and two reports
Each job is submitted through the service as the API submits it and timed from its creation to its success; the
rounds alternate the order of the two, and the ratio compare / (one + one) of each round is printed with their
median. Model servers run from the worker's packages (no environment is built), so the times are the pipeline's.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench import e2e
from bench.teardown import owned_processes

MODELS = ("churn", "churn_challenger")
PARTNER = "bench-compare"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds, each a comparison and two one-model jobs")
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--dir", default="")
    args = parser.parse_args()
    with owned_processes():
        run(args)


def run(args: argparse.Namespace) -> None:
    root = e2e.jobs_root(args.dir, prefix="bench-compare-", rows=args.rows, batch=args.batch)
    _second_model(root)
    _partner()
    # Not counted: a first job scores each model's reference in-process (mlflow's import, seconds) and caches it,
    # which every later job, of either kind, reads from the cache.
    seconds, _stages = _job(root, args.rows, list(MODELS))
    print(f"warm-up: compare {seconds:6.2f} s (the models' references scored and cached; not counted)", flush=True)
    rounds = []
    for i in range(args.repeat):
        both_first = i % 2 == 0  # alternate: the machine's drift falls on both sides
        times: dict[str, float] = {}
        for kind in ("compare", "one") if both_first else ("one", "compare"):
            if kind == "compare":
                times["compare"], stages = _job(root, args.rows, list(MODELS))
                print(f"round {i + 1}: compare {times['compare']:6.2f} s   {stages}", flush=True)
            else:
                for name in MODELS:
                    times[name], stages = _job(root, args.rows, [name])
                    print(f"round {i + 1}: {name:<16} {times[name]:6.2f} s   {stages}", flush=True)
        rounds.append(times)
    print(
        f"\n== {args.rows:,} rows, {e2e.DAYS} days, batch {args.batch:,}; {args.repeat} rounds, from creation to success"
    )
    print(f"{'round':<8}{'compare':>10}{'one+one':>10}{'ratio':>8}")
    ratios = []
    for i, t in enumerate(rounds, start=1):
        pair = t[MODELS[0]] + t[MODELS[1]]
        ratios.append(t["compare"] / pair)
        print(f"{i:<8}{t['compare']:>9.2f}s{pair:>9.2f}s{ratios[-1]:>8.2f}")
    median_compare = statistics.median(t["compare"] for t in rounds)
    median_pair = statistics.median(t[MODELS[0]] + t[MODELS[1]] for t in rounds)
    print(f"{'median':<8}{median_compare:>9.2f}s{median_pair:>9.2f}s{statistics.median(ratios):>8.2f}")


def _second_model(root: Path) -> None:
    """churn_challenger version 1: the demo model once more, under a name of its own, reading the same history."""
    from app.demo_data import register_demo_model
    from app.integrations.registry.mlflow import MlflowRegistry

    tracking = f"sqlite:///{root / 'mlflow.db'}"
    registry = MlflowRegistry(tracking_uri=tracking, registry_uri=tracking)
    try:
        registry.resolve(name=MODELS[1], version="1")
    except Exception:
        register_demo_model(tracking_uri=tracking, artifact_root=root / "artifacts", name=MODELS[1])


def _partner() -> None:
    from sqlalchemy import select

    from app.core.partners import Partner
    from app.db import get_session_factory

    with get_session_factory()() as s, s.begin():
        if s.scalar(select(Partner).where(Partner.code == PARTNER)) is None:
            s.add(Partner(code=PARTNER, name="Bench Compare"))


def _job(root: Path, rows: int, models: list[str]) -> tuple[float, str]:
    """A job of these models, submitted as the API submits it and run at once as a worker runs it: its seconds from
    creation to success, and when each stage started."""
    from app.config import get_settings
    from app.core.jobs import RetroTest, State
    from app.core.scope import ALL_PARTNERS
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer, make_registry, make_result_store
    from app.retro_tests.schemas import RetroTestCreate
    from app.retro_tests.service import RetroTestRequest, submit_request
    from worker.pipeline import Adapters, run_retro_test

    settings = get_settings()
    sessions = get_session_factory()
    registry = make_registry(settings)
    period = {
        "period_start": e2e.START,
        "period_end": e2e.START + timedelta(days=e2e.DAYS - 1),
        "output_formats": ["parquet"],  # as bench/e2e: the CSV's gzip would be most of publishing, on both sides
    }
    if len(models) == 1:
        data = RetroTestCreate(partner_code=PARTNER, model_name=models[0], model_version="1", **period)
    else:
        data = RetroTestCreate.model_validate(
            {"partner_code": PARTNER, "models": [{"name": m, "version": "1"} for m in models], **period}
        )
    created = time.time()
    with sessions() as s, s.begin():
        request = RetroTestRequest(data=data, actor="bench", scope=ALL_PARTNERS)
        job_id: uuid.UUID = submit_request(session=s, registry=registry, settings=settings, request=request).job.id
    adapters = Adapters(
        registry=registry,
        source=e2e.timed_source(root, rows),
        deployer=make_deployer(settings),
        store=make_result_store(settings),
    )
    state = run_retro_test(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings)
    seconds = time.time() - created
    with sessions() as s:
        job: Any = s.get(RetroTest, job_id)
        if state != State.succeeded:
            raise SystemExit(f"the job of {models} ended {state}: {job.error_message}")
        stages = " ".join(f"{k} {v:.2f}" for k, v in e2e.stage_seconds(job).items())
    return seconds, stages


if __name__ == "__main__":
    main()
