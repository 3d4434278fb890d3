"""The chaos suite: a retro test that must come out whole while its world falls apart.

    .venv/bin/python -m tests.chaos.run                   # the full run: 1,000,000 rows
    .venv/bin/python -m tests.chaos.run --rows 60000 ...  # smaller (CI runs one through tests/chaos/test_chaos.py)

It starts its own Redis and its own PostgreSQL cluster (so it can restart them), an MLflow registry, the API, two
worker replicas (as deploy/base runs them) and the control process (beat + reaper + reconciler), runs the job once cleanly, then again while:
  (a) the worker is SIGKILLed repeatedly (and started again), the last time while it publishes,
  (b) Redis is restarted (its queued messages are lost), and PostgreSQL is restarted,
  (c) the model server answers 5% 503, 1% hangs, 1% connection resets, and 400 for batches holding poison rows
      (one batch in 100 holds one, unless --poison says otherwise),
  (d) a second job is cancelled mid-run and the API is restarted.
The warm pool is on (--warm-ttl, 5 s): the jobs leave their model servers warm, a job's next attempt attaches
to the server its last attempt started (through a fault proxy that died with that worker: it is replaced), and
orphans are counted after the TTL, when the reaper should have stopped every server.
It prints rows lost, rows duplicated, poison rows isolated, orphan deployments and the time against the clean
run, and exits non-zero when any of them misses its target.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx

from tests import own_postgres as own_pg
from tests.own_postgres import OwnPostgres

POISON_INPUT, POISON_VALUE = "voice_minutes", -1
WORKERS = ("worker-1", "worker-2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen is not None else -1

    def start(self) -> Proc:
        self.popen = subprocess.Popen(
            self.args, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout=60)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@dataclass
class World:
    root: Path
    env: dict[str, str]
    redis_port: int
    api_port: int
    token: str
    pg: OwnPostgres
    procs: dict[str, Proc] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    strikes: list[str] = field(default_factory=list)
    self_exits: int = 0  # worker or control processes that ended without being killed (the supervisor restarts them)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=30, headers={"Authorization": f"Bearer {self.token}"})

    def note(self, what: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.events.append(f"{stamp} {what}")
        print(f"  [{stamp}] {what}", flush=True)


def start_redis(port: int, root: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(root),
        ],
        stdout=(root / "redis.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("redis-server did not start")


def write_history(root: Path, *, days: int, rows_per_day: int, poison: int, start: date) -> tuple[int, int]:
    """Synthetic history with about `poison` poison rows (voice_minutes = -1) spread evenly; returns (rows, poison)."""
    poison_every = max(1, days * rows_per_day // max(1, poison))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.demo_data import _day_table

    poison = 0
    for i in range(days):
        offset = i * rows_per_day
        day = start + timedelta(days=i)
        table = _day_table(day, rows_per_day, seed=i).drop_columns(["snapshot_date"])
        minutes = table.column("voice_minutes").to_numpy().copy()
        ids = table.column("customer_id").to_numpy()
        mask = (ids + offset) % poison_every == 0
        minutes[mask] = POISON_VALUE
        poison += int(mask.sum())
        table = table.set_column(table.schema.get_field_index("voice_minutes"), "voice_minutes", pa.array(minutes))
        folder = root / "features" / "customer_daily" / f"snapshot_date={day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / "part-0.parquet")
    return days * rows_per_day, poison


def build_world(args: argparse.Namespace, pg: OwnPostgres) -> World:
    root = Path(tempfile.mkdtemp(prefix="retro-chaos-"))
    redis_port, api_port = free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RETRO_") or k.startswith(("RETRO_CHAOS_P_", "RETRO_SCORE_WINDOW"))
    }
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "RETRO_ENV": "test",
            "RETRO_VAR_DIR": str(root / "var"),
            "RETRO_DATABASE_URL": pg.url,
            "RETRO_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "RETRO_QUEUE_NAME": "chaos",
            "RETRO_MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "RETRO_HISTORY_DIR": str(root / "history"),
            "RETRO_RESULTS_URL": str(root / "results"),
            "RETRO_PUBLIC_BASE_URL": f"http://127.0.0.1:{api_port}",
            "RETRO_WORKER_METRICS_PORT": "0",
            "RETRO_CHUNK_ROWS": str(max(1, args.rows // args.days)),  # a day per chunk: kills cost a day's work
            "RETRO_SCORE_BATCH_ROWS": str(args.batch),
            "RETRO_SCORE_TIMEOUT_S": "3",
            "RETRO_SCORE_RETRIES": "8",
            "RETRO_SCORE_BACKOFF_S": "0.05",
            "RETRO_MAX_REJECTED_RATIO": "0.01",
            "RETRO_HEARTBEAT_INTERVAL_S": "0.5",
            "RETRO_STALE_AFTER_S": "2",
            "RETRO_RECONCILE_INTERVAL_S": "1",
            "RETRO_REQUEUE_QUEUED_AFTER_S": "6",
            "RETRO_REAPER_INTERVAL_S": "3",
            "RETRO_MAX_ATTEMPTS": "50",
            "RETRO_CHAOS_HANG_S": "6",
            # The warm pool on, as in production, with a TTL short enough for the orphan count after it.
            "RETRO_WARM_TTL_S": str(args.warm_ttl),
        }
    )
    os.environ.update(env)
    subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, check=True, capture_output=True)
    from app.demo_data import register_demo_model

    register_demo_model(tracking_uri=env["RETRO_MLFLOW_TRACKING_URI"], artifact_root=root / "artifacts")
    token = make_admin_token()
    world = World(root=root, env=env, redis_port=redis_port, api_port=api_port, token=token, pg=pg)
    world.procs["redis"] = Proc("redis", [], env, root / "redis.log")
    world.procs["redis"].popen = start_redis(redis_port, root)
    return world


def make_admin_token() -> str:
    from app.auth import service
    from app.auth.models import Role
    from app.auth.schemas import UserCreate
    from app.db import get_session_factory

    with get_session_factory()() as session:
        user = service.create_user(
            session=session, data=UserCreate(username="chaos", role=Role.admin, password=None), actor="chaos"
        )
        session.flush()
        _, secret = service.create_api_token(session=session, user=user, name="chaos", actor="chaos")
        session.commit()
    return secret


def start_services(world: World, *, faults: bool) -> None:
    env = {**world.env, "RETRO_CHAOS_FAULTS": "1" if faults else "0"}
    py = sys.executable
    world.procs["api"] = Proc(
        "api",
        # One server process: the API is restarted mid-run, and on these 2 shared cores a second process's start
        # would be CPU taken from the job, which in production runs on other machines than the API.
        [py, "-m", "app.cli", "serve", "--port", str(world.api_port), "--skip-migrations", "--workers", "1"],
        env,
        world.root / "api.log",
    ).start()
    for name in WORKERS:  # two replicas, as deploy/base runs them: either can take a job over
        world.procs[name] = Proc(
            name, [py, "-m", "tests.chaos.worker"], {**env, "RETRO_CHAOS_WORKER_NAME": name}, world.root / f"{name}.log"
        ).start()
    world.procs["control"] = Proc("control", [py, "-m", "app.cli", "beat"], env, world.root / "control.log").start()
    wait_ready(world)


def wait_ready(world: World) -> None:
    from app.demo import wait_until_ready

    wait_until_ready(f"{world.api}/ready", timeout_s=90, logs=lambda: f"see {world.root}/api.log")


def stop_services(world: World) -> None:
    for name in (*WORKERS, "control", "api"):
        if name in world.procs:
            world.procs[name].stop()


def submit(world: World, start: date, end: date) -> str:
    body = {
        "partner_code": "chaos",
        "model_name": "churn",
        "model_version": "1",
        "period_start": start.isoformat(),
        "period_end": end.isoformat(),
        "output_formats": ["parquet"],
    }
    for _ in range(30):  # the API may be restarting
        try:
            with world.client() as c:
                c.post("/api/v1/partners", json={"code": "chaos", "name": "Chaos"})
                resp = c.post("/api/v1/retro-tests", json=body)
            if resp.status_code in (200, 202):
                return str(resp.json()["id"])
            raise RuntimeError(f"submit refused: {resp.status_code} {resp.text}")
        except httpx.HTTPError:
            time.sleep(1)
    raise RuntimeError("could not submit")


def job(world: World, job_id: str) -> dict[str, Any] | None:
    try:
        with world.client() as c:
            resp = c.get(f"/api/v1/retro-tests/{job_id}")
        return dict(resp.json()) if resp.status_code == 200 else None
    except httpx.HTTPError:
        return None  # the API is restarting


def wait_terminal(world: World, job_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        j = job(world, job_id)
        if j and j["state"] in ("succeeded", "failed", "cancelled"):
            return j
        time.sleep(0.5)
    raise RuntimeError(f"job {job_id} did not end within {timeout_s} s: {job(world, job_id)}")


def duration(j: dict[str, Any]) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(j["finished_at"]) - datetime.fromisoformat(j["created_at"])).total_seconds()


def check_rows(
    world: World, j: dict[str, Any], source_keys: set[tuple[int, str]], poison_keys: set[tuple[int, str]]
) -> dict[str, int]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    files = {f["name"]: f for f in j["files"]}
    with world.client() as c:
        scores = pq.read_table(io.BytesIO(c.get(files["scores.parquet"]["download_url"]).content))
        rejects_blob = c.get(files["rejects.csv.gz"]["download_url"]).content if "rejects.csv.gz" in files else None
    scored = list(
        zip(
            scores.column("customer_id").to_pylist(),
            (d.isoformat() for d in scores.column("snapshot_date").to_pylist()),
            strict=True,
        )
    )
    rejected: list[tuple[int, str]] = []
    if rejects_blob:
        rej = pacsv.read_csv(io.BytesIO(gzip.decompress(rejects_blob)))
        rejected = list(
            zip(
                rej.column("customer_id").to_pylist(),
                (str(d) for d in rej.column("snapshot_date").to_pylist()),
                strict=True,
            )
        )
    seen = set(scored) | set(rejected)
    return {
        "rows_source": len(source_keys),
        "rows_scored": len(scored),
        "rows_lost": len(source_keys - seen),
        "rows_duplicated": (len(scored) - len(set(scored)))
        + (len(rejected) - len(set(rejected)))
        + len(set(scored) & set(rejected)),
        "poison_rows": len(poison_keys),
        "poison_isolated": len(set(rejected) & poison_keys),
        "clean_rows_rejected": len(set(rejected) - poison_keys),
    }


def orphan_deployments(world: World) -> int:
    """Model servers still running, or deployment folders still on disk, for this world."""
    folder = world.root / "var" / "deployments"
    leftovers = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")] if folder.exists() else []
    return len(leftovers) + len(model_server_pids(world))


def model_server_pids(world: World) -> list[int]:
    """The model server processes of this world's deployments."""
    folder = str(world.root / "var" / "deployments").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if folder in cmd and b"mlserver" in cmd:
                pids.append(int(proc.name))
    return pids


