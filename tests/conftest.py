"""Session fixtures: a fresh Postgres database, Redis as broker, a real MLflow registry, real history files.

Environment variables are set before any app module reads its settings, so the app under test, the
worker processes and the fixtures all see the same configuration.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from tests.hive_server import HiveServer

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("RETRO_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("RETRO_TEST_REDIS", "redis://127.0.0.1:6379/0")

_RUN = secrets.token_hex(4)
_TMP = Path(tempfile.mkdtemp(prefix=f"retrotest-{_RUN}-"))


# Model environments are built once per test run, not once per xdist worker: the cache is made for builders that
# share it (a lock per environment, app/integrations/environments/cache.py). The folder is named by xdist's id of
# the run, which every worker has, and the controller (or a run without xdist) removes it at the end.
def _shared_folder(run_id: str) -> Path:
    return Path(tempfile.gettempdir()) / f"retrotest-shared-{run_id}"


DB_NAME = f"retrotest_{_RUN}"

# Settings for everything under test; set before app.config is imported anywhere.
os.environ.update(
    {
        "RETRO_ENV": "test",
        "RETRO_VAR_DIR": str(_TMP / "var"),
        "RETRO_ENV_CACHE_DIR": str(_shared_folder(os.environ.get("PYTEST_XDIST_TESTRUNUID", _RUN)) / "envs"),
        "RETRO_DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{DB_NAME}",
        "RETRO_BROKER_URL": REDIS_URL,
        "RETRO_QUEUE_NAME": f"retrotest-{_RUN}",
        "RETRO_MLFLOW_TRACKING_URI": f"sqlite:///{_TMP / 'mlflow.db'}",
        "RETRO_HISTORY_DIR": str(_TMP / "history"),
        "RETRO_RESULTS_URL": str(_TMP / "results"),
        "RETRO_CHUNK_ROWS": "2500",  # ROWS_PER_DAY: a day per chunk, so the tests see several chunks
        "RETRO_SCORE_BATCH_ROWS": "1000",
        "RETRO_READ_BATCH_ROWS": "5000",
        # Each test sees its own job's deployment start and go; tests/test_warm_pool.py turns the pool on.
        "RETRO_WARM_TTL_S": "0",
    }
)

from app.demo import stop_process, wait_until_ready  # noqa: E402  (after the settings above)

# The history every end-to-end test reads: 4 days before "today minus 30".
HISTORY_START = date.today() - timedelta(days=34)
HISTORY_DAYS = 4
ROWS_PER_DAY = 2_500
HIVE_DAY = date(2026, 1, 5)  # the day of features.all_types in the session's Hive


def _admin_engine():  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine

    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh Postgres database for this test session, migrated to head with Alembic."""
    from sqlalchemy import text

    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{DB_NAME}"'))
    from app.cli import migrate_database

    migrate_database()
    yield os.environ["RETRO_DATABASE_URL"]
    from app.db import get_engine

    get_engine().dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def registry() -> dict[str, str]:
    """A real MLflow registry (SQLite + file artifacts) holding the sample models the tests need."""
    from app.demo_data import register_demo_model

    tracking = os.environ["RETRO_MLFLOW_TRACKING_URI"]
    artifacts = _TMP / "mlflow-artifacts"
    versions = {
        "churn": register_demo_model(tracking_uri=tracking, artifact_root=artifacts),
        "nosig": register_demo_model(
            tracking_uri=tracking, artifact_root=artifacts, name="nosig", with_signature=False
        ),
    }
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    # A model whose version carries no source tags: requests must name the source themselves.
    untagged = register_demo_model(tracking_uri=tracking, artifact_root=artifacts, name="untagged")
    for key in ("retro.source.table", "retro.source.date_column", "retro.source.id_columns"):
        client.delete_model_version_tag("untagged", untagged, key)
    versions["untagged"] = untagged
    return versions


@pytest.fixture(scope="session")
def history() -> Path:
    """Synthetic partitioned history: HISTORY_DAYS days x ROWS_PER_DAY customers."""
    from app.demo_data import write_history

    root = Path(os.environ["RETRO_HISTORY_DIR"])
    write_history(root=root, start=HISTORY_START, days=HISTORY_DAYS, rows_per_day=ROWS_PER_DAY)
    return root


