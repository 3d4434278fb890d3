"""Benchmark: jobs on a new model server against jobs on a warm one (issue 31), side by side in one run.

    .venv/bin/python -m bench.warm [--rows 100000] [--repeat 2] [--batch 5000] [--dir D]

One worker-like process runs retro tests of the demo model one after another over the same history: `--repeat`
cold jobs (the pool off: each deploys its model server and tears it down), then, with the pool on, one job that
starts the server and leaves it warm, then `--repeat` warm jobs that attach to it. For each job it measures, from
the moment the job is created as the API creates it:
  first row   until the first batch of the period is scored (after the deployment and its reference check)
  succeeded   until the job succeeded (results published)
  rate        rows / succeeded: the end-to-end rate, the deployment included
and prints the medians side by side with the warm/cold ratios. The pool is drained at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import e2e
from bench.teardown import owned_processes


def _timed_scores() -> list[float]:
    """Wall-clock times at which a batch was scored, by any scorer of this process (the reference's included)."""
    from app.integrations.scoring import scorers

    stamps: list[float] = []
    original = scorers.BatchScorer.score

    def score(self: Any, batch: Any) -> Any:
        result = original(self, batch)
        stamps.append(time.time())
        return result

    scorers.BatchScorer.score = score  # type: ignore[method-assign]
    return stamps


def run_job(root: Path, rows: int, *, warm_ttl_s: float, stamps: list[float]) -> dict[str, Any]:
    """One job end to end in this process, as a worker runs it; its times from creation."""
    job, at = e2e.run_job(root, rows, warm_ttl_s=warm_ttl_s)
    created = at["created"]
    succeeded = at["ended"] - created
    scoring = datetime.fromisoformat(job.stage_started["scoring"]).timestamp()
    first = min(t for t in stamps if t >= scoring) - created
    offsets = {k: datetime.fromisoformat(v).timestamp() - created for k, v in job.stage_started.items()}
    return {
        "stages": " ".join(f"{k} {t:.2f}" for k, t in sorted(offsets.items(), key=lambda kv: kv[1])),
        "warm": bool(job.deployment_warm),
        "first_row_s": first,
        "succeeded_s": succeeded,
        "rows": job.rows_scored,
        "rate": job.rows_scored / succeeded,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2, help="cold jobs, and warm jobs")
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--dir", default="")
    args = parser.parse_args()
    with owned_processes():
        run(args)


def run(args: argparse.Namespace) -> None:
    root = e2e.jobs_root(args.dir, prefix="bench-warm-", rows=args.rows, batch=args.batch)
    from app.config import get_settings
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer
    from worker.warm import WarmPool

    stamps = _timed_scores()
    jobs: list[dict[str, Any]] = []
    settings = get_settings().model_copy(update={"warm_ttl_s": 600.0})
    pool = WarmPool(sessions=get_session_factory(), deployer=make_deployer(settings), settings=settings)
    try:
        for i in range(args.repeat):
            jobs.append({"kind": "cold", **run_job(root, args.rows, warm_ttl_s=0, stamps=stamps)})
            print(_line(f"cold {i + 1}", jobs[-1]), flush=True)
        jobs.append({"kind": "first", **run_job(root, args.rows, warm_ttl_s=600, stamps=stamps)})
        print(_line("first with the pool on (starts the server)", jobs[-1]), flush=True)
        for i in range(args.repeat):
            jobs.append({"kind": "warm", **run_job(root, args.rows, warm_ttl_s=600, stamps=stamps)})
            assert jobs[-1]["warm"], "a job after the first should have attached to the warm server"
            print(_line(f"warm {i + 1}", jobs[-1]), flush=True)
    finally:
        pool.drain()
    cold = [j for j in jobs if j["kind"] == "cold"]
    warm = [j for j in jobs if j["kind"] == "warm"]
    print(f"\n== {args.rows:,} rows, {e2e.DAYS} days, batch {args.batch:,}; medians of {args.repeat} jobs each")
    print(f"{'':<28}{'cold':>10}{'warm':>10}{'warm/cold':>11}")
    for key, label, unit in (
        ("first_row_s", "submission -> first row", "s"),
        ("succeeded_s", "submission -> succeeded", "s"),
        ("rate", "end-to-end rate", "rows/s"),
    ):
        c, w = statistics.median(j[key] for j in cold), statistics.median(j[key] for j in warm)
        fmt = "{:>10,.0f}" if unit == "rows/s" else "{:>9.2f}s"
        print(f"{label:<28}{fmt.format(c)}{fmt.format(w)}{w / c:>11.2f}")


def _line(label: str, job: dict[str, Any]) -> str:
    return (
        f"{label:<44} first row {job['first_row_s']:6.2f} s, succeeded {job['succeeded_s']:6.2f} s, "
        f"{job['rate']:,.0f} rows/s ({'warm' if job['warm'] else 'new'} server)\n    stages (s from creation): "
        f"{job['stages']}"
    )


if __name__ == "__main__":
    main()
