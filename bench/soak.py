"""Soak: many jobs from several partners and account managers while faults strike at random, bounded in time.

    .venv/bin/python -m bench.soak [--minutes 5] [--jobs 20] [--partners 5] [--managers 3] [--seed 1]

On the chaos suite's world (tests/chaos/run.py: its own PostgreSQL cluster and Redis, an MLflow registry, the API,
two workers, beat with the reaper and reconciler): account managers submit `--jobs` retro tests for `--partners`
partners, spread over the first part of the run, while a reader keeps the API under a steady load of list and status
requests and a fault strikes every `--fault-every` seconds, drawn at random from the chaos suite's: a worker killed
(SIGKILL, started again), a model server killed, PostgreSQL restarted, Redis restarted, a running job cancelled.
Then it waits for every job to end (or the time to run out), gives the reaper a turn, and prints jobs succeeded,
failed (with their reasons), cancelled and stuck; rows lost and duplicated in the succeeded jobs' files; orphan
deployments; and the API's p50/p99 over the run. Exits non-zero on a stuck job, a lost or duplicated row, or an
orphan.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from datetime import date, timedelta
from typing import Any

import httpx

from bench.teardown import owned_processes
from tests import own_postgres as own_pg
from tests.chaos import run as chaos

FAULTS = ("kill-worker", "kill-model-server", "db", "redis", "cancel")
ENDED = ("succeeded", "failed", "cancelled")


class Soak:
    """The world, the people in it and what happened to it."""

    def __init__(self, world: chaos.World, *, start: date, days: int, seed: int) -> None:
        self.world = world
        self.start, self.days = start, days
        self.random = random.Random(seed)
        self.lock = threading.Lock()  # faults and the supervisor's restarts take turns
        self.stop = threading.Event()
        self.jobs: dict[str, dict[str, Any]] = {}  # id -> request (partner, period, token)
        self.latencies: list[float] = []
        self.read_errors: Counter[str] = Counter()
        self.faults: list[str] = []

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.world.api, timeout=30, headers={"Authorization": f"Bearer {token}"})


def people(soak: Soak, *, partners: int, managers: int) -> list[tuple[str, str]]:
    """Partners and account managers (each partner with one manager, round robin); (partner code, token) pairs."""
    from app.auth import service
    from app.auth.models import Role
    from app.auth.schemas import UserCreate
    from app.db import get_session_factory

    tokens = {}
    with get_session_factory()() as session:
        for m in range(managers):
            user = service.create_user(
                session=session,
                data=UserCreate(username=f"manager-{m}", role=Role.account_manager, password=None),
                actor="soak",
            )
            session.flush()
            tokens[user.username] = service.create_api_token(session=session, user=user, name="soak", actor="soak")[1]
        session.commit()
    pairs = []
    with soak.client(soak.world.token) as admin:
        for p in range(partners):
            code, manager = f"partner-{p}", f"manager-{p % managers}"
            created = admin.post("/api/v1/partners", json={"code": code, "name": f"Partner {p}"})
            created.raise_for_status()
            admin.put(f"/api/v1/partners/{created.json()['id']}/managers", json={"usernames": [manager]})
            pairs.append((code, tokens[manager]))
    return pairs


def submit_all(soak: Soak, pairs: list[tuple[str, str]], *, jobs: int, over_s: float) -> None:
    """`jobs` requests spread evenly over over_s seconds: partner i % partners, a period of a different length each."""
    for i in range(jobs):
        if soak.stop.wait(over_s / jobs if i else 0):
            return
        code, token = pairs[i % len(pairs)]
        end = soak.start + timedelta(days=(i // len(pairs)) % soak.days)
        body = {
            "partner_code": code,
            "model_name": "churn",
            "model_version": "1",
            "period_start": soak.start.isoformat(),
            "period_end": end.isoformat(),
            "output_formats": ["parquet"],
        }
        for _ in range(60):  # the API answers 503 while PostgreSQL restarts
            try:
                with soak.client(token) as c:
                    resp = c.post("/api/v1/retro-tests", json=body)
                if resp.status_code in (200, 202):
                    soak.jobs[resp.json()["id"]] = {"partner": code, "end": end, "token": token}
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            print(f"  could not submit job {i}", flush=True)


def read_load(soak: Soak, *, per_s: float) -> None:
    """A steady stream of list and status requests (as pages and scripts poll), each one's latency noted."""
    with soak.client(soak.world.token) as c:
        while not soak.stop.wait(1 / per_s):
            ids = list(soak.jobs)
            path = f"/api/v1/retro-tests/{soak.random.choice(ids)}" if ids and soak.random.random() < 0.5 else None
            t0 = time.perf_counter()
            try:
                resp = c.get(path or "/api/v1/retro-tests?limit=20")
            except httpx.HTTPError as exc:
                soak.read_errors[type(exc).__name__] += 1
                continue
            if resp.status_code == 200:
                soak.latencies.append(time.perf_counter() - t0)
            else:
                soak.read_errors[str(resp.status_code)] += 1