@pytest.fixture(scope="session")
def hive(history: Path) -> Iterator[HiveServer]:
    """One Spark Thrift Server per session, with the tables the tests read."""
    from tests.hive_server import run_sql, start_hive_server

    server = start_hive_server(_TMP / "hive")
    folder = history / "features" / "customer_daily"
    cols = (
        "customer_id BIGINT, tenure_months BIGINT, monthly_spend DOUBLE, data_gb DOUBLE, voice_minutes BIGINT, "
        "sms_count BIGINT, support_calls BIGINT, late_payments BIGINT, roaming BOOLEAN, plan STRING"
    )
    try:
        run_sql(
            server,
            "CREATE DATABASE IF NOT EXISTS features",
            # The same files the local source reads, as a DATE-partitioned Hive table.
            f"CREATE TABLE features.customer_daily ({cols}, snapshot_date DATE) USING parquet "
            f"PARTITIONED BY (snapshot_date) LOCATION '{folder}'",
            "ALTER TABLE features.customer_daily RECOVER PARTITIONS",
            # A STRING partition column in yyyyMMdd, a common Hive layout.
            f"CREATE TABLE features.by_day_string ({cols}, ds STRING) USING parquet PARTITIONED BY (ds)",
            f"INSERT INTO features.by_day_string SELECT {', '.join(c.split()[0] for c in cols.split(', '))}, "
            f"date_format(snapshot_date, 'yyyyMMdd') FROM features.customer_daily",
            # Every scalar type, and a row of nulls in each.
            """CREATE TABLE features.all_types (id BIGINT, b BOOLEAN, ti TINYINT, si SMALLINT, i INT, bi BIGINT,
               f FLOAT, d DOUBLE, dec DECIMAL(12,4), s STRING, vc VARCHAR(10), ch CHAR(4), dt DATE, ts TIMESTAMP,
               day DATE) USING parquet PARTITIONED BY (day)""",
            f"""INSERT INTO features.all_types VALUES
               (1, true, -8, 300, 70000, 9000000000, 1.5, 2.25, 1234.5678, "a'b", 'vc', 'ch', DATE'2025-02-03',
                TIMESTAMP'2026-01-05 10:11:12.5', DATE'{HIVE_DAY}'),
               (2, null, null, null, null, null, null, null, null, null, null, null, null, null, DATE'{HIVE_DAY}'),
               (3, false, 7, -2, 0, -1, -0.25, 1e300, -0.0001, '', 'ü', 'x', DATE'1999-12-31',
                TIMESTAMP'1999-12-31 23:59:59', DATE'{HIVE_DAY + timedelta(days=1)}')""",
        )
    except Exception:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture(scope="session")
def big_history(history: Path) -> str:
    """A larger table, so a job is still scoring when the test cancels it."""
    from app.demo_data import write_history

    write_history(root=history, table="features.big", start=HISTORY_START, days=HISTORY_DAYS, rows_per_day=150_000)
    return "features.big"


@pytest.fixture(scope="session")
def engine(database_url: str):  # type: ignore[no-untyped-def]
    from app.db import get_engine

    return get_engine()


@pytest.fixture()
def db_session(engine):  # type: ignore[no-untyped-def]
    """A session inside one transaction that is rolled back after the test; services' commits become savepoints."""
    from sqlalchemy.orm import Session

    connection = engine.connect()
    outer = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        connection.close()


