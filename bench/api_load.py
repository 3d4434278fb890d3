"""Benchmark: the status and list endpoints under an open-loop constant request rate, and open job pages polling
versus pushed.

    .venv/bin/python -m bench.api_load [--rate 200 --rate 400] [--duration 30] [--warmup 5] [--jobs 10000]
                                       [--pages 100] [--pages-duration 20] [--workers N] [--json]

Targets (issue 32): `GET /api/v1/retro-tests/{id}` (status) and `GET /api/v1/retro-tests?limit=50` (list), half
and half: at 200 req/s p99 < 50 ms with nothing shed and no errors; at 400 req/s every request answered within
1 s, served or refused with 503 (app/load_shedding.py). Each --rate runs on the same server and data, one after
the other; a last table puts them side by side with the API server's CPU per answered request. Then --pages open
pages of running jobs are measured both ways: each polling its job once a second (the job page before), then each
listening to its job's event stream (app/retro_tests/live.py): the API server's CPU for each, side by side.

Everything runs on this machine, against real services:
  1. a fresh PostgreSQL database (retro_bench_api_<pid>), migrated with `retrotest migrate` (Alembic);
  2. seed data: partners, an admin and an API token through the project's services, then --jobs retro tests in
     mixed states with progress counters and, for succeeded ones, their three result files (bulk insert through
     the ORM models), then VACUUM ANALYZE as autovacuum would do soon after such a load (Postgres 13+ vacuums a
     table after many inserts; the vacuum sets its visibility map, which lets counts read only an index);
  3. the API started as production starts it: `retrotest serve --skip-migrations` (uvicorn on app.main:app) with
     RETRO_ENV=prod and Redis as broker; without --workers it runs the CLI's default worker count (the setting
     RETRO_API_WORKERS), which is what docker-compose.yml and the Dockerfile run;
  4. an open-loop load: request i is due at start + i/rate whatever happened to the requests before it, and its
     latency runs from that due time to the last byte of the answer. A stalled server or a full connection pool
     therefore shows as latency, not as fewer requests (no coordinated omission). A request not answered within
     10 s of its due time is given up, like a real client would, and counts as an error; failed requests count in
     the percentiles at the time they failed. The client is one asyncio process with a pool of keep-alive
     connections on plain asyncio streams (KeepAliveClient: httpx cost more CPU than the server); it reports how late it sent and its own CPU use, so a reader can tell a slow server from a busy
     client.
It prints, per rate, sent, achieved rate, errors, 503s and p50/p90/p99/max per endpoint (and per list filter) and
overall; the CPU used by the client, the API server and PostgreSQL, and the server's per answered request; database
connections opened; then the rates side by side, the pages comparison and the API's logged errors. Errors are
requests neither served nor refused with 503 (timeouts, other statuses). --json prints one JSON summary instead.
The server is stopped and the database dropped on exit, Ctrl-C or error. On a machine busy with other work the
client's send lag and the load average (both printed) say how far the latencies can be trusted; the CPU per
request is the figure that holds.
Exit status: 0 when every rate meets its target, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("RETRO_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("RETRO_TEST_REDIS", "redis://127.0.0.1:6379/0")
TARGET_P99_MS = 50.0
TARGET_RATE = 200.0  # up to this rate: p99 under TARGET_P99_MS, nothing shed, no errors (issue 32)
ANSWER_WITHIN_MS = 1000.0  # past it: every request answered (served or 503) within this
DEFAULT_RATES = (200.0, 400.0)
LIST_LIMIT = 50
REQUEST_TIMEOUT_S = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

# How often each state occurs among the seeded jobs: mostly history, some running and queued work.
STATE_WEIGHTS = {
    "succeeded": 70,
    "failed": 10,
    "cancelled": 5,
    "queued": 5,
    "resolving": 1,
    "extracting": 3,
    "deploying": 1,
    "scoring": 4,
    "publishing": 1,
}
PIPELINE = ["queued", "resolving", "extracting", "deploying", "scoring", "publishing"]
# The list requests: (name, weight). Offsets reach anywhere in the table, the worst case for OFFSET paging.
LIST_VARIANTS = [("no filter", 30), ("partner", 25), ("state", 20), ("partner+state", 10), ("offset", 15)]


def log(message: str) -> None:
    print(f"api_load: {message}", file=sys.stderr, flush=True)


# --- database: create, migrate, seed, drop ----------------------------------------------------------------------


def create_database(name: str) -> str:
    """Create an empty database and return its SQLAlchemy URL."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def migrate(env: dict[str, str]) -> None:
    """`retrotest migrate`, as the production migrate step runs it."""
    subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, check=True, capture_output=True, cwd=ROOT)


