"""Benchmark: one large retro test scored by 1 worker, then by 2 workers sharing it (RETRO_PARTITIONS), in one run.

    .venv/bin/python -m bench.scale_out [--rows 1000000] [--days 20] [--workers 1,2] [--source-rows-per-s 40000]

Needs PostgreSQL on 127.0.0.1:5432 (it creates and drops a database of its own) and Redis on 127.0.0.1:6379, as
`./scripts/services.sh` starts them. For each worker count it starts that many real `retrotest worker`
processes with RETRO_PARTITIONS set to the same number, creates the job, sends it to the queue and waits. The
job's own worker starts one local MLServer and sends the other date ranges to the helpers, which score against
that same server. It prints, per run: the scoring stage's rows/s, the whole job's seconds, the rows each worker
scored, and checks that the result holds every source row exactly once. The ratio 2 vs 1 is printed last.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
START = date(2025, 1, 1)


def setup_environment(root: Path, db_name: str) -> None:
    """Settings shared by this process and the workers it starts (set before the app reads them)."""
    for key in [k for k in os.environ if k.startswith("RETRO_")]:
        del os.environ[key]
    os.environ.update(
        {
            "RETRO_ENV": "dev",
            "RETRO_VAR_DIR": str(root / "var"),
            "RETRO_DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0] + f"/{db_name}",
            "RETRO_BROKER_URL": "redis://127.0.0.1:6379/0",
            "RETRO_QUEUE_NAME": f"bench-scale-{uuid.uuid4().hex[:8]}",
            "RETRO_MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "RETRO_HISTORY_DIR": str(root / "history"),
            "RETRO_RESULTS_URL": str(root / "results"),
            "RETRO_WORKER_METRICS_PORT": "0",
            "RETRO_LOG_FORMAT": "text",
        }
    )


def admin_sql(sql: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


def start_workers(count: int, logs: Path, source_rows_per_s: float) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "RETRO_PARTITIONS": str(count), "PYTHONUNBUFFERED": "1"}
    module = ["app.cli"]
    if source_rows_per_s:
        env["BENCH_SOURCE_ROWS_PER_S"] = str(source_rows_per_s)
        module = ["bench.throttled_worker"]
    procs = []
    for i in range(count):
        log = (logs / f"worker-{count}-{i}.log").open("wb")
        cmd = [sys.executable, "-m", *module, "worker", "--name", f"bench{i}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    time.sleep(8)  # the workers import the app and connect to the broker before the job is sent
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def run_job(days: int) -> dict[str, Any]:
    """Create a job over the whole history, send it to the workers and wait for its verdict."""
    from app.core.jobs import RetroTest
    from app.db import get_session_factory
    from app.queue import send_retro_test
    from tests.factories import make_retro_test

    sessions = get_session_factory()
    with sessions() as s, s.begin():
        job_id = make_retro_test(s, start=START, end=START + timedelta(days=days - 1), partner_prefix="scale")
    send_retro_test(job_id)
    while True:
        time.sleep(1)
        with sessions() as s:
            job = s.get(RetroTest, job_id)
            assert job is not None
            if job.is_terminal:
                break
    stamps = {k: datetime.fromisoformat(v).timestamp() for k, v in job.stage_started.items()}
    if job.state.value != "succeeded":
        raise SystemExit(f"the job ended {job.state.value}: {job.error_message}")
    return {
        "job": job,
        "scoring_s": stamps["publishing"] - stamps["scoring"],
        "job_s": stamps["succeeded"] - stamps["resolving"],
        "deploy_s": stamps["scoring"] - stamps["deploying"],
    }


def check_result(root: Path, job: Any, rows: int) -> None:
    """Every source row exactly once in scores.parquet."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from app.core.jobs import job_prefix

    table = pq.read_table(
        root / "results" / job_prefix(job) / "scores.parquet", columns=["customer_id", "snapshot_date"]
    )
    keys = pc.binary_join_element_wise(pc.cast(table.column(0), "string"), pc.cast(table.column(1), "string"), "|")
    unique = len(pc.unique(keys))
    if table.num_rows != rows or unique != rows:
        raise SystemExit(f"result has {table.num_rows} rows ({unique} distinct); the source has {rows}")


def helper_rows(logs: Path, count: int) -> list[int]:
    text = "".join((logs / f"worker-{count}-{i}.log").read_text(errors="replace") for i in range(count))
    return [int(n) for n in re.findall(r"partition \S+ of retro test \S+ this helper scored (\d+) rows", text)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=20)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--source-rows-per-s",
        type=float,
        default=0,
        help="pace each reader to this rate, standing for a slow source such as PyHive (0: as fast as it goes)",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    db_name = f"retro_bench_scale_{os.getpid()}"
    setup_environment(root, db_name)
    admin_sql(f'CREATE DATABASE "{db_name}"')
    try:
        from app.cli import migrate_database
        from app.demo_data import register_demo_model, write_history

        migrate_database()
        print("registering the demo model and writing history ...", flush=True)
        register_demo_model(tracking_uri=os.environ["RETRO_MLFLOW_TRACKING_URI"], artifact_root=root / "artifacts")
        rows = (args.rows // args.days) * args.days
        write_history(root=root / "history", start=START, days=args.days, rows_per_day=rows // args.days)
        results: dict[int, dict[str, Any]] = {}
        for count in [int(w) for w in args.workers.split(",")]:
            procs = start_workers(count, root, args.source_rows_per_s)
            try:
                r = run_job(args.days)
            finally:
                stop_workers(procs)
            check_result(root, r["job"], rows)
            r["helpers"] = helper_rows(root, count)
            results[count] = r
            print(
                f"  {count} worker(s): scoring {rows / r['scoring_s']:>9,.0f} rows/s ({r['scoring_s']:.1f} s)   "
                f"job {r['job_s']:.1f} s (deploy {r['deploy_s']:.1f} s)   rows scored by helpers {r['helpers']}   "
                f"every row once: yes",
                flush=True,
            )
        paced = f", source paced to {args.source_rows_per_s:,.0f} rows/s per reader" if args.source_rows_per_s else ""
        print(
            f"\nbench/scale_out: {rows:,} rows over {args.days} days, {os.cpu_count()} cores, one local MLServer{paced}"
        )
        if 1 in results:
            for count, r in results.items():
                if count != 1:
                    ratio = results[1]["scoring_s"] / r["scoring_s"]
                    print(f"  scoring rate, {count} workers vs 1: {ratio:.2f}x")
    finally:
        from app.db import get_engine

        get_engine().dispose()
        admin_sql(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