@pytest.fixture()
def client(db_session, registry, history):  # type: ignore[no-untyped-def]
    """The API in-process, on the rolled-back test session."""
    from fastapi.testclient import TestClient

    from app.db import get_session
    from app.main import create_app

    api = create_app()
    api.dependency_overrides[get_session] = lambda: db_session
    token = make_user(db_session, "tester", role="admin")
    with TestClient(api, headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


def make_user(
    session,  # type: ignore[no-untyped-def]
    username: str,
    *,
    role: str = "admin",
    partners: Sequence[str] = (),
    password: str | None = None,
) -> str:
    """Add a user (unless there) through the service layer, assign partner codes; returns a new API token."""
    from app.auth import service
    from app.auth.models import Role, UserPartner
    from app.auth.schemas import UserCreate
    from app.partners.service import find_by_code

    user = service.find_user(session=session, username=username) or service.create_user(
        session=session, data=UserCreate(username=username, role=Role(role), password=password), actor="test"
    )
    for code in partners:
        partner = find_by_code(session=session, code=code)
        assert partner is not None, f"no partner {code!r}"
        if session.get(UserPartner, (user.id, partner.id)) is None:
            session.add(UserPartner(user_id=user.id, partner_id=partner.id))
    session.flush()
    _, token = service.create_api_token(session=session, user=user, name="test", actor="test")
    return token


@pytest.fixture()
def account_manager_client(client, db_session) -> Iterator[Callable[..., object]]:  # type: ignore[no-untyped-def]
    """A factory: make_am("jane", ["acme"]) is an API client acting as account manager jane, assigned to acme."""
    from fastapi.testclient import TestClient

    opened: list[TestClient] = []

    def make(username: str, partners: Sequence[str] = ()) -> TestClient:
        token = make_user(db_session, username, role="account_manager", partners=partners)
        c = TestClient(client.app, headers={"Authorization": f"Bearer {token}"})
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


def make_partner(client, code: str = "acme") -> dict:  # type: ignore[no-untyped-def,type-arg]
    """Create a partner through the API."""
    resp = client.post("/api/v1/partners", json={"code": code, "name": code.upper()})
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """A running API server and Celery worker, as separate processes."""

    def __init__(self, base_url: str, procs: list[subprocess.Popen[bytes]], logs: Path, token: str) -> None:
        self.base_url = base_url
        self.procs = procs
        self.logs = logs
        self.token = token

    def client(self) -> httpx.Client:
        """A client of the stack's API, signed in as the stack's admin by API token."""
        return httpx.Client(base_url=self.base_url, timeout=30, headers={"Authorization": f"Bearer {self.token}"})

    def wait(self, job_id: str, *, until: set[str], timeout_s: float = 240) -> dict:  # type: ignore[type-arg]
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while True:
                job = c.get(f"/api/v1/retro-tests/{job_id}").json()
                if job["state"] in until:
                    return dict(job)
                if time.monotonic() > deadline:
                    raise AssertionError(f"job {job_id} still {job['state']} after {timeout_s} s: {job}\n{self.tail()}")
                time.sleep(0.3)

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p)

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob("*.log"))
        )


def start_process(args: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
    )


def start_stack(name: str, *, workers: int = 1, **env_overrides: str) -> Stack:
    """Start the API and real Celery workers as processes, with extra settings; wait until ready."""
    from app.db import get_session_factory

    port = free_port()
    logs = _TMP / f"logs-{name}"
    logs.mkdir(exist_ok=True)
    with get_session_factory()() as session:  # the stack's admin, in the session database
        token = make_user(session, f"e2e-{name}", role="admin")
        session.commit()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RETRO_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        **env_overrides,
    }
    exe = [sys.executable, "-m", "app.cli"]
    procs = [
        start_process([*exe, "serve", "--port", str(port), "--skip-migrations"], env=env, log=logs / "api.log"),
        *(
            start_process([*exe, "worker", "--name", f"w{i}"], env=env, log=logs / f"worker{i or ''}.log")
            for i in range(workers)
        ),
    ]
    s = Stack(f"http://127.0.0.1:{port}", procs, logs, token)
    deadline = time.monotonic() + 90
    try:
        wait_until_ready(f"{s.base_url}/ready", procs=procs, timeout_s=90, logs=s.tail)
    except RuntimeError:
        for p in procs:
            stop_process(p)
        raise
    # Each worker consumes once Celery says it is ready; a test that submits before might race a slow start.
    while not all(" ready." in log.read_text(errors="replace") for log in logs.glob("worker*.log")):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                stop_process(p)
            raise RuntimeError(f"a worker did not become ready:\n{s.tail()}")
        time.sleep(0.3)
    return s


@pytest.fixture(scope="session")
def stack(database_url: str, registry: dict[str, str], history: Path) -> Iterator[Stack]:
    """The API and a real Celery worker process on Postgres + Redis, started once per session."""
    s = start_stack("local")
    yield s
    s.stop()


