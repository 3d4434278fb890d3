"""Database engine, session factory and the request-scoped session dependency."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from typing import Any, TypeVar

import anyio.to_thread
import orjson
from anyio import CapacityLimiter
from psycopg.types.json import set_json_loads
from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from app.config import get_settings

# A pooled connection unused for longer than this is pinged before use; one used more recently is trusted.
PING_AFTER_IDLE_S = 5.0

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# SQLSTATEs of a database that is going away or coming back, or of a transaction that only needs another try.
TRANSIENT_SQLSTATES = frozenset(
    {"08000", "08001", "08003", "08004", "08006", "40001", "40P01", "57P01", "57P02", "57P03"}
)
_patient = False

T = TypeVar("T")


log = logging.getLogger(__name__)


def is_transient(exc: BaseException) -> bool:
    """Whether a database error would likely pass if tried again: a dropped connection, a shutdown, a conflict."""
    if isinstance(exc, DisconnectionError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in TRANSIENT_SQLSTATES:
        return True
    # psycopg raises OperationalError without a SQLSTATE when it cannot connect at all (server down).
    return sqlstate is None and type(exc.orig).__name__ == "OperationalError"


def describe_database_error(exc: BaseException) -> str:
    """A database error for people: its kind and the server's first line, never the statement or parameters."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first}"[:300] if first else type(orig).__name__


def once_more_if_dropped(call: Callable[[], T], *, what: str) -> T:
    """call(), and once more if the database dropped its connection under it (a restart): the new connection
    waits for the server up to RETRO_DB_OUTAGE_BUDGET_S (use_patient_connections). A checkout pings its connection
    first, but a restart that begins between that ping and the statement still fails the statement. Only for work
    that may be done twice: if the first COMMIT went through before the connection dropped, the second finds it done.
    """
    try:
        return call()
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("%s: the database dropped a connection (%s); trying again", what, describe_database_error(exc))
        return call()


def use_patient_connections() -> None:
    """Make this process's engine ride out database outages (workers and beat; before the engine is made)."""
    global _patient
    _patient = True


def make_engine(url: str, *, outage_budget_s: float = 0.0) -> Engine:
    """An engine for url; SQLite gets WAL and a busy timeout so the API and worker can share it.

    With an outage budget (workers and beat), every checkout pings its connection and a connection that cannot
    be opened is tried again with backoff for that long: a Postgres restart costs a job a pause, not its life.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    settings = get_settings()
    engine = create_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_s,
        pool_pre_ping=outage_budget_s > 0,
    )
    if outage_budget_s > 0:
        _retry_connects(engine, budget_s=outage_budget_s)
    else:
        _ping_idle_connections(engine)
    if engine.dialect.driver == "psycopg":

        @event.listens_for(engine, "connect")
        def _orjson_loads(dbapi_conn: Any, _record: Any) -> None:
            # JSON columns decoded by orjson: the same values, several times faster than the json module, which
            # shows on list pages (three JSON columns per job).
            set_json_loads(orjson.loads, dbapi_conn)

    return engine


def _ping_idle_connections(engine: Engine) -> None:
    """Check that a pooled connection is still alive before handing it out, if it sat idle for a while.

    Like pool_pre_ping, which pings on every checkout: a request checks out a connection two or three times
    (see release_connection), and a connection returned a moment ago has just answered. One that idled longer
    may have been closed by the server, a restart or a firewall; the pool then replaces it and tries again.
    """

    @event.listens_for(engine, "checkin")
    def _note_idle(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"a pooled connection is gone: {exc}") from exc


def _retry_connects(engine: Engine, *, budget_s: float) -> None:
    """Open each new connection with retries and backoff while the server is down, for up to budget_s."""

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        started = time.monotonic()
        deadline = started + budget_s
        pause = 0.25
        waiting = False
        while True:
            try:
                connection = dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                if time.monotonic() + pause > deadline:
                    log.error("the database is still unreachable after %.0f s; giving up: %s", budget_s, reason)
                    raise
                if not waiting:  # one line when the wait starts and one when it ends, not one per try
                    log.warning("the database is unreachable (%s); waiting up to %.0f s for it", reason, budget_s)
                    waiting = True
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
            else:
                if waiting:
                    log.warning("the database answers again after %.1f s", time.monotonic() - started)
                return connection


@lru_cache
def get_engine() -> Engine:
    """The process-wide engine (patient in workers and beat: use_patient_connections)."""
    settings = get_settings()
    budget = settings.db_outage_budget_s if _patient else 0.0
    return make_engine(settings.resolved_database_url(), outage_budget_s=budget)


@lru_cache
def get_session_factory() -> sessionmaker[Session]:
    """The process-wide session factory."""
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


async def get_session() -> AsyncIterator[Session]:
    """FastAPI dependency: one session per request; the endpoint commits.

    An async dependency, so that it costs no thread switches (each one costs about as much CPU as a short query):
    opening a session does no I/O, and neither does closing one that holds no connection, which is the rule
    (release_connection). Closing one that still holds a connection runs on a thread, outside the threadpool's
    limit as FastAPI does for sync dependencies: giving a connection back must never wait for a free thread.
    """
    session = get_session_factory()()
    try:
        yield session
    finally:
        if session.in_transaction():
            await anyio.to_thread.run_sync(session.close, limiter=CapacityLimiter(1))
        else:
            session.close()


def release_connection(session: Session) -> None:
    """End the session's transaction (committing what it wrote) so its connection goes back to the pool.

    Every sync dependency and endpoint runs on a thread of FastAPI's threadpool, and the request waits for a
    free thread between them. A request must not hold a connection while it waits: under load, every thread
    could be waiting for a connection held by requests that are waiting for a thread, and nothing would move
    until the pool's timeout. So a dependency that queried the database calls this before it returns, and so
    does an endpoint that has read all it needs. Commit rather than rollback: a rollback would expire the
    loaded objects the next step still reads.
    """
    session.commit()