@dataclass
class Seeded:
    token: str
    job_ids: list[uuid.UUID]
    partner_codes: list[str]
    files: int
    running_ids: list[uuid.UUID]  # jobs in the scoring state: what open job pages watch


def seed(*, jobs: int, partners: int, rng: random.Random) -> Seeded:
    """Partners, an admin with an API token, and `jobs` retro tests with their result files."""
    from sqlalchemy import insert, text

    from app.auth import service as auth_service
    from app.auth.models import Role
    from app.auth.schemas import UserCreate
    from app.core.jobs import ResultFile, RetroTest
    from app.db import get_engine, get_session_factory
    from app.partners import service as partner_service
    from app.partners.schemas import PartnerCreate

    with get_session_factory()() as session:
        partner_ids = {}
        for i in range(partners):
            code = f"partner-{i:02d}"
            data = PartnerCreate(code=code, name=f"Partner {i}", contact_email=f"risk@{code}.example")
            partner_ids[code] = partner_service.create_partner(session=session, data=data, actor="bench").id
        admin = auth_service.create_user(
            session=session, data=UserCreate(username="bench-admin", role=Role.admin), actor="bench"
        )
        _, token = auth_service.create_api_token(session=session, user=admin, name="api_load", actor="bench")
        session.commit()

        # A few large partners and a long tail, as in real use: weights 1, 1/2, 1/3, ...
        codes = list(partner_ids)
        weights = [1 / (i + 1) for i in range(len(codes))]
        job_rows, file_rows = [], []
        for _ in range(jobs):
            job = fake_job(rng, partner_id=partner_ids[rng.choices(codes, weights)[0]])
            job_rows.append(job)
            if job["state"] == "succeeded":
                file_rows.extend(fake_files(job))
        for chunk in batches(job_rows, 2000):
            session.execute(insert(RetroTest), chunk)
        for chunk in batches(file_rows, 5000):
            session.execute(insert(ResultFile), chunk)
        session.commit()
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    return Seeded(
        token=token,
        job_ids=[j["id"] for j in job_rows],
        partner_codes=codes,
        files=len(file_rows),
        running_ids=[j["id"] for j in job_rows if j["state"] == "scoring"],
    )