def pool_children(pid: int) -> list[int]:
    """The Celery pool processes under a worker's main process."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def supervise(world: World, *, stop: threading.Event, lock: threading.Lock) -> None:
    """Start the worker or the control process again when one exits on its own, as Kubernetes or compose would."""
    while not stop.wait(1.0):
        with lock:
            for name in (*WORKERS, "control"):
                proc = world.procs[name]
                if proc.popen is not None and proc.popen.poll() is not None:
                    world.note(f"{name} exited on its own (code {proc.popen.returncode}); started again")
                    world.self_exits += 1
                    proc.start()


def sample_progress(
    world: World, job_id: str, *, into: list[tuple[float, str, int]], stop: threading.Event
) -> threading.Thread:
    """A thread noting a job's (seconds, state, rows scored) every half second: where a run spends its time."""

    def sample() -> None:
        started = time.monotonic()
        while not stop.wait(0.5):
            j = job(world, job_id)
            if j is not None:
                into.append((time.monotonic() - started, j["state"], j["progress"]["rows_scored"]))

    thread = threading.Thread(target=sample, name="progress", daemon=True)
    thread.start()
    return thread


def timeline_lines(timeline: list[tuple[float, str, int]], every_s: float = 2.0) -> list[str]:
    """The sampled progress, one line per `every_s` seconds and per change of state."""
    lines, last_t, last_state, last_rows = [], -every_s, "", 0
    for t, state, rows in timeline:
        if state != last_state or t - last_t >= every_s:
            rate = (rows - last_rows) / (t - last_t) if t > last_t and state == last_state else 0.0
            lines.append(f"{t:6.1f} s  {state:<11} {rows:>10,} rows  {rate:>9,.0f} rows/s")
            last_t, last_state, last_rows = t, state, rows
    return lines


