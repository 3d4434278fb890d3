"""HiveSource against a real HiveServer2 (the Spark Thrift Server), and whole retro tests reading from it."""

from __future__ import annotations

import io
import os
import string
import time
from collections.abc import Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.model_types import Feature
from app.errors import Invalid, SchemaMismatch, SourceUnknown
from app.integrations.history.hive import HiveSettings, HiveSource, hive_type_to_arrow, select_sql, where_clause
from app.integrations.history.port import HistoryQuery
from tests.conftest import HISTORY_DAYS, HISTORY_START, ROWS_PER_DAY, Stack, start_stack
from tests.conftest import HIVE_DAY as DAY
from tests.hive_latency_proxy import HiveLatencyProxy
from tests.hive_server import HiveServer, run_sql
from tests.test_end_to_end import source_rows

END = HISTORY_START + timedelta(days=HISTORY_DAYS - 1)


def hive_settings(server: HiveServer, **overrides: object) -> HiveSettings:
    values: dict[str, object] = {
        "host": server.host,
        "port": server.port,
        "database": "default",
        "username": "test",
        "password": "",
        "auth": "NONE",
        "kerberos_service_name": "hive",
        "configuration": {},
        "connect_timeout_s": 10,
        "query_timeout_s": 300,
        "date_string_format": "yyyy-MM-dd",
        "count_rows": True,
    }
    values.update(overrides)
    return HiveSettings(**values)  # type: ignore[arg-type]


MODEL_FEATURES = (
    Feature("tenure_months", "long"),
    Feature("monthly_spend", "double"),
    Feature("data_gb", "double"),
    Feature("voice_minutes", "long"),
    Feature("sms_count", "long"),
    Feature("support_calls", "long"),
    Feature("late_payments", "long"),
    Feature("roaming", "boolean"),
    Feature("plan", "string"),
)


def query(table: str = "features.customer_daily", date_column: str = "snapshot_date", **kw: object) -> HistoryQuery:
    values: dict[str, object] = {
        "table": table,
        "date_column": date_column,
        "id_columns": ("customer_id",),
        "features": MODEL_FEATURES,
        "start": HISTORY_START,
        "end": END,
    }
    values.update(kw)
    return HistoryQuery(**values)  # type: ignore[arg-type]


def read_all(source: HiveSource, q: HistoryQuery, batch_rows: int = 3000) -> pa.Table:
    return pa.Table.from_batches(list(source.batches(q, batch_rows=batch_rows)))


def test_every_hive_type_arrives_typed_with_its_nulls(hive: HiveServer) -> None:
    source = HiveSource(hive_settings(hive))
    features = (
        Feature("b", "boolean"),
        Feature("ti", "long"),
        Feature("si", "long"),
        Feature("i", "integer"),
        Feature("bi", "long"),
        Feature("f", "float"),
        Feature("d", "double"),
        Feature("dec", "double"),
        Feature("s", "string"),
        Feature("vc", "string"),
        Feature("ch", "string"),
    )
    q = HistoryQuery(
        table="features.all_types",
        date_column="day",
        id_columns=("id", "dt", "ts"),
        features=features,
        start=DAY,
        end=DAY + timedelta(days=1),
    )
    source.check_schema(q)
    table = read_all(source, q).sort_by("id")
    assert source.count(q) == table.num_rows == 3
    types = {f.name: f.type for f in table.schema}
    assert types == {
        "id": pa.int64(),
        "dt": pa.date32(),
        "ts": pa.timestamp("us"),
        "day": pa.date32(),
        "b": pa.bool_(),
        "ti": pa.int64(),
        "si": pa.int64(),
        "i": pa.int32(),
        "bi": pa.int64(),
        "f": pa.float32(),
        "d": pa.float64(),
        "dec": pa.float64(),
        "s": pa.string(),
        "vc": pa.string(),
        "ch": pa.string(),
    }
    rows = table.to_pylist()
    assert rows[0]["b"] is True and rows[0]["ti"] == -8 and rows[0]["si"] == 300 and rows[0]["i"] == 70000
    assert rows[0]["bi"] == 9_000_000_000 and rows[0]["f"] == 1.5 and rows[0]["d"] == 2.25
    assert rows[0]["dec"] == 1234.5678 and rows[0]["s"] == "a'b" and rows[0]["ch"] == "ch  "
    assert rows[0]["dt"] == date(2025, 2, 3) and str(rows[0]["ts"]) == "2026-01-05 10:11:12.500000"
    assert all(v is None for k, v in rows[1].items() if k not in ("id", "day"))
    assert (
        rows[2]["d"] == 1e300
        and rows[2]["vc"] == "ü"
        and rows[2]["s"] == ""
        and rows[2]["day"] == DAY + timedelta(days=1)
    )