def batches(rows: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def fake_job(rng: random.Random, *, partner_id: uuid.UUID) -> dict[str, Any]:
    """One retro test row as the pipeline would have left it in its state, created in the last year."""
    state = rng.choices(list(STATE_WEIGHTS), list(STATE_WEIGHTS.values()))[0]
    terminal = state in ("succeeded", "failed", "cancelled")
    if state in PIPELINE:
        reached = PIPELINE[: PIPELINE.index(state) + 1]
    elif state == "succeeded":
        reached = PIPELINE
    else:  # failed or cancelled in some stage
        reached = PIPELINE[: rng.randint(1, len(PIPELINE))]
    created = datetime.now(UTC) - timedelta(seconds=rng.uniform(60, 365 * 86400))
    stages, at = {}, created
    for stage in [*reached, state] if terminal else reached:
        stages[stage] = at.isoformat()
        at += timedelta(seconds=rng.uniform(1, 900))

    days = rng.randint(7, 120)
    counted = "extracting" in reached  # the extract stage counts the rows
    rows_total = days * rng.randint(10_000, 400_000)
    done_fraction = 1.0 if state in ("succeeded", "publishing") else rng.random() if "scoring" in reached else 0.0
    rows_done = int(rows_total * done_fraction)
    rejected = rows_done // rng.randint(200, 5000)

    job_id = uuid.UUID(int=rng.getrandbits(128), version=4)
    period_start = date(2025, 1, 1) + timedelta(days=rng.randrange(300))
    version = str(rng.randint(1, 12))
    alias = "champion" if rng.random() < 0.4 else None  # a request names a version or an alias, not both
    return {
        "id": job_id,
        "partner_id": partner_id,
        "model_name": rng.choice(["churn", "churn", "upsell", "fraud", "credit-risk"]),
        "requested_version": None if alias else version,
        "requested_alias": alias,
        "period_start": period_start,
        "period_end": period_start + timedelta(days=days - 1),
        "output_formats": ["parquet", "csv.gz"],
        "source_override": {},
        "note": rng.choice([None, None, "quarterly review", "asked for by the partner's risk team"]),
        "requested_by": rng.choice(["alice", "bob", "carol", "dave"]),
        "request_key": f"{rng.getrandbits(256):064x}",
        "model_version": version,
        "model_run_id": f"{rng.getrandbits(128):032x}",
        "model_uri": f"mlflow-artifacts:/1/{rng.getrandbits(128):032x}/artifacts/model",
        "source_table": "features.customer_daily",
        "date_column": "snapshot_date",
        "id_columns": ["customer_id"],
        "state": state,
        "created_at": created,
        "updated_at": at,
        "stage_started": stages,
        "finished_at": at if terminal else None,
        "attempts": 0 if state == "queued" else 1,
        "heartbeat_at": None if terminal or state == "queued" else at,
        "rows_total": rows_total if counted else None,
        "rows_read": rows_done,
        "rows_scored": rows_done - rejected,
        "rows_rejected": rejected,
        "chunks_total": days if counted else None,
        "chunks_done": int(days * done_fraction),
        "error_code": {"failed": "scoring_failed", "cancelled": "cancelled"}.get(state),
        "error_message": {"failed": "the model server answered 500 five times", "cancelled": "cancelled by alice"}.get(
            state
        ),
        "result_location": f"/data/results/{partner_id}/{job_id}" if state == "succeeded" else None,
    }


def fake_files(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The three files a succeeded job publishes: scores in both formats and the manifest."""
    rows = job["rows_scored"]
    files = [
        ("scores.parquet", "scores", "parquet", rows, rows * 9),
        ("scores.csv.gz", "scores", "csv.gz", rows, rows * 7),
        ("manifest.json", "manifest", "json", None, 3000),
    ]
    return [
        {
            "retro_test_id": job["id"],
            "name": name,
            "kind": kind,
            "format": fmt,
            "rows": n,
            "bytes": size,
            "sha256": hashlib.sha256(f"{job['id']}/{name}".encode()).hexdigest(),
        }
        for name, kind, fmt, n, size in files
    ]


# --- the API server -----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(*, database_url: str, tmp: Path) -> dict[str, str]:
    """Production-like settings (RETRO_ENV=prod, Postgres, Redis), with scratch directories under tmp."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("RETRO_")},
        "RETRO_ENV": "prod",
        "RETRO_SECRET_KEY": secrets.token_urlsafe(32),
        "RETRO_DATABASE_URL": database_url,
        "RETRO_BROKER_URL": REDIS_URL,
        "RETRO_QUEUE_NAME": f"retrotest-bench-{os.getpid()}",
        "RETRO_VAR_DIR": str(tmp / "var"),
        "RETRO_MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "RETRO_RESULTS_URL": str(tmp / "results"),
        "RETRO_WORKER_METRICS_PORT": "0",
    }


def serve_command(*, port: int, workers: int | None) -> list[str]:
    """`retrotest serve` as docker-compose.yml runs it; --workers only when asked for."""
    cmd = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--skip-migrations"]
    return cmd + (["--workers", str(workers)] if workers is not None else [])


def start_server(*, cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    # A session of its own: the terminal's Ctrl-C reaches only us, and we stop the server (and any uvicorn
    # worker processes) as one group.
    with log_path.open("wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def server_errors(log_path: Path) -> dict[str, int]:
    """ERROR and CRITICAL records of the API's JSON log: each distinct message (with its exception's last line)."""
    counts: dict[str, int] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("level") not in ("ERROR", "CRITICAL"):
            continue
        exception = str(entry.get("exception", "")).strip().splitlines()
        key = " ".join(f"{entry.get('message', '')}: {exception[-1] if exception else ''}".split())[:300]
        counts[key] = counts.get(key, 0) + 1
    return counts


# --- CPU accounting from /proc ------------------------------------------------------------------------------------


def process_cpu_seconds(predicate: Callable[[str, int], bool]) -> float:
    """CPU seconds of the live processes that satisfy predicate(comm, process group), and of their reaped children.

    Reaped children matter: PostgreSQL forks a backend per connection, and one that has exited is only in the
    postmaster's cutime/cstime.
    """
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()  # fields[0] is field 3 (state) of proc(5)
        if predicate(comm, int(fields[2])):  # fields[2]: process group
            total += sum(int(v) for v in fields[11:15]) / CLK_TCK  # utime, stime, cutime, cstime
    return total


def database_sessions() -> int:
    """Sessions (connections) opened so far on the benchmark's database, from pg_stat_database."""
    from sqlalchemy import text

    from app.db import get_engine

    with get_engine().connect() as conn:
        count = conn.execute(
            text("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        ).scalar_one()
    return int(count)


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all cores, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class CpuSnapshot:
    wall: float
    client: float
    server: float
    postgres: float
    machine_busy: int
    machine_total: int


def cpu_snapshot(server_pgid: int) -> CpuSnapshot:
    busy, total = machine_busy_ticks()
    return CpuSnapshot(
        wall=time.perf_counter(),
        client=time.process_time(),
        server=process_cpu_seconds(lambda _comm, pgrp: pgrp == server_pgid),
        postgres=process_cpu_seconds(lambda comm, _pgrp: comm == "postgres"),
        machine_busy=busy,
        machine_total=total,
    )


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """Percent of one core for client, server and postgres; percent of all cores for the machine."""
    wall = after.wall - before.wall
    return {
        "client_pct_of_core": round(100 * (after.client - before.client) / wall, 1),
        "server_pct_of_core": round(100 * (after.server - before.server) / wall, 1),
        "postgres_pct_of_core": round(100 * (after.postgres - before.postgres) / wall, 1),
        "machine_busy_pct": round(
            100 * (after.machine_busy - before.machine_busy) / max(1, after.machine_total - before.machine_total), 1
        ),
        "cores": float(os.cpu_count() or 1),
    }


# --- the load -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRequest:
    endpoint: str  # "status" or "list"
    variant: str  # the list filter, or "by id"
    path: str


@dataclass
class Sample:
    request: PlannedRequest
    due: float  # when the schedule said to send it
    sent: float  # when the client got round to sending it
    done: float
    status: int | None
    error: str | None = None

    @property
    def latency_ms(self) -> float:
        return (self.done - self.due) * 1000

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def shed(self) -> bool:
        """Refused at once by the API's in-flight bound (app/load_shedding.py): an answer, not an error."""
        return self.status == 503 and self.error is None


def plan_requests(*, count: int, seeded: Seeded, rng: random.Random) -> list[PlannedRequest]:
    """Half status requests for random existing jobs, half list requests with varied filters."""
    names, weights = zip(*LIST_VARIANTS, strict=True)
    states = list(STATE_WEIGHTS)
    plan = []
    for _ in range(count):
        if rng.random() < 0.5:
            job_id = rng.choice(seeded.job_ids)
            plan.append(PlannedRequest("status", "by id", f"/api/v1/retro-tests/{job_id}"))
            continue
        variant = rng.choices(names, weights)[0]
        query = f"limit={LIST_LIMIT}"
        if "partner" in variant:
            query += f"&partner={rng.choice(seeded.partner_codes)}"
        if "state" in variant:
            query += f"&state={rng.choice(states)}"
        if variant == "offset":
            query += f"&offset={LIST_LIMIT * rng.randrange(1, max(2, len(seeded.job_ids) // LIST_LIMIT))}"
        plan.append(PlannedRequest("list", variant, f"/api/v1/retro-tests?{query}"))
    return plan


class KeepAliveClient:
    """GET over a pool of HTTP/1.1 keep-alive connections, on asyncio's streams: the load client.

    httpx spent ~5 ms of CPU per request here (93% of a core at 200 req/s, on the machine the server needs); this
    reads the status line, the headers and a Content-Length body and nothing more, which is all the API sends for
    these two endpoints. A connection that fails or is closed by the server is dropped and a new one opened."""

    def __init__(self, base_url: str, *, headers: dict[str, str]) -> None:
        parsed = httpx.URL(base_url)
        self.host, self.port = parsed.host, parsed.port or 80
        lines = [f"Host: {self.host}:{self.port}", *(f"{k}: {v}" for k, v in headers.items())]
        self._head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, path: str) -> int:
        """The answer's status, once its whole body has arrived.

        A kept connection the server closed as the request went out (its keep-alive timeout: uvicorn's 5 s) gets
        the request again on a new connection, as httpx and browsers do for a GET (RFC 9112, 9.3.1): before, such
        a race counted as an error of the server at low rates, when connections idle longest.
        """
        if self._idle:
            try:
                return await self._exchange(path, *self._idle.pop())
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
            except ConnectionResetError:
                pass
        return await self._exchange(path, *await asyncio.open_connection(self.host, self.port))

    async def _exchange(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        try:
            writer.write(f"GET {path} HTTP/1.1\r\n".encode() + self._head)
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
            if "content-length" not in fields:
                raise ValueError(f"an answer without Content-Length ({status_line})")
            await reader.readexactly(int(fields["content-length"]))
        except BaseException:
            writer.close()
            raise
        if fields.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append((reader, writer))
        return int(status_line.split(" ", 2)[1])

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def send(
    client: KeepAliveClient, gate: asyncio.Semaphore, request: PlannedRequest, due: float, samples: list[Sample]
) -> None:
    """One request, given up REQUEST_TIMEOUT_S after its due time: waiting for a free connection counts too."""
    sent = time.perf_counter()
    status, error = None, None
    try:
        async with asyncio.timeout(due + REQUEST_TIMEOUT_S - sent), gate:
            status = await client.get(request.path)
    except TimeoutError:
        error = f"no answer within {REQUEST_TIMEOUT_S:g} s of its due time"
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    samples.append(Sample(request, due, sent, time.perf_counter(), status, error))


async def open_loop(
    client: KeepAliveClient, plan: Sequence[PlannedRequest], *, rate: float, connections: int
) -> list[Sample]:
    """Send plan[i] at start + i/rate, never waiting for earlier answers; return once every answer is in."""
    # At most `connections` requests in flight: the others queue here, in order, as behind a client's pool.
    gate = asyncio.Semaphore(connections)
    samples: list[Sample] = []
    tasks = []
    start = time.perf_counter() + 0.05
    for i, request in enumerate(plan):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(client, gate, request, due, samples)))
    await asyncio.gather(*tasks)
    return samples


def check_answers(*, base_url: str, token: str, seeded: Seeded) -> None:
    """Before timing anything: the two endpoints answer what they should for this data."""
    headers = {"Authorization": f"Bearer {token}"}
    job_id = seeded.job_ids[0]
    job = httpx.get(f"{base_url}/api/v1/retro-tests/{job_id}", headers=headers, timeout=30).raise_for_status().json()
    assert job["id"] == str(job_id), job
    page = httpx.get(f"{base_url}/api/v1/retro-tests?limit={LIST_LIMIT}", headers=headers, timeout=30)
    body = page.raise_for_status().json()
    assert body["total"] == len(seeded.job_ids) and len(body["items"]) == LIST_LIMIT, {
        k: v for k, v in body.items() if k != "items"
    }


@dataclass
class LoadResult:
    samples: list[Sample]
    cpu: dict[str, float]
    seconds: float  # the measured window: from the first due time until the last answer or timeout
    db_sessions: int  # database connections opened (by anyone) while measuring


async def run_load(
    *,
    base_url: str,
    token: str,
    seeded: Seeded,
    rate: float,
    duration: float,
    warmup: float,
    connections: int,
    rng: random.Random,
    server_pgid: int,
) -> LoadResult:
    """Warm up at the full rate (not counted), then measure `duration` seconds at `rate`."""
    client = KeepAliveClient(base_url, headers={"Authorization": f"Bearer {token}"})
    try:
        if warmup > 0:
            warm = plan_requests(count=int(rate * warmup), seeded=seeded, rng=rng)
            await open_loop(client, warm, rate=rate, connections=connections)
        plan = plan_requests(count=int(rate * duration), seeded=seeded, rng=rng)
        sessions_before = database_sessions()
        before = cpu_snapshot(server_pgid)
        samples = await open_loop(client, plan, rate=rate, connections=connections)
        after = cpu_snapshot(server_pgid)
        sessions = database_sessions() - sessions_before
    finally:
        await client.aclose()
    return LoadResult(
        samples=samples, cpu=cpu_usage(before, after), seconds=after.wall - before.wall, db_sessions=sessions
    )


# --- the report ---------------------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    """Counts, achieved rate, errors and latency percentiles (ms, from the due time) of a set of samples.

    Failed requests count in the percentiles at the time they failed, so timeouts cannot make p99 look better.
    """
    answered = sorted(s.latency_ms for s in samples)
    window = max(s.sent for s in samples) - min(s.due for s in samples) if samples else 0.0
    errors = [s for s in samples if not s.ok and not s.shed]
    shed = sum(s.shed for s in samples)
    within = sum((s.ok or s.shed) and s.latency_ms < ANSWER_WITHIN_MS for s in samples)
    return {
        "sent": len(samples),
        "rate_per_s": round(len(samples) / window, 1) if window > 0 else 0.0,
        "errors": len(errors),
        "shed_503": shed,
        "shed_pct": round(100 * shed / len(samples), 1) if samples else 0.0,
        "answered_within_1s_pct": round(100 * within / len(samples), 2) if samples else 0.0,
        "error_examples": sorted({s.error or f"HTTP {s.status}" for s in errors})[:3],
        "p50_ms": round(percentile(answered, 50), 1),
        "p90_ms": round(percentile(answered, 90), 1),
        "p99_ms": round(percentile(answered, 99), 1),
        "max_ms": round(answered[-1], 1) if answered else math.nan,
    }


def build_summary(
    *, result: LoadResult, args: argparse.Namespace, rate: float, seeded: Seeded, workers: str
) -> dict[str, Any]:
    samples = result.samples
    lags = sorted((s.sent - s.due) * 1000 for s in samples)
    overall = summarize(samples)
    cpu = result.cpu
    answered = sum(s.ok or s.shed for s in samples)
    cpu_ms = cpu["server_pct_of_core"] / 100 * result.seconds * 1000 / answered if answered else math.nan
    if rate <= TARGET_RATE:
        ok = overall["errors"] == 0 and overall["shed_503"] == 0 and overall["p99_ms"] < TARGET_P99_MS
        goal = f"p99 < {TARGET_P99_MS:g} ms, nothing shed, no errors"
    else:
        ok = overall["errors"] == 0 and overall["max_ms"] < ANSWER_WITHIN_MS
        goal = f"every request served or refused (503) within {ANSWER_WITHIN_MS:g} ms"
    return {
        "target": {"rate_per_s": rate, "goal": goal},
        "server_cpu_ms_per_request": round(cpu_ms, 2),
        "setup": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "server": workers,
            "jobs": len(seeded.job_ids),
            "partners": len(seeded.partner_codes),
            "result_files": seeded.files,
        },
        "endpoints": {
            name: summarize([s for s in samples if s.request.endpoint == name]) for name in ("status", "list")
        },
        "list_variants": {
            name: summarize(chosen)
            for name, _ in LIST_VARIANTS
            if (chosen := [s for s in samples if s.request.variant == name])
        },
        "overall": overall,
        "client_send_lag_ms": {
            "p50": round(percentile(lags, 50), 2),
            "p99": round(percentile(lags, 99), 2),
            "max": round(lags[-1], 2) if lags else math.nan,
        },
        "measured_window_s": round(result.seconds, 1),
        "cpu": result.cpu,
        "load_average_1m_before": args.load_before,
        "db_sessions_opened": result.db_sessions,
        "ok": ok,
    }


def print_report(summary: dict[str, Any]) -> None:
    setup, target, cpu = summary["setup"], summary["target"], summary["cpu"]
    print(
        f"retrotest API load: {target['rate_per_s']:g} req/s for {setup['duration_s']:g} s, open loop, after a "
        f"{setup['warmup_s']:g} s warm-up; {setup['connections']} keep-alive connections at most"
    )
    print(f"server: {setup['server']}")
    print(
        f"data: {setup['jobs']:,} retro tests, {setup['partners']} partners, {setup['result_files']:,} result files; "
        f"latency runs from each request's scheduled send time to its last byte (or its failure)"
    )
    print()
    header = f"{'':<22}{'sent':>7}{'rate/s':>9}{'errors':>8}{'503':>7}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}  (ms)"
    print(header)

    def row(label: str, s: dict[str, Any]) -> None:
        print(
            f"{label:<22}{s['sent']:>7}{s['rate_per_s']:>9.1f}{s['errors']:>8}{s['shed_503']:>7}"
            f"{s['p50_ms']:>8.1f}{s['p90_ms']:>8.1f}{s['p99_ms']:>8.1f}{s['max_ms']:>8.1f}"
        )
        for example in s["error_examples"]:
            print(f"{'':<22}  error: {example}")

    row("status  GET /{id}", summary["endpoints"]["status"])
    row("list    GET ?limit=50", summary["endpoints"]["list"])
    for name, s in summary["list_variants"].items():
        row(f"  list: {name}", s)
    row("overall", summary["overall"])
    print()
    lag = summary["client_send_lag_ms"]
    print(
        f"client send lag (sent minus scheduled): p50 {lag['p50']:.2f} ms, p99 {lag['p99']:.2f} ms, "
        f"max {lag['max']:.2f} ms"
    )
    print(
        f"CPU over the measured {summary['measured_window_s']:g} s, % of one core: client "
        f"{cpu['client_pct_of_core']:.0f}%, API server {cpu['server_pct_of_core']:.0f}%, postgres (all databases) "
        f"{cpu['postgres_pct_of_core']:.0f}%; machine {cpu['machine_busy_pct']:.0f}% busy of {cpu['cores']:.0f} cores "
        f"(1-min load average {summary['load_average_1m_before']:.2f} before the run)"
    )
    print(f"database connections opened while measuring: {summary['db_sessions_opened']}")
    overall = summary["overall"]
    verdict = "OK" if summary["ok"] else "MISS"
    print(
        f"API server CPU per answered request: {summary['server_cpu_ms_per_request']:.2f} ms; "
        f"{overall['answered_within_1s_pct']:.2f}% answered within 1 s, {overall['shed_pct']:.1f}% shed (503)"
    )
    print(f"p99 {overall['p99_ms']:.1f} ms, max {overall['max_ms']:.1f} ms; target: {target['goal']}  {verdict}")


# --- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rate",
        type=float,
        action="append",
        help="requests per second, both endpoints together; repeat for several runs on one server "
        f"[default: {' and '.join(f'{r:g}' for r in DEFAULT_RATES)}]",
    )
    parser.add_argument(
        "--pages", type=int, default=100, help="open job pages for the polling vs pushed comparison (0: none)"
    )
    parser.add_argument("--pages-duration", type=float, default=20.0, help="measured seconds of each page mode")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds at the full rate before measuring")
    parser.add_argument("--jobs", type=int, default=10_000, help="retro tests to seed")
    parser.add_argument("--partners", type=int, default=8)
    parser.add_argument(
        "--connections",
        type=int,
        default=512,
        help="most connections the client opens: more than the API's in-flight bound (RETRO_API_MAX_IN_FLIGHT per "
        "process), so that overload reaches the server and is shed there rather than queued in this client",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="uvicorn worker processes; default: retrotest serve's own default"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed for the data and the request mix")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    args = parser.parse_args(argv)
    args.rate = args.rate or list(DEFAULT_RATES)
    if any(rate * args.duration < 1 or rate <= 0 for rate in args.rate):
        parser.error("--rate and --duration must make at least one request")
    return args


def serve_default_workers() -> int:
    """The worker count `retrotest serve` runs without --workers: the RETRO_API_WORKERS setting, as it reads it."""
    from app.config import Settings

    return Settings().api_workers


def raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace, *, db_name: str, tmp: Path) -> dict[str, Any]:
    log(f"creating database {db_name}")
    database_url = create_database(db_name)
    env = server_env(database_url=database_url, tmp=tmp)
    # This process seeds through the app's own services, so it needs the same settings before app.config loads.
    os.environ.update(env)
    log("migrating (retrotest migrate)")
    migrate(env)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    seeded = seed(jobs=args.jobs, partners=args.partners, rng=rng)
    log(
        f"seeded {len(seeded.job_ids):,} retro tests and {seeded.files:,} result files in {time.perf_counter() - t0:.1f} s"
    )
    from app.db import get_engine
    from app.demo import stop_process, wait_until_ready

    get_engine().dispose()

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = serve_command(port=port, workers=args.workers)
    default = serve_default_workers()
    workers = (
        f"retrotest serve --workers {args.workers} (asked for; the default is {default})"
        if args.workers is not None
        else f"retrotest serve, default --workers {default}, as docker-compose.yml runs it; RETRO_ENV=prod"
    )
    log(f"starting the API: {' '.join(cmd[1:])}")
    log_path = tmp / "api.log"
    proc = start_server(cmd=cmd, env=env, log_path=log_path)
    try:
        wait_until_ready(f"{base_url}/health", procs=[proc], timeout_s=60, logs=lambda: log_path.read_text()[-3000:])
        check_answers(base_url=base_url, token=seeded.token, seeded=seeded)
        rates = []
        for rate in args.rate:
            log(f"load: {args.warmup:g} s warm-up, then {args.duration:g} s at {rate:g} req/s")
            result = asyncio.run(
                run_load(
                    base_url=base_url,
                    token=seeded.token,
                    seeded=seeded,
                    rate=rate,
                    duration=args.duration,
                    warmup=args.warmup,
                    connections=args.connections,
                    rng=rng,
                    server_pgid=proc.pid,
                )
            )
            rates.append(build_summary(result=result, args=args, rate=rate, seeded=seeded, workers=workers))
        pages = None
        if args.pages and seeded.running_ids:
            watched = (seeded.running_ids * args.pages)[: args.pages]
            log(
                f"{len(watched)} open job pages: {args.pages_duration:g} s polling, then {args.pages_duration:g} s pushed"
            )
            pages = asyncio.run(
                compare_pages(
                    base_url=base_url,
                    token=seeded.token,
                    job_ids=watched,
                    seconds=args.pages_duration,
                    server_pgid=proc.pid,
                )
            )
    finally:
        log("stopping the API")
        stop_process(proc, grace_s=15)
    return {
        "rates": rates,
        "pages": pages,
        "server_log_errors": server_errors(log_path),
        "ok": all(r["ok"] for r in rates),
    }


# --- open job pages: each polling its job, or listening to its event stream -----------------------------------------


async def compare_pages(
    *, base_url: str, token: str, job_ids: list[uuid.UUID], seconds: float, server_pgid: int
) -> dict[str, Any]:
    """The API's CPU for N open pages of running jobs: each polling its job once a second (the job page before
    issue 32), then each listening to its job's event stream (app/retro_tests/live.py), measured side by side."""
    n = len(job_ids)
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, read=None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout) as client:
        plan = [
            PlannedRequest("status", "page poll", f"/api/v1/retro-tests/{job_ids[i % n]}")
            for i in range(int(n * seconds))
        ]
        poller = KeepAliveClient(base_url, headers=headers)
        before = cpu_snapshot(server_pgid)
        try:
            samples = await open_loop(poller, plan, rate=n, connections=n)
        finally:
            await poller.aclose()
        after = cpu_snapshot(server_pgid)
        polling = page_figures(
            before, after, pages=n, updates=sum(s.ok for s in samples), errors=sum(not s.ok for s in samples)
        )
        pushed = await listen_pages(client, job_ids=job_ids, seconds=seconds, server_pgid=server_pgid)
    return {"pages": n, "seconds": seconds, "polling": polling, "pushed": pushed}


async def listen_pages(
    client: httpx.AsyncClient, *, job_ids: list[uuid.UUID], seconds: float, server_pgid: int
) -> dict[str, float]:
    """Open one event stream per page (a few ms apart, as pages open), then count the updates for `seconds`."""
    counted = {"updates": 0, "errors": 0}
    measuring = asyncio.Event()
    opened = 0

    async def listen(job_id: uuid.UUID) -> None:
        nonlocal opened
        try:
            async with client.stream("GET", f"/api/v1/retro-tests/{job_id}/events") as resp:
                if resp.status_code != 200:
                    counted["errors"] += 1
                    return
                opened += 1
                async for line in resp.aiter_lines():
                    if line.startswith("event: job") and measuring.is_set():
                        counted["updates"] += 1
        except httpx.HTTPError:
            counted["errors"] += 1

    tasks = []
    for job_id in job_ids:
        tasks.append(asyncio.create_task(listen(job_id)))
        await asyncio.sleep(0.01)
    await asyncio.sleep(2)  # every stream open and past its first event
    before = cpu_snapshot(server_pgid)
    measuring.set()
    await asyncio.sleep(seconds)
    after = cpu_snapshot(server_pgid)
    measuring.clear()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    figures = page_figures(before, after, pages=len(job_ids), updates=counted["updates"], errors=counted["errors"])
    figures["streams_open"] = opened
    return figures


def page_figures(before: CpuSnapshot, after: CpuSnapshot, *, pages: int, updates: int, errors: int) -> dict[str, float]:
    wall = after.wall - before.wall
    server_s = after.server - before.server
    return {
        "updates_per_s": round(updates / wall, 1),
        "errors": errors,
        "server_pct_of_core": round(100 * server_s / wall, 1),
        "server_cpu_ms_per_page_second": round(1000 * server_s / wall / pages, 3),
    }


def print_all(report: dict[str, Any]) -> None:
    """Each rate's report, the summary lines side by side, the pages comparison and the API's logged errors."""
    for summary in report["rates"]:
        print_report(summary)
        print()
    print(
        f"{'rate/s':>7}{'sent':>7}{'errors':>8}{'503 %':>7}{'<1 s %':>8}{'p50':>8}{'p99':>9}{'max':>9}{'CPU/req':>9}  verdict"
    )
    for r in report["rates"]:
        o = r["overall"]
        print(
            f"{r['target']['rate_per_s']:>7g}{o['sent']:>7}{o['errors']:>8}{o['shed_pct']:>7.1f}"
            f"{o['answered_within_1s_pct']:>8.2f}{o['p50_ms']:>8.1f}{o['p99_ms']:>9.1f}{o['max_ms']:>9.1f}"
            f"{r['server_cpu_ms_per_request']:>7.2f}ms  {'OK' if r['ok'] else 'MISS'}: {r['target']['goal']}"
        )
    pages = report["pages"]
    if pages:
        print()
        print(f"{pages['pages']} open pages of running jobs, {pages['seconds']:g} s each way (API server CPU):")
        for mode in ("polling", "pushed"):
            p = pages[mode]
            print(
                f"  {mode:<8} {p['server_pct_of_core']:>6.1f}% of a core, {p['server_cpu_ms_per_page_second']:.3f} ms "
                f"per page-second, {p['updates_per_s']:.0f} updates/s, {p['errors']} errors"
            )
        ratio = pages["polling"]["server_pct_of_core"] / max(pages["pushed"]["server_pct_of_core"], 0.1)
        print(f"  pushed costs 1/{ratio:.1f} of polling")
    errors = report["server_log_errors"]
    print(f"API log: {sum(errors.values())} ERROR records" + (":" if errors else ""))
    for message, count in sorted(errors.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {count:>6}x  {message}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.load_before = os.getloadavg()[0]  # other work on the machine shows here
    signal.signal(signal.SIGTERM, raise_interrupt)
    db_name = f"retro_bench_api_{os.getpid()}"
    try:
        with tempfile.TemporaryDirectory(prefix="retro-bench-api-") as tmp:
            try:
                report = run(args, db_name=db_name, tmp=Path(tmp))
            finally:
                log(f"dropping database {db_name}")
                drop_database(db_name)
    except KeyboardInterrupt:
        log("interrupted; the API was stopped and the database dropped")
        return 130
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_all(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