# Fixtures that start or need an outside service (PostgreSQL, Redis, MLflow's registry with model servers, Spark's
# Thrift Server, the Kubernetes emulator and its S3). A test that uses none of them, directly or through another
# fixture, is a unit test: the fast lane (`./scripts/test.sh --fast`) runs only those, with no service started.
SERVICE_FIXTURES = frozenset(
    {
        "database_url",
        "engine",
        "db_session",
        "client",
        "account_manager_client",
        "stack",
        "registry",
        "hive",
        "big_history",
        "cluster",
        "s3",
        "operator",
        "retro_data",
        "own_postgres",
    }
)


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    """Mark every test `integration` or `unit` by the fixtures it uses (an explicit mark wins)."""
    for item in items:
        if item.get_closest_marker("integration") or item.get_closest_marker("unit"):
            continue
        uses_service = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.integration if uses_service else pytest.mark.unit)


def pytest_sessionfinish(session, exitstatus):  # type: ignore[no-untyped-def]
    """Drop this session's queue from Redis and its temporary folder."""
    try:
        import redis

        redis.Redis.from_url(REDIS_URL).delete(os.environ["RETRO_QUEUE_NAME"])
    except Exception:
        pass
    shutil.rmtree(_TMP, ignore_errors=True)
    if not hasattr(session.config, "workerinput"):  # the controller, or a run without xdist: the workers are done
        xdist = session.config.pluginmanager.getplugin("dsession")
        run_id = xdist.nodemanager.testrunuid if xdist is not None and xdist.nodemanager is not None else _RUN
        shutil.rmtree(_shared_folder(run_id), ignore_errors=True)


@pytest.fixture(autouse=True)
def _default_language() -> Iterator[None]:
    """Each test starts in the default language: one that switched it in the test's own thread (set_language, as
    the auth dependency does when called directly) must not switch the tests after it (seen in CI: a kept view
    looked up in Russian after a test that left Russian set)."""
    from app.i18n import _current

    token = _current.set(None)
    yield
    _current.reset(token)


# Where the suite's time goes: the controller gathers every test step's start and end by worker and file (xdist
# sends it each report) and, at the end, writes test-output/timeline.json and prints each worker's busy time and
# the heaviest files. The suite is CPU-bound on 2 cores: this is what to read before moving or cutting tests.
_TIMELINE: list[tuple[str, str, str, float, float]] = []  # worker, file, step, start, stop


def pytest_runtest_logreport(report):  # type: ignore[no-untyped-def]
    if hasattr(report, "start") and "PYTEST_XDIST_WORKER" not in os.environ:  # the controller (or a run without xdist)
        worker = getattr(getattr(report, "node", None), "gateway", None)
        _TIMELINE.append(
            (getattr(worker, "id", "main"), report.nodeid.split("::")[0], report.when, report.start, report.stop)
        )


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if hasattr(config, "workerinput") or not _TIMELINE:
        return
    import json
    from collections import defaultdict

    start = min(step[3] for step in _TIMELINE)
    busy: dict[str, float] = defaultdict(float)
    ended: dict[str, float] = defaultdict(float)
    files: dict[str, float] = defaultdict(float)
    for worker, file, _step, began, stopped in _TIMELINE:
        busy[worker] += stopped - began
        ended[worker] = max(ended[worker], stopped - start)
        files[file] += stopped - began
    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    (out / "timeline.json").write_text(json.dumps([[w, f, s, a - start, b - start] for w, f, s, a, b in _TIMELINE]))
    write = terminalreporter.write_line
    write(
        "time by worker (busy in tests / last test ended after the first began): "
        + ", ".join(f"{w} {busy[w]:.0f} s / {ended[w]:.0f} s" for w in sorted(busy))
    )
    heaviest = sorted(files.items(), key=lambda item: -item[1])[:12]
    write("heaviest files: " + ", ".join(f"{f.removeprefix('tests/')} {t:.0f} s" for f, t in heaviest))


# The old model's stack, built once per session for every test that asks for it (one definition: tests/old_model.py).
from tests.old_model import old_model  # noqa: E402, F401
