"""Benchmark: a population job's worker memory stays flat as the population grows (issue 17, "everything streams").

    .venv/bin/python -m bench.population [--sizes 50000,200000,800000] [--ids 100000] [--days 10]

It writes `--days` days x `--ids` customers of synthetic history (local Parquet, the DuckDB point-in-time join),
registers the demo model, and for each size submits a population of that many (customer, as-of date, outcome)
rows through the service layer (a tenth of them with ids that have no history), then runs the job in a
worker-like process of its own: the join, scoring over V2 gRPC against a local MLServer, the result files,
unmatched.csv.gz and the quality report. Each run reports the worker's peak anonymous memory (RssAnon: what the
job holds; the model server is a process of its own) and its time.

Every job runs twice: under the default DuckDB memory limit (RETRO_HISTORY_MEMORY_LIMIT and
RETRO_REPORT_MEMORY_LIMIT, 512MB) and under a low one (128MB). The point-in-time join sorts and windows every
population row, so DuckDB's share grows with the population until the limit, then spills to <var_dir>/duckdb:
the worker's memory is bounded by the limit, not by the population.

Named baselines, measured in the same run:
  smallest     the smallest population: peak memory at N / peak at the smallest, at each limit
  period       a plain job over the whole period (every history row, no population): a job that streams by
               construction
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from bench.e2e import AnonPeak, bench_root, env_for

START = date(2025, 1, 1)


def population_file(root: Path, rows: int, *, ids: int, days: int) -> Path:
    """rows distinct (customer_id, as_of) pairs with a 0/1 outcome; a tenth have ids beyond the history's."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / f"population-{rows}.parquet"
    if path.exists():
        return path
    rng = np.random.default_rng(rows)
    pairs = rng.choice(int(ids * 1.1) * days, size=rows, replace=False)  # ids 1..1.1*ids: a tenth unmatched
    customer = pairs // days + 1
    as_of = np.datetime64(START.isoformat()) + (pairs % days).astype("timedelta64[D]")
    table = pa.table(
        {
            "customer_id": pa.array(customer, pa.int64()),
            "as_of": pa.array(as_of, pa.date32()),
            "outcome": pa.array(rng.integers(0, 2, rows), pa.int64()),
        }
    )
    pq.write_table(table, path)
    return path


def child_submit(file: str, days: int) -> dict[str, Any]:
    """Submit the population as the API does (checked, stored under the partner's prefix); returns the job id."""
    from app.cli import migrate_database
    from app.config import get_settings
    from app.core.partners import Partner
    from app.core.scope import ALL_PARTNERS
    from app.db import get_session_factory
    from app.integrations.wiring import make_registry, make_result_store
    from app.retro_tests.population import PopulationUpload
    from app.retro_tests.schemas import RetroTestCreate
    from app.retro_tests.service import RetroTestRequest, submit_request

    migrate_database()
    settings = get_settings()
    store = make_result_store(settings)
    code = f"bench-{os.getpid()}"
    data = RetroTestCreate(
        partner_code=code,
        model_name="churn",
        model_version="1",
        period_start=START,
        period_end=START + timedelta(days=days - 1),
        **({"as_of_column": "as_of", "outcome_column": "outcome"} if file else {}),
    )
    with get_session_factory()() as s, s.begin():
        s.add(Partner(code=code, name=code))
        s.flush()
        upload = PopulationUpload(data=Path(file).read_bytes(), filename=Path(file).name) if file else None
        job, _, population = submit_request(
            session=s,
            registry=make_registry(settings),
            settings=settings,
            request=RetroTestRequest(data=data, actor="bench", scope=ALL_PARTNERS, upload=upload),
        )
        job_id, stored_at = str(job.id), (job.population or {}).get("path")
    if population is not None and stored_at:
        with store.open_write(stored_at) as fh:
            fh.write(population.parquet)
    return {"job_id": job_id}