def strike(soak: Soak, fault: str) -> str:
    world = soak.world
    if fault == "kill-worker":
        name = soak.random.choice(chaos.WORKERS)
        world.procs[name].kill()
        world.procs[name].start()
        return f"SIGKILL {name} (started again)"
    if fault == "kill-model-server":
        servers = chaos.model_server_pids(world)
        if not servers:
            return "kill-model-server: none running"
        pid = soak.random.choice(servers)
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL model server {pid}"
    if fault == "db":
        world.pg.restart()
        return "PostgreSQL restarted"
    if fault == "redis":
        world.procs["redis"].kill()
        world.procs["redis"].popen = chaos.start_redis(world.redis_port, world.root)
        return "Redis restarted (its queued messages are lost)"
    running = [i for i in list(soak.jobs) if (chaos.job(world, i) or {}).get("state") not in (*ENDED, None)]
    if not running:
        return "cancel: no job running"
    job_id = soak.random.choice(running)
    with soak.client(soak.jobs[job_id]["token"]) as c:
        status = c.post(f"/api/v1/retro-tests/{job_id}/cancel").status_code
    soak.jobs[job_id]["cancelled"] = True
    return f"cancel {job_id[:8]} -> {status}"


def fault_loop(soak: Soak, *, every_s: float, until: float) -> None:
    while not soak.stop.wait(every_s * soak.random.uniform(0.5, 1.5)) and time.monotonic() < until:
        fault = soak.random.choice(FAULTS)
        with soak.lock:
            what = strike(soak, fault)
        soak.faults.append(what)
        soak.world.note(what)


