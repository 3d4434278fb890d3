"""Prometheus metrics.

The worker counts what it does (rows, stage durations, scoring requests, live deployments) and serves them on
its own port (RETRO_WORKER_METRICS_PORT). The API's /metrics adds job counts read from the database at scrape
time (app/system/job_metrics.py), so they are right whichever worker ran the jobs. This module imports nothing
from app: every layer may count.

The worker runs tasks in forked child processes, so it uses prometheus_client's multiprocess mode: the
`worker` command sets PROMETHEUS_MULTIPROC_DIR before anything imports prometheus_client.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

ROWS_SCORED = Counter("retrotest_rows_scored", "Rows scored by model servers.", ["protocol"])
ROWS_REJECTED = Counter("retrotest_rows_rejected", "Rows not sent to the model (null inputs).", ["protocol"])
STAGE_SECONDS = Histogram(
    "retrotest_stage_duration_seconds",
    "Time a retro test spent in a stage, observed when it leaves the stage.",
    ["stage"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 7200, 4 * 3600, 12 * 3600),
)
SCORING_REQUEST_SECONDS = Histogram(
    "retrotest_scoring_request_duration_seconds",
    "Latency of one inference request to a model server, per attempt.",
    ["protocol"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SCORING_HEDGED_REQUESTS = Counter(
    "retrotest_scoring_hedged_requests",
    "Inference requests sent a second time because the first was late (the first answer wins).",
    ["protocol"],
)
SCORING_REQUEST_ERRORS = Counter(
    "retrotest_scoring_request_errors",
    "Failed inference requests by HTTP status ('transport' for connection errors and timeouts).",
    ["protocol", "status"],
)
DEPLOYMENTS_ALIVE = Gauge(
    "retrotest_deployments_alive",
    "Temporary model deployments this worker holds right now.",
    ["deployer"],
    multiprocess_mode="livesum",
)
API_REQUESTS_SHED = Counter(
    "retrotest_api_requests_shed", "Requests an API process answered 503 at once, being at its in-flight limit."
)
WARM_POOL = Counter(
    "retrotest_warm_pool",
    "Warm deployment pool events: hit (a job attached to a warm deployment), miss (it started its own), "
    "removed (a warm one failed its check or went down), evicted (no room), expired (idle past RETRO_WARM_TTL_S).",
    ["event"],
)
REAPER_RUNS = Counter("retrotest_reaper_runs", "Runs of the deployment reaper.")
DEPLOYMENTS_REAPED = Counter(
    "retrotest_deployments_reaped", "Deployments deleted by the reaper, by reason.", ["reason"]
)


def start_worker_metrics(port: int) -> None:
    """Serve the metrics of this worker and its child processes on port (0: do nothing)."""
    if port == 0:
        return
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server
    from prometheus_client.values import ValueClass

    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ or not getattr(ValueClass, "_multiprocess", False):
        log.warning("worker metrics: multiprocess mode is not active; child processes' metrics will be missing")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    try:
        start_http_server(port, registry=registry)
    except OSError as exc:
        log.warning("worker metrics: cannot listen on port %s (%s); metrics are off", port, exc)
        return
    log.info("worker metrics on :%s/metrics", port)


def mark_worker_process_dead(pid: int) -> None:
    """Drop a finished child process's live gauges."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
