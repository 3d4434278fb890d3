"""Benchmark: pulling a period from HiveServer2 with HiveSource vs PyHive's fetchmany, side by side in one run.

    .venv/bin/python -m bench.hive_pull [--rows 1000000] [--fetch 50000] [--repeat 2] [--latency 5]

Starts a Spark Thrift Server (or uses --host/--port), creates a partitioned table with the rows and 11
mixed-type columns, then reads the same query both ways, each in its own process so peak RSS is its own.
Prints rows/s, peak RSS and the ratio. With --latency N both read through a proxy that answers no statement
sooner than N seconds after it was sent (tests/hive_latency_proxy.py), as a production Hive's planning and
container start-up would: the time of each pull then includes one query's latency.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

TABLE = "bench.customer_daily"
DAYS = 10
START = date(2026, 1, 1)
END = date(2026, 1, DAYS)
COLUMNS = [
    "customer_id",
    "snapshot_date",
    "tenure",
    "spend",
    "data_gb",
    "calls",
    "roaming",
    "plan",
    "score_dec",
    "seg",
    "flag_i",
    "ts",
]


def create_table(host: str, port: int, rows: int) -> None:
    from tests.hive_server import HiveServer, run_sql

    server = HiveServer(host=host, port=port, workdir=Path("."), process=None)  # type: ignore[arg-type]
    run_sql(
        server,
        "CREATE DATABASE IF NOT EXISTS bench",
        f"DROP TABLE IF EXISTS {TABLE}",
        f"""CREATE TABLE {TABLE} (customer_id BIGINT, tenure INT, spend DOUBLE, data_gb FLOAT, calls SMALLINT,
            roaming BOOLEAN, plan STRING, score_dec DECIMAL(10,3), seg VARCHAR(8), flag_i TINYINT, ts TIMESTAMP,
            snapshot_date DATE) USING parquet PARTITIONED BY (snapshot_date)""",
        f"""INSERT OVERWRITE {TABLE} SELECT id, CAST(id % 120 AS INT), id * 0.37, CAST(id % 97 AS FLOAT) / 7,
            CAST(id % 300 AS SMALLINT), id % 10 = 0, CONCAT('plan_', CAST(id % 4 AS STRING)),
            CAST(id % 1000 AS DECIMAL(10,3)) / 7, CAST(CONCAT('s', CAST(id % 9 AS STRING)) AS VARCHAR(8)),
            CAST(id % 100 AS TINYINT), TIMESTAMP'2026-01-01 00:00:00' + make_interval(0, 0, 0, 0, 0, 0, id % 86400),
            DATE_ADD(DATE'{START.isoformat()}', CAST(id % {DAYS} AS INT)) FROM range({rows})""",
    )


def pull_pyhive(host: str, port: int, fetch: int) -> dict[str, float]:
    from pyhive import hive

    conn = hive.connect(host=host, port=port, username="bench")
    cursor = conn.cursor()
    cursor.arraysize = fetch
    t0 = time.perf_counter()
    cursor.execute(
        f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE snapshot_date BETWEEN CAST(%(s)s AS DATE) AND CAST(%(e)s AS DATE)",
        {"s": START.isoformat(), "e": END.isoformat()},
    )
    rows = 0
    while True:
        block = cursor.fetchmany(fetch)
        if not block:
            break
        rows += len(block)
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def pull_retrotest(host: str, port: int, fetch: int) -> dict[str, float]:
    from app.core.model_types import Feature
    from app.integrations.history.hive import HiveSettings, HiveSource
    from app.integrations.history.port import HistoryQuery

    source = HiveSource(
        HiveSettings(
            host=host,
            port=port,
            database="default",
            username="bench",
            password="",
            auth="NONE",
            kerberos_service_name="hive",
            configuration={},
            connect_timeout_s=30,
            query_timeout_s=3600,
            date_string_format="yyyy-MM-dd",
            count_rows=False,
        )
    )
    types = {
        "tenure": "long",
        "spend": "double",
        "data_gb": "double",
        "calls": "long",
        "roaming": "boolean",
        "plan": "string",
        "score_dec": "double",
        "seg": "string",
        "flag_i": "long",
        "ts": "string",
    }
    query = HistoryQuery(
        table=TABLE,
        date_column="snapshot_date",
        id_columns=("customer_id",),
        features=tuple(Feature(n, t) for n, t in types.items() if n != "ts"),
        start=START,
        end=END,
    )
    source.check_schema(query)
    t0 = time.perf_counter()
    rows = 0
    for batch in source.batches(query, batch_rows=fetch):
        rows += batch.num_rows
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def child(method: str, host: str, port: int, fetch: int) -> None:
    result = (pull_pyhive if method == "pyhive" else pull_retrotest)(host, port, fetch)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(method: str, host: str, port: int, fetch: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.hive_pull",
            "--child",
            method,
            "--host",
            host,
            "--port",
            str(port),
            "--fetch",
            str(fetch),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--fetch", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--host", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--child", default="")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds every statement waits (a proxy)")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.host, args.port, args.fetch)
        return
    server = None
    if not args.host:
        from tests.hive_server import start_hive_server

        print("starting a Spark Thrift Server ...", flush=True)
        server = start_hive_server(Path(tempfile.mkdtemp(prefix="bench-hive-")))
        args.host, args.port = server.host, server.port
    proxy = None
    try:
        print(
            f"creating {TABLE} with {args.rows:,} rows, {len(COLUMNS)} columns, {DAYS} date partitions ...", flush=True
        )
        create_table(args.host, args.port, args.rows)
        if args.latency:
            from tests.hive_latency_proxy import HiveLatencyProxy

            proxy = HiveLatencyProxy(upstream_host=args.host, upstream_port=args.port, latency_s=args.latency)
            proxy.start()
            args.host, args.port = proxy.host, proxy.port
            print(f"reading through a proxy that answers no statement sooner than {args.latency:g} s", flush=True)
        best: dict[str, dict[str, float]] = {}
        for i in range(args.repeat):
            for method in ("pyhive", "retrotest"):  # interleaved, so both see the same machine load
                r = measure(method, args.host, args.port, args.fetch)
                assert r["rows"] == args.rows, f"{method} read {r['rows']} rows, expected {args.rows}"
                print(
                    f"  run {i + 1} {method:<10} {r['rows'] / r['seconds']:>12,.0f} rows/s  {r['seconds']:6.2f} s  peak RSS {r['peak_rss_mb']:6.0f} MB",
                    flush=True,
                )
                if method not in best or r["seconds"] < best[method]["seconds"]:
                    best[method] = r
        p, o = best["pyhive"], best["retrotest"]
        latency = f", {args.latency:g} s latency per statement" if args.latency else ""
        print(
            f"\nhive_pull: {args.rows:,} rows x {len(COLUMNS)} columns, fetch size {args.fetch:,}, best of {args.repeat}"
            + latency
        )
        print(f"  PyHive fetchmany     {p['rows'] / p['seconds']:>12,.0f} rows/s   peak RSS {p['peak_rss_mb']:5.0f} MB")
        print(f"  retrotest HiveSource {o['rows'] / o['seconds']:>12,.0f} rows/s   peak RSS {o['peak_rss_mb']:5.0f} MB")
        print(f"  ratio (HiveSource / PyHive): {p['seconds'] / o['seconds']:.2f}x  (goal >= 3x)")
    finally:
        if proxy is not None:
            proxy.stop()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