def planned_strikes(kills: int) -> list[str]:
    """The cancel first (the second job stops taking CPU), then kills with Redis and PostgreSQL restarted between,
    the API last while it scores, and a kill of the job's process while it publishes.

    The API goes last of the scoring strikes: the loop reads progress from the database, but the cancel and the
    final report go through the API.
    """
    actions = ["cancel", *("kill-pool" if i % 2 == 0 else "kill-worker" for i in range(kills))]
    actions.insert(min(2, len(actions)), "redis")
    actions.insert(min(3, len(actions)), "db")
    return [*actions, "api", "publish"]


def strike_marks(rows: int, strikes: int) -> list[int]:
    """Rows scored at which each strike after the cancel lands: evenly spaced over the first two thirds of the job.

    Marks in rows rather than seconds put every strike in the same place on a fast machine as on a slow one. The
    last third is left for the last strike to land and the job to publish: progress moves a whole chunk (a day) at a
    time, and a job resumed after a kill scores its remaining days in a burst. With marks spread to the end, the
    last one fell inside the final chunk, and a CI run saw the job finish before it (5 of 7 strikes landed).
    """
    return [rows * 2 * (i + 1) // (3 * strikes) for i in range(strikes)]


def chaos_loop(
    world: World,
    *,
    main_id: str,
    cancel_id: str,
    actions: list[str],
    rows: int,
    stop: threading.Event,
    lock: threading.Lock,
) -> None:
    """While the main job scores: kill worker processes, restart Redis, cancel the second job, restart the API."""
    pending = list(actions)
    while pending and pending[0] == "cancel":
        # The second job is cancelled while it starts its model server, the stage with the most to undo.
        j = job(world, cancel_id)
        if j and j["state"] in ("deploying", "scoring", "succeeded", "failed", "cancelled"):
            with lock:
                strike(world, "cancel", 0, main_id=main_id, cancel_id=cancel_id)
            world.strikes.append(pending.pop(0))
        elif stop.wait(0.2):
            return
    at_publishing = [a for a in pending if a == "publish"]
    pending = [a for a in pending if a != "publish"]
    for action, mark in zip(pending, strike_marks(rows, len(pending)), strict=True):
        # Strike while rows are being scored, once the job has scored past this strike's mark.
        while True:
            state, scored = job_state(main_id)
            if state in ("succeeded", "failed", "cancelled"):
                world.note(f"{action}: the job ended before it scored {mark:,} rows")
                return
            if state == "scoring" and scored >= mark:
                with lock:
                    if strike(world, action, scored, main_id=main_id, cancel_id=cancel_id):
                        break
            if stop.wait(0.05):
                return
        world.strikes.append(action)
    for action in at_publishing:
        # The job's process is killed while it publishes: the window between its files and its verdict. Its state
        # is read from the database, not the API: the API may be restarting just then (the strike before it), and
        # a short publishing stage would pass unseen.
        while True:
            state, scored = job_state(main_id)
            if state in ("succeeded", "failed", "cancelled"):
                world.note(f"{action}: the job ended before it could be struck while publishing")
                return
            if state == "publishing":
                with lock:
                    if strike(world, action, scored, main_id=main_id, cancel_id=cancel_id):
                        break
            if stop.wait(0.05):
                return
        world.strikes.append(action)


def job_state(job_id: str) -> tuple[str | None, int]:
    """The job's state and rows scored, read from the database."""
    import uuid

    from app.core.jobs import RetroTest
    from app.db import get_session_factory

    try:
        with get_session_factory()() as s:
            job = s.get(RetroTest, uuid.UUID(job_id))
            return (job.state.value, job.rows_scored) if job is not None else (None, 0)
    except Exception:  # PostgreSQL is restarting
        return None, 0


def holder_pid(job_id: str) -> int | None:
    """The process holding the job's lease (a worker's pool process), from the job's lease_holder (host:pid)."""
    import uuid

    from app.core.jobs import RetroTest
    from app.db import get_session_factory

    with get_session_factory()() as s:
        job = s.get(RetroTest, uuid.UUID(job_id))
        holder = job.lease_holder if job is not None else None
    pid = (holder or "").rpartition(":")[2]
    return int(pid) if pid.isdigit() and Path(f"/proc/{pid}").exists() else None


def strike(world: World, action: str, last_rows: int, *, main_id: str, cancel_id: str) -> bool:
    """One blow: kill the job's pool process or its whole worker, restart Redis, cancel a job, restart the API.

    False when it could not land (no live process holds the job just now); the loop tries again later.
    """
    pid = holder_pid(main_id)
    worker = next((w for w in WORKERS if pid in pool_children(world.procs[w].pid)), None)
    if action == "publish" and pid is not None:
        os.kill(pid, signal.SIGKILL)
        world.note(f"SIGKILL the job's pool process {pid} ({worker}) while it publishes")
    elif action == "kill-pool" and pid is not None:
        os.kill(pid, signal.SIGKILL)
        world.note(f"SIGKILL the job's pool process {pid} ({worker}) at {last_rows:,} rows scored")
    elif action == "kill-worker" and worker is not None:
        world.procs[worker].kill()
        world.note(f"SIGKILL the job's whole worker ({worker}) at {last_rows:,} rows scored")
        world.procs[worker].start()
    elif action in ("kill-pool", "kill-worker", "publish"):
        world.note(f"{action}: no live worker process holds the job at {last_rows:,} rows scored; skipped")
        return False
    elif action == "db":
        world.pg.restart()
        world.note(f"PostgreSQL restarted at {last_rows:,} rows scored")
    elif action == "redis":
        world.procs["redis"].kill()
        world.procs["redis"].popen = start_redis(world.redis_port, world.root)
        world.note(f"Redis restarted at {last_rows:,} rows scored (its queued messages are lost)")
    elif action == "cancel":
        state = (job(world, cancel_id) or {}).get("state")
        with world.client() as c:
            resp = c.post(f"/api/v1/retro-tests/{cancel_id}/cancel")
        world.note(f"cancel of the second job while {state} -> {resp.status_code}")
    elif action == "api":  # the next strike waits until it answers again
        world.procs["api"].kill()
        world.procs["api"].start()
        world.note(f"API killed and started again at {last_rows:,} rows scored")
    else:
        raise ValueError(f"unknown strike {action!r}")
    return True


def source_keys(world: World, start: date, end: date) -> tuple[set[tuple[int, str]], set[tuple[int, str]]]:
    import pyarrow.dataset as ds

    table = ds.dataset(
        world.root / "history" / "features" / "customer_daily", format="parquet", partitioning="hive"
    ).to_table(columns=["customer_id", "snapshot_date", "voice_minutes"])
    keys, poison = set(), set()
    for cid, day, minutes in zip(
        *(table.column(c).to_pylist() for c in ("customer_id", "snapshot_date", "voice_minutes")), strict=True
    ):
        day = str(day)
        if start.isoformat() <= day <= end.isoformat():
            keys.add((cid, day))
            if minutes == POISON_VALUE:
                poison.add((cid, day))
    return keys, poison


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not own_pg.available():
        raise SystemExit("the chaos suite restarts a PostgreSQL cluster of its own: it needs initdb and runuser (root)")
    from app.db import use_patient_connections

    use_patient_connections()  # this harness reads the job database too, across the restarts it makes
    with own_pg.own_postgres() as pg:
        return _run(args, pg)


def _run(args: argparse.Namespace, pg: OwnPostgres) -> dict[str, Any]:
    strikes = [] if args.faults_only else (args.strikes.split(",") if args.strikes else planned_strikes(args.kills))
    world = build_world(args, pg)
    start = date.today() - timedelta(days=args.days + 10)
    end = start + timedelta(days=args.days - 1)
    rows, poison = write_history(
        world.root / "history", days=args.days, rows_per_day=args.rows // args.days, poison=args.poison, start=start
    )
    print(f"chaos: {rows:,} rows over {args.days} days, {poison} poison rows; work dir {world.root}", flush=True)
    keys, poison_keys = source_keys(world, start, end)
    report: dict[str, Any] = {"rows": rows}
    try:
        print("clean run ...", flush=True)
        start_services(world, faults=False)
        clean_id, clean_timeline, clean_stop = submit(world, start, end), [], threading.Event()
        sample_progress(world, clean_id, into=clean_timeline, stop=clean_stop)
        clean = wait_terminal(world, clean_id, timeout_s=args.timeout)
        clean_stop.set()
        assert clean["state"] == "succeeded", clean
        report["clean_seconds"] = duration(clean)
        stop_services(world)

        print("chaos run ...", flush=True)
        start_services(world, faults=True)
        main_id = submit(world, start, end)
        cancel_id = (
            submit(world, start, start + timedelta(days=max(0, args.days // 2 - 1))) if "cancel" in strikes else ""
        )
        stop, lock = threading.Event(), threading.Lock()
        supervisor = threading.Thread(target=supervise, args=(world,), kwargs={"stop": stop, "lock": lock}, daemon=True)
        supervisor.start()
        chaos_timeline: list[tuple[float, str, int]] = []
        sample_progress(world, main_id, into=chaos_timeline, stop=stop)
        chaos = threading.Thread(
            target=chaos_loop,
            args=(world,),
            kwargs={
                "main_id": main_id,
                "cancel_id": cancel_id,
                "actions": strikes,
                "rows": rows,
                "stop": stop,
                "lock": lock,
            },
            daemon=True,
        )
        if strikes:
            chaos.start()
        final = wait_terminal(world, main_id, timeout_s=args.timeout)
        stop.set()
        if chaos.is_alive():
            chaos.join()
        supervisor.join()
        cancelled = wait_terminal(world, cancel_id, timeout_s=args.timeout) if cancel_id else {"state": "not run"}
        report["chaos_seconds"] = duration(final)
        report["chaos_state"] = final["state"]
        report["chaos_error"] = final["error"]
        report["attempts"] = final["attempts"]
        report["cancelled_job_state"] = cancelled["state"]
        if final["state"] == "succeeded":
            report.update(check_rows(world, final, keys, poison_keys))
        # The reaper's turn, after the warm servers' TTL: every server left is an orphan then.
        time.sleep(float(world.env["RETRO_WARM_TTL_S"]) + 3 * float(world.env["RETRO_REAPER_INTERVAL_S"]) + 2)
        report["orphan_deployments"] = orphan_deployments(world)
        report["events"] = world.events
        report["timeline"] = [f"clean {line}" for line in timeline_lines(clean_timeline)]
        report["timeline"] += [f"chaos {line}" for line in timeline_lines(chaos_timeline)]
        report["strikes_planned"] = len(strikes)
        report["strikes_done"] = len(world.strikes)
        report["processes_exited_on_their_own"] = world.self_exits
    finally:
        stop_services(world)
        world.procs["redis"].kill()
        leftover = orphan_deployments(world)
        if leftover:
            subprocess.run(["pkill", "-f", str(world.root / "var" / "deployments")], check=False)
        from app.db import get_engine

        get_engine().dispose()
        if not args.keep:
            shutil.rmtree(world.root, ignore_errors=True)
    report["time_ratio"] = report["chaos_seconds"] / report["clean_seconds"]
    return report


def verdict(report: dict[str, Any], max_ratio: float) -> list[str]:
    """Targets missed, as sentences; empty when the run met every target."""
    misses = []
    if report.get("chaos_state") != "succeeded":
        misses.append(f"the job ended {report.get('chaos_state')}: {report.get('chaos_error')}")
        return misses
    if report["rows_lost"]:
        misses.append(f"{report['rows_lost']} rows lost")
    if report["rows_duplicated"]:
        misses.append(f"{report['rows_duplicated']} rows duplicated")
    if report["poison_isolated"] != report["poison_rows"] or report["clean_rows_rejected"]:
        misses.append(
            f"poison rows isolated {report['poison_isolated']}/{report['poison_rows']}, clean rows rejected {report['clean_rows_rejected']}"
        )
    if report["orphan_deployments"]:
        misses.append(f"{report['orphan_deployments']} orphan deployments")
    if report["cancelled_job_state"] not in ("cancelled", "not run"):
        misses.append(f"the cancelled job ended {report['cancelled_job_state']}")
    if report["strikes_done"] < report["strikes_planned"]:
        misses.append(
            f"only {report['strikes_done']} of {report['strikes_planned']} strikes landed before the job ended "
            "(the job ended before the last strike's mark)"
        )
    if report["time_ratio"] > max_ratio:
        misses.append(f"time {report['time_ratio']:.2f}x the clean run (target <= {max_ratio}x)")
    return misses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=20)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument(
        "--poison",
        type=int,
        help="about how many poison rows (default: one per 100 batches, the issue's 1%% of requests answered 400; "
        "at least 2)",
    )
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--max-ratio", type=float, default=1.5)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) afterwards")
    parser.add_argument(
        "--warm-ttl",
        type=float,
        default=5.0,
        help="RETRO_WARM_TTL_S: jobs leave their model servers warm this long (0: the pool off); orphans are counted "
        "after it, once the reaper has had its turns",
    )
    parser.add_argument(
        "--faults-only",
        action="store_true",
        help="model server faults and poison rows, but no kills, restarts or cancel: what the faults alone cost",
    )
    parser.add_argument(
        "--strikes",
        help="comma-separated strikes in order, from cancel, kill-pool, kill-worker, redis, db, api, publish (default: "
        "the cancel, then --kills kills with Redis and PostgreSQL restarted between, the API, and a kill while "
        "publishing)",
    )
    args = parser.parse_args(argv)
    if args.poison is None:
        args.poison = max(2, args.rows // args.batch // 100)
    report = run(args)
    print("\nchaos report")
    for line in report.pop("events", []):
        print(f"  event {line}")
    for line in report.pop("timeline", []):
        print(f"  progress {line}")
    for key in (
        "rows",
        "rows_scored",
        "rows_lost",
        "rows_duplicated",
        "poison_rows",
        "poison_isolated",
        "clean_rows_rejected",
        "orphan_deployments",
        "attempts",
        "cancelled_job_state",
        "processes_exited_on_their_own",
        "clean_seconds",
        "chaos_seconds",
        "time_ratio",
    ):
        value = report.get(key)
        print(f"  {key:<30} {value:.2f}" if isinstance(value, float) else f"  {key:<30} {value}")
    misses = verdict(report, args.max_ratio)
    print("  verdict: " + ("all targets met" if not misses else "; ".join(misses)))
    print("RESULT " + json.dumps(report, default=str))
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())