def test_type_mapping_of_describe_output() -> None:
    assert hive_type_to_arrow("decimal(10,2)") == pa.decimal128(10, 2)
    assert hive_type_to_arrow("varchar(20)") == pa.string() and hive_type_to_arrow("char(3)") == pa.string()
    assert hive_type_to_arrow("array<int>") == pa.string()  # complex types arrive as their JSON text


def test_count_equals_rows_read_and_only_the_period_is_read(hive: HiveServer, history: Path) -> None:
    source = HiveSource(hive_settings(hive))
    q = query(start=HISTORY_START + timedelta(days=1), end=HISTORY_START + timedelta(days=2))
    table = read_all(source, q)
    assert source.count(q) == table.num_rows == 2 * ROWS_PER_DAY
    assert set(table.column("snapshot_date").to_pylist()) == {q.start, q.end}
    assert table.column_names == ["customer_id", "snapshot_date", *(f.name for f in MODEL_FEATURES)]
    local = source_rows(history)
    local = local[(local.snapshot_date >= q.start) & (local.snapshot_date <= q.end)]
    mine = table.to_pandas().sort_values(["snapshot_date", "customer_id"]).reset_index(drop=True)
    theirs = local[mine.columns].sort_values(["snapshot_date", "customer_id"]).reset_index(drop=True)
    assert mine.equals(theirs)


def test_string_date_partitions(hive: HiveServer) -> None:
    source = HiveSource(hive_settings(hive, date_string_format="yyyyMMdd"))
    q = query(table="features.by_day_string", date_column="ds", start=HISTORY_START, end=HISTORY_START)
    source.check_schema(q)
    table = read_all(source, q)
    assert source.count(q) == table.num_rows == ROWS_PER_DAY
    assert set(table.column("ds").to_pylist()) == {HISTORY_START}
    assert "`ds` BETWEEN %(start)s AND %(end)s" in source.describe(q)


def test_missing_columns_and_wrong_types_are_named(hive: HiveServer) -> None:
    source = HiveSource(hive_settings(hive))
    missing = query(features=(*MODEL_FEATURES, Feature("churn_flag", "double"), Feature("arpu", "double")))
    with pytest.raises(SchemaMismatch, match=r"lacks column.*churn_flag, arpu"):
        source.check_schema(missing)
    wrong = query(features=(Feature("plan", "double"),))
    with pytest.raises(SchemaMismatch, match="plan is string but the model wants double"):
        source.check_schema(wrong)
    with pytest.raises(SourceUnknown, match="not found"):
        source.check_schema(query(table="features.nope"))


def test_unreachable_server_is_a_clear_upstream_error() -> None:
    from app.errors import Upstream

    source = HiveSource(
        HiveSettings(
            host="127.0.0.1",
            port=9,
            database="default",
            username="u",
            password="secret-pw",
            auth="LDAP",
            kerberos_service_name="hive",
            configuration={},
            connect_timeout_s=2,
            query_timeout_s=5,
            date_string_format="yyyy-MM-dd",
            count_rows=True,
        )
    )
    with pytest.raises(Upstream, match=r"cannot open a HiveServer2 session at 127\.0\.0\.1:9") as info:
        source.count(query())
    assert "secret-pw" not in str(info.value) and "secret-pw" not in repr(source._settings)


HOSTILE = ["x`; DROP TABLE y; --", "a b", "x'--", "t/*c*/", "`", "café", "x\u202e", "t;", "a.b.c", "1x", ""]


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_identifiers_are_refused_before_any_sql(bad: str) -> None:
    for field in ("table", "date_column", "id_columns"):
        kw: dict[str, object] = {field: (bad,) if field == "id_columns" else bad}
        with pytest.raises(Invalid):
            query(**kw)
    with pytest.raises(Invalid):
        query(features=(Feature(bad, "double"),))


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_any_identifier_is_either_refused_or_plain(name: str) -> None:
    """Whatever text arrives, it never reaches SQL unless it is letters, digits and underscores."""
    try:
        q = query(date_column=name)
    except Invalid:
        return
    allowed = set(string.ascii_letters + string.digits + "_")
    assert set(name) <= allowed and name[0] not in string.digits
    for is_string in (True, False):
        where, params = where_clause(q, date_is_string=is_string, date_string_format="yyyyMMdd")
        sql = select_sql(q, where=where)
        assert f"`{name}` BETWEEN" in sql and sql.count("`") % 2 == 0
        assert all(v.isdigit() or v.replace("-", "").isdigit() for v in params.values())