def child_run(job_id: str) -> dict[str, Any]:
    """Run the job to its end in this process, as a worker would; its figures."""
    import uuid

    from sqlalchemy import select

    from app.config import get_settings
    from app.core.jobs import ResultFile, RetroTest, State
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer, make_history_source, make_registry, make_result_store
    from worker.pipeline import Adapters, run_retro_test

    settings = get_settings()
    sessions = get_session_factory()
    adapters = Adapters(
        registry=make_registry(settings),
        source=make_history_source(settings),
        deployer=make_deployer(settings),
        store=make_result_store(settings),
    )
    t0 = time.perf_counter()
    state = run_retro_test(job_id=uuid.UUID(job_id), sessions=sessions, adapters=adapters, settings=settings)
    seconds = time.perf_counter() - t0
    with sessions() as s:
        job = s.get(RetroTest, uuid.UUID(job_id))
        assert job is not None
        if state != State.succeeded:
            raise SystemExit(f"the job ended {state}: {job.error_message}")
        files = s.scalars(select(ResultFile.name).where(ResultFile.retro_test_id == job.id)).all()
        return {"rows": job.rows_scored, "seconds": seconds, "files": sorted(files)}


def run_child(root: Path, args: list[str], settings: dict[str, str]) -> dict[str, Any]:
    env = {**env_for(root), "RETRO_HISTORY_DIR": str(root / "history"), **settings}
    out = subprocess.run(
        [sys.executable, "-m", "bench.population", "--dir", str(root), *args], env=env, capture_output=True, text=True
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"{args} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return dict(json.loads(line[len("RESULT ") :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50000,200000,800000", help="population rows, smallest first")
    parser.add_argument("--ids", type=int, default=100_000, help="customers in each day of history")
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--memory-limit", default="512MB", help="RETRO_HISTORY_MEMORY_LIMIT (the default)")
    parser.add_argument("--low-memory-limit", default="128MB", help="the same runs again under this limit")
    parser.add_argument("--dir", default="")
    parser.add_argument("--submit", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.submit is not None:
        print("RESULT " + json.dumps(child_submit(args.submit, args.days)))
        return
    if args.run:
        with AnonPeak() as anon:
            result = child_run(args.run)
        result["peak_anon_mb"] = anon.peak_mb
        print("RESULT " + json.dumps(result))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) > args.ids * args.days:
        parser.error(f"--sizes: at most --ids x --days = {args.ids * args.days} distinct (id, date) pairs")
    root = bench_root(args.dir, prefix="bench-population-")
    if not (root / "history").exists():
        from app.demo_data import write_history

        print("writing history ...", flush=True)
        write_history(root=root / "history", start=START, days=args.days, rows_per_day=args.ids)

    limits = [args.memory_limit, args.low_memory_limit]
    runs: list[tuple[str, int, dict[str, dict[str, Any]]]] = []
    for label, rows in [("period", args.ids * args.days), *((f"population {n:,}", n) for n in sizes)]:
        file = str(population_file(root, rows, ids=args.ids, days=args.days)) if label != "period" else ""
        by_limit: dict[str, dict[str, Any]] = {}
        for limit in limits:
            env = {"RETRO_HISTORY_MEMORY_LIMIT": limit, "RETRO_REPORT_MEMORY_LIMIT": limit}
            job = run_child(root, ["--submit", file, "--days", str(args.days)], env)
            r = by_limit[limit] = run_child(root, ["--run", job["job_id"]], env)
            print(
                f"   {label:<20} DuckDB limit {limit:>6}: {r['rows']:>9,} rows scored in {r['seconds']:6.1f} s "
                f"(deploying included), peak anon {r['peak_anon_mb']:6.0f} MB; files {', '.join(r['files'])}",
                flush=True,
            )
        runs.append((label, rows, by_limit))
    smallest = runs[1][2]
    print("\npeak anonymous memory of the worker (MB), side by side, at each DuckDB memory limit:")
    print(f"   {'job':<20} {'rows':>9} " + " ".join(f"{f'at {lim}':>10} {'/ smallest':>10}" for lim in limits))
    for label, rows, by_limit in runs:
        cells = (
            f"{by_limit[lim]['peak_anon_mb']:>10.0f} {by_limit[lim]['peak_anon_mb'] / smallest[lim]['peak_anon_mb']:>10.2f}"
            for lim in limits
        )
        print(f"   {label:<20} {rows:>9,} " + " ".join(cells))


if __name__ == "__main__":
    main()