def outcome(soak: Soak) -> dict[str, Any]:
    """Jobs by how they ended, rows lost and duplicated in the succeeded ones' files."""
    states: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    rows = {"rows_lost": 0, "rows_duplicated": 0, "rows_checked": 0}
    keys_by_end: dict[date, set[tuple[int, str]]] = {}
    stuck = []
    for job_id, request in soak.jobs.items():
        j = chaos.job(soak.world, job_id) or {"state": "unknown"}
        states[j["state"]] += 1
        if j["state"] not in ENDED:
            stuck.append(f"{job_id[:8]} {j['state']}")
        elif j["state"] == "failed":
            reasons[(j.get("error") or {}).get("code", "?")] += 1
        elif j["state"] == "succeeded":
            end = request["end"]
            if end not in keys_by_end:
                keys_by_end[end] = chaos.source_keys(soak.world, soak.start, end)[0]
            checked = chaos.check_rows(soak.world, j, keys_by_end[end], set())
            rows["rows_lost"] += checked["rows_lost"]
            rows["rows_duplicated"] += checked["rows_duplicated"]
            rows["rows_checked"] += checked["rows_source"]
        if j["state"] == "cancelled" and not request.get("cancelled"):
            reasons["cancelled without a cancel"] += 1
    return {"states": dict(states), "failed_reasons": dict(reasons), "stuck": stuck, **rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from app.db import use_patient_connections

    use_patient_connections()
    with own_pg.own_postgres() as pg:
        world_args = argparse.Namespace(rows=args.days * args.rows_per_day, days=args.days, batch=1000)
        world = chaos.build_world(world_args, pg)
        start = date.today() - timedelta(days=args.days + 10)
        chaos.write_history(
            world.root / "history", days=args.days, rows_per_day=args.rows_per_day, poison=0, start=start
        )
        soak = Soak(world, start=start, days=args.days, seed=args.seed)
        try:
            return soak_run(soak, args)
        finally:
            soak.stop.set()
            chaos.stop_services(world)
            world.procs["redis"].kill()
            if not args.keep:
                shutil.rmtree(world.root, ignore_errors=True)


def all_ended(soak: Soak, jobs: int) -> bool:
    return len(soak.jobs) == jobs and all(
        (chaos.job(soak.world, i) or {}).get("state") in ENDED for i in list(soak.jobs)
    )


def soak_run(soak: Soak, args: argparse.Namespace) -> dict[str, Any]:
    world = soak.world
    chaos.start_services(world, faults=False)
    pairs = people(soak, partners=args.partners, managers=args.managers)
    began = time.monotonic()
    deadline = began + args.minutes * 60
    threads = [
        threading.Thread(target=chaos.supervise, args=(world,), kwargs={"stop": soak.stop, "lock": soak.lock}),
        threading.Thread(target=read_load, args=(soak,), kwargs={"per_s": args.reads_per_s}),
        threading.Thread(target=fault_loop, args=(soak,), kwargs={"every_s": args.fault_every, "until": deadline - 60}),
    ]
    for t in threads:
        t.daemon = True
        t.start()
    print(
        f"soak: {args.jobs} jobs from {args.partners} partners, {args.minutes} min; work dir {world.root}", flush=True
    )
    submit_all(soak, pairs, jobs=args.jobs, over_s=args.minutes * 60 * 0.5)
    # Until every job has ended, or the time is up; then, faults over, a drain for the jobs still running: a job
    # still running after it is stuck (on a busy machine 20 jobs may well outlast the time given).
    while time.monotonic() < deadline and not all_ended(soak, args.jobs):
        time.sleep(2)
    if not all_ended(soak, args.jobs):
        world.note(f"time is up: up to {args.drain_minutes} min more for the jobs still running, without faults")
        while time.monotonic() < deadline + args.drain_minutes * 60 and not all_ended(soak, args.jobs):
            time.sleep(2)
    ran_s = time.monotonic() - began
    soak.stop.set()
    for t in threads:
        t.join(timeout=120)
    report = outcome(soak)
    time.sleep(3 * float(world.env["RETRO_REAPER_INTERVAL_S"]) + 2)  # the reaper's turn for deployments of ended jobs
    lat = sorted(soak.latencies)
    report.update(
        {
            "submitted": len(soak.jobs),
            "seconds": round(ran_s, 1),
            "orphan_deployments": chaos.orphan_deployments(world),
            "faults": soak.faults,
            "api_reads": len(lat),
            "api_read_errors": dict(soak.read_errors),
            "api_p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
            "api_p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 1) if lat else None,
            "processes_exited_on_their_own": world.self_exits,
        }
    )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--minutes", type=float, default=5, help="jobs submitted over the first half, faults until 1 min before"
    )
    parser.add_argument("--drain-minutes", type=float, default=5, help="then, without faults, for jobs still running")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--partners", type=int, default=5)
    parser.add_argument("--managers", type=int, default=3)
    parser.add_argument("--days", type=int, default=4, help="days of history; jobs ask for 1 to this many")
    parser.add_argument("--rows-per-day", type=int, default=2000)
    parser.add_argument("--fault-every", type=float, default=25, help="seconds between faults, on average")
    parser.add_argument("--reads-per-s", type=float, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) afterwards")
    args = parser.parse_args()
    if not own_pg.available():
        raise SystemExit("the soak restarts a PostgreSQL cluster of its own: it needs initdb and runuser (root)")
    with owned_processes():
        report = run(args)
    print("\nsoak report")
    for line in report.pop("faults"):
        print(f"  fault {line}")
    for key, value in report.items():
        print(f"  {key:<30} {value}")
    misses = [
        m
        for m, bad in (
            (f"{len(report['stuck'])} stuck", report["stuck"]),
            (f"{report['rows_lost']} rows lost", report["rows_lost"]),
            (f"{report['rows_duplicated']} rows duplicated", report["rows_duplicated"]),
            (f"{report['orphan_deployments']} orphans", report["orphan_deployments"]),
            (f"{args.jobs - report['submitted']} not submitted", args.jobs - report["submitted"]),
        )
        if bad
    ]
    print("  verdict: " + ("all targets met" if not misses else "; ".join(misses)))
    print("RESULT " + json.dumps(report, default=str))
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())