def test_a_job_sends_one_statement_to_count_and_one_per_read_and_each_waits_for_the_latency(hive: HiveServer) -> None:
    """Through the latency proxy: no USE per session, the schema from a metadata call, the count one GROUP BY."""
    with HiveLatencyProxy(upstream_host=hive.host, upstream_port=hive.port, latency_s=1.0) as proxy:
        source = HiveSource(hive_settings(hive, host=proxy.host, port=proxy.port, database="features"))
        q = query(table="customer_daily", start=HISTORY_START, end=END)
        source.check_schema(q)
        assert proxy.statements == [] and proxy.calls.count("GetColumns") == 1
        started = time.monotonic()
        assert source.count(q) == HISTORY_DAYS * ROWS_PER_DAY
        assert time.monotonic() - started >= 1.0  # no statement is answered sooner than the proxy's latency
        assert source.rows_by_day(q) == {HISTORY_START + timedelta(days=i): ROWS_PER_DAY for i in range(HISTORY_DAYS)}
        assert read_all(source, q).num_rows == HISTORY_DAYS * ROWS_PER_DAY
    (group_by, select) = proxy.statements  # the planner took the count's answer: no second GROUP BY
    assert group_by.startswith("SELECT `snapshot_date`, COUNT(*) FROM `features`.`customer_daily`")
    assert "GROUP BY `snapshot_date`" in group_by and select.startswith("SELECT `customer_id`, `snapshot_date`")


def test_values_are_parameters_not_text(hive: HiveServer) -> None:
    source = HiveSource(hive_settings(hive))
    sql = source.describe(query())
    assert HISTORY_START.isoformat() not in sql and "%(start)s" in sql


# --- whole retro tests reading from Hive: the API, a real worker and a real model server ---


@pytest.fixture(scope="session")
def hive_stack(hive: HiveServer, stack: Stack) -> Iterator[Stack]:
    s = start_stack(
        "hive",
        RETRO_HISTORY_SOURCE="hive",
        RETRO_HIVE_HOST=hive.host,
        RETRO_HIVE_PORT=str(hive.port),
        RETRO_QUEUE_NAME=os.environ["RETRO_QUEUE_NAME"] + "-hive",
        RETRO_WORKER_METRICS_PORT="0",
    )
    yield s
    s.stop()


def submit(stack: Stack, partner: str, **overrides: object) -> dict:  # type: ignore[type-arg]
    with stack.client() as c:
        c.post("/api/v1/partners", json={"code": partner, "name": partner})
        body = {
            "partner_code": partner,
            "model_name": "churn",
            "model_version": "1",
            "period_start": HISTORY_START.isoformat(),
            "period_end": END.isoformat(),
            **overrides,
        }
        resp = c.post("/api/v1/retro-tests", json=body)
        assert resp.status_code == 202, resp.text
        return dict(resp.json())


def test_retro_test_from_hive_scores_like_the_model_in_process(hive_stack: Stack, hive: HiveServer) -> None:
    job = submit(hive_stack, "hive-main")
    done = hive_stack.wait(job["id"], until={"succeeded", "failed", "cancelled"})
    assert done["state"] == "succeeded", done
    total = HISTORY_DAYS * ROWS_PER_DAY
    assert done["progress"]["rows_total"] == done["progress"]["rows_read"] == done["progress"]["rows_scored"] == total
    parquet = next(f for f in done["files"] if f["name"] == "scores.parquet")
    with hive_stack.client() as c:
        scores = pq.read_table(io.BytesIO(c.get(parquet["download_url"]).content)).to_pandas()
    assert len(scores) == total and not scores.duplicated(["customer_id", "snapshot_date"]).any()
    source = HiveSource(hive_settings(hive))
    rows = read_all(source, query()).to_pandas()
    expected = np.asarray(mlflow.pyfunc.load_model("models:/churn/1").predict(rows[[f.name for f in MODEL_FEATURES]]))
    merged = (
        rows[["customer_id", "snapshot_date"]]
        .assign(e=expected[:, 1])
        .merge(scores, on=["customer_id", "snapshot_date"])
    )
    assert len(merged) == total
    assert np.abs(merged.e - merged.p_churn).max() <= 1e-9


def test_missing_hive_column_fails_the_job_before_deployment(hive_stack: Stack, hive: HiveServer) -> None:
    run_sql(
        hive,
        "CREATE TABLE IF NOT EXISTS features.no_plan (customer_id BIGINT, tenure_months BIGINT, snapshot_date DATE) USING parquet",
    )
    job = submit(hive_stack, "hive-schema", source={"table": "features.no_plan"})
    ended = hive_stack.wait(job["id"], until={"succeeded", "failed", "cancelled"})
    assert ended["state"] == "failed" and ended["error"]["code"] == "schema_mismatch"
    assert "monthly_spend" in ended["error"]["message"] and "plan" in ended["error"]["message"]
    assert "deploying" not in [s["state"] for s in ended["stages"]]


def test_decimal_values_are_cast_to_float(hive: HiveServer) -> None:
    source = HiveSource(hive_settings(hive))
    q = HistoryQuery(
        table="features.all_types",
        date_column="day",
        id_columns=("id",),
        features=(Feature("dec", "double"),),
        start=DAY,
        end=DAY,
    )
    values = sorted((r["id"], r["dec"]) for r in read_all(source, q).to_pylist())
    assert values == [(1, float(Decimal("1234.5678"))), (2, None)]


def test_a_comparison_reads_the_history_with_as_many_statements_as_one_model(
    hive: HiveServer,
    registry: dict,
    database_url: str,  # type: ignore[type-arg]
) -> None:
    """Issue 30: two models on one table read it once, with the union of their inputs, as one model's job does.

    The jobs are submitted through the service and run in this process, as a worker runs them, against the Spark
    Thrift Server through a proxy that records every statement."""
    import uuid

    from app.config import get_settings
    from app.core.jobs import RetroTest, State
    from app.core.partners import Partner
    from app.core.scope import ALL_PARTNERS
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer, make_registry, make_result_store
    from app.retro_tests.schemas import RetroTestCreate
    from app.retro_tests.service import RetroTestRequest, submit_request
    from worker.pipeline import Adapters, run_retro_test

    settings = get_settings().model_copy(update={"warm_ttl_s": 0.0})
    sessions = get_session_factory()
    models = make_registry(settings)
    partner = f"hive-compare-{uuid.uuid4().hex[:6]}"
    with sessions() as s, s.begin():
        s.add(Partner(code=partner, name=partner))
    source = {"table": "features.customer_daily", "date_column": "snapshot_date", "id_columns": ["customer_id"]}
    one_model = {"model_name": "churn", "model_version": "1"}
    # "untagged" is the demo model registered once more, without source tags: the request names the source.
    two_models = {"models": [{"name": "churn", "version": "1"}, {"name": "untagged", "version": "1"}]}
    sent = []
    with HiveLatencyProxy(upstream_host=hive.host, upstream_port=hive.port) as proxy:
        history = HiveSource(hive_settings(hive, host=proxy.host, port=proxy.port, database="features"))
        for request in (one_model, two_models):
            data = RetroTestCreate.model_validate(
                {
                    "partner_code": partner,
                    "period_start": HISTORY_START.isoformat(),
                    "period_end": END.isoformat(),
                    "source": source,
                    "output_formats": ["parquet"],
                    **request,
                }
            )
            with sessions() as s, s.begin():
                asked = RetroTestRequest(data=data, actor="test", scope=ALL_PARTNERS)
                job_id = submit_request(session=s, registry=models, settings=settings, request=asked).job.id
            proxy.clear()
            adapters = Adapters(
                registry=models, source=history, deployer=make_deployer(settings), store=make_result_store(settings)
            )
            state = run_retro_test(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings)
            with sessions() as s:
                job = s.get(RetroTest, job_id)
                assert job is not None and state == State.succeeded, job.error_message if job else None
                assert job.rows_scored == HISTORY_DAYS * ROWS_PER_DAY
            sent.append(proxy.statements)
    one, two = sent
    assert len(two) == len(one) == 1 + HISTORY_DAYS, (one, two)  # the count's GROUP BY, then a SELECT per chunk
    # The same statements (sent in an order of their own: a chunk's query opens while the one before is read), as
    # the models read the same inputs.
    assert sorted(two) == sorted(one)
    assert all(f"`{f.name}`" in statement for f in MODEL_FEATURES for statement in two if "GROUP BY" not in statement)
