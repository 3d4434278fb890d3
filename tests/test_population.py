"""A partner's own population scored point-in-time (local source), its unmatched rows, and its quality report;
bad population files refused before anything is queued."""

from __future__ import annotations

import gzip
import io
import json
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import Stack, make_partner
from tests.test_browser import SHOTS, chromium  # noqa: F401  (the fixture)

# Snapshots every other day of a 12-day period across a month's end (per-month AUC/KS, PSI), 5,000 ids each; the
# population asks for ids 1..6,000 as of any day.
POP_TABLE = "features.snapshots"
POP_START = (date.today().replace(day=1) - timedelta(days=1)).replace(day=1) - timedelta(days=6)
POP_DAYS = 12
POP_IDS = 5_000
POP_ROWS = 24_000


@pytest.fixture(scope="module")
def snapshots(history: Path) -> Path:
    from app.demo_data import write_history

    write_history(root=history, table=POP_TABLE, start=POP_START, days=POP_DAYS, rows_per_day=POP_IDS)
    folder = history.joinpath(*POP_TABLE.split("."))
    for i in range(1, POP_DAYS, 2):  # odd days have no snapshot: as-of dates fall between snapshots
        day = POP_START + timedelta(days=i)
        for f in (folder / f"snapshot_date={day.isoformat()}").iterdir():
            f.unlink()
        (folder / f"snapshot_date={day.isoformat()}").rmdir()
    return folder


def population_frame(rows: int = POP_ROWS, *, seed: int = 7) -> pd.DataFrame:
    """(customer_id, as_of, outcome) rows, unique pairs; ids above POP_IDS have no history."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(6_000 * POP_DAYS, size=rows, replace=False)
    return pd.DataFrame(
        {
            "customer_id": pairs % 6_000 + 1,
            "as_of": [POP_START + timedelta(days=int(d)) for d in pairs // 6_000],
            "outcome": (rng.random(rows) < 0.3).astype(int),
        }
    )


def request_json(partner: str, **overrides: Any) -> str:
    return json.dumps(
        {
            "partner_code": partner,
            "model_name": "churn",
            "model_version": "1",
            "period_start": POP_START.isoformat(),
            "period_end": (POP_START + timedelta(days=POP_DAYS - 1)).isoformat(),
            "source": {"table": POP_TABLE},
            **overrides,
        }
    )


def csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def test_population_scored_as_of_its_dates_with_its_report(  # type: ignore[no-untyped-def]
    stack: Stack,
    snapshots: Path,
    history: Path,
    chromium,  # noqa: F811
) -> None:
    import mlflow
    from scipy.stats import ks_2samp
    from sklearn.metrics import roc_auc_score

    population = population_frame()
    with stack.client() as c:
        c.post("/api/v1/partners", json={"code": "pop-main", "name": "pop"})
        resp = c.post(
            "/api/v1/retro-tests/with-population",
            data={"request": request_json("pop-main", lookback_days=1)},
            files={"population": ("customers.csv", csv_bytes(population), "text/csv")},
        )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["population"]["rows"] == POP_ROWS and "path" not in job["population"]
    done = stack.wait(job["id"], until={"succeeded", "failed", "cancelled"})
    assert done["state"] == "succeeded", (done["error"], stack.tail())

    files = {f["name"]: f for f in done["files"]}
    assert {"scores.parquet", "unmatched.csv.gz", "report.html", "report.json", "manifest.json"} <= set(files)
    with stack.client() as c:
        blobs = {name: c.get(f["download_url"]).content for name, f in files.items()}
    manifest = json.loads(blobs["manifest.json"])
    assert {f["name"] for f in manifest["files"]} >= {"report.html", "report.json", "unmatched.csv.gz"}

    # Expected: ids with history take the snapshot of their as-of day, or of the day before (lookback_days=1).
    population["snapshot_date"] = [
        d if (d - POP_START).days % 2 == 0 else d - timedelta(days=1) for d in population["as_of"]
    ]
    matched = population[population.customer_id <= POP_IDS]
    unmatched_expected = population[population.customer_id > POP_IDS]

    scores = pq.read_table(io.BytesIO(blobs["scores.parquet"])).to_pandas()
    assert list(scores.columns) == ["customer_id", "as_of", "outcome", "snapshot_date", "p_stay", "p_churn"]
    assert len(scores) == len(matched) == done["progress"]["rows_scored"]
    scores["snapshot_date"] = pd.to_datetime(scores["snapshot_date"]).dt.date
    merged = matched.merge(scores, on=["customer_id", "as_of"], suffixes=("", "_got"), how="left")
    assert (merged.snapshot_date == merged.snapshot_date_got).all()
    assert (merged.outcome == merged.outcome_got).all()

    src = pq.read_table(snapshots, partitioning="hive").to_pandas()
    src["snapshot_date"] = pd.to_datetime(src["snapshot_date"]).dt.date
    rows = merged[["customer_id", "snapshot_date", "p_churn"]].merge(src, on=["customer_id", "snapshot_date"])
    assert len(rows) == len(matched)
    model = mlflow.pyfunc.load_model("models:/churn/1")
    # The model's inputs are in the staff manifest only: the partner's says which model, not its features.
    assert "inputs" not in manifest["model"]
    features = [c["name"] for c in json.loads(blobs["manifest.internal.json"])["model"]["inputs"]]
    expected = np.asarray(model.predict(rows[features]))[:, 1]
    assert np.abs(expected - rows.p_churn.to_numpy()).max() <= 1e-9

    unmatched = pacsv.read_csv(io.BytesIO(gzip.decompress(blobs["unmatched.csv.gz"]))).to_pandas()
    assert sorted(unmatched.customer_id) == sorted(unmatched_expected.customer_id)
    assert unmatched.reason.str.contains("lookback_days").all()

    report = json.loads(blobs["report.json"])
    assert report["rows"] == {
        "requested": POP_ROWS,
        "matched": len(matched),
        "scored": len(matched),
        "rejected": 0,
        "unmatched": len(unmatched_expected),
    }
    q = report["quality"]
    y, s = scores.outcome.to_numpy(), scores.p_churn.to_numpy()
    assert q["overall"]["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert q["overall"]["gini"] == pytest.approx(2 * roc_auc_score(y, s) - 1, abs=1e-12)
    assert q["overall"]["ks"] == pytest.approx(ks_2samp(s[y == 1], s[y == 0]).statistic, abs=1e-12)
    months = pd.to_datetime(scores.as_of).dt.strftime("%Y-%m")
    assert [m["month"] for m in q["by_month"]] == sorted(months.unique()) and len(q["by_month"]) == 2
    assert len(report["psi"]) == 1 and report["psi"][0]["psi"] >= 0
    for m in q["by_month"]:
        mine = (months == m["month"]).to_numpy()
        assert m["auc"] == pytest.approx(roc_auc_score(y[mine], s[mine]), abs=1e-12)
        assert m["ks"] == pytest.approx(ks_2samp(s[mine & (y == 1)], s[mine & (y == 0)]).statistic, abs=1e-12)
    assert len(q["deciles"]) == 10 and q["deciles"][-1]["cumulative_gain"] == pytest.approx(1.0)
    assert sum(d["rows"] for d in report["rows_per_day"]) == len(matched)
    assert set(report["null_rate"]) == set(features)

    page = blobs["report.html"].decode()
    assert "<svg" in page and "<script" not in page and "http://" not in page.split("<svg", 1)[0]
    open_report_from_the_partner_link(stack, chromium, job_id=job["id"], report=report)


def open_report_from_the_partner_link(stack: Stack, browser: Any, *, job_id: str, report: dict[str, Any]) -> None:
    """The partner opens report.html from the link, with no sign-in; nothing is asked of any other host."""
    with stack.client() as c:
        resp = c.post(f"/api/v1/retro-tests/{job_id}/links", json={"expires_in_days": 7})
    assert resp.status_code == 201, resp.text
    landing_url = resp.json()["url"]
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    requested: list[str] = []
    context.on("request", lambda request: requested.append(request.url))
    page = context.new_page()
    landing = page.goto(landing_url)
    assert landing is not None and landing.status == 200
    assert page.locator("a:has-text('report.html')").count() == 1  # listed on the partner's download page
    opened = page.goto(f"{landing_url}/report.html")
    assert opened is not None and opened.status == 200
    assert opened.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in opened.headers["content-security-policy"]
    assert page.locator("svg").count() >= 3
    auc = f"{report['quality']['overall']['auc']:.4f}"
    assert auc in page.inner_text("body")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "population-report.png"), full_page=True)
    context.close()
    assert requested and all(url.startswith(stack.base_url + "/") for url in requested), requested


def test_the_cli_submits_a_population_and_shows_a_refusal(stack: Stack, snapshots: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from app.cli import app

    with stack.client() as c:
        c.post("/api/v1/partners", json={"code": "pop-cli", "name": "pop"})
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"customer_id,as_of\n1,2001-01-01\n")
    good = tmp_path / "good.csv"
    good.write_bytes(csv_bytes(population_frame(500)))
    base = ["--api", stack.base_url, "--token", stack.token, "submit", "--partner", "pop-cli", "--model", "churn/1"]
    period = ["--start", POP_START.isoformat(), "--end", (POP_START + timedelta(days=POP_DAYS - 1)).isoformat()]
    refused = CliRunner().invoke(app, [*base, *period, "--population", str(bad), "--no-wait"])
    assert refused.exit_code == 2 and "outside the period" in refused.output, refused.output
    # The CLI has no --source: the model's own table has no history in this period, so the job ends either way.
    queued = CliRunner().invoke(app, [*base, *period, "--population", str(good), "--lookback-days", "1", "--no-wait"])
    assert queued.exit_code == 0 and "queued" in queued.output, queued.output
    job_id = queued.output.split()[2]
    with stack.client() as c:
        job = c.get(f"/api/v1/retro-tests/{job_id}").json()
        assert job["population"]["rows"] == 500 and job["population"]["lookback_days"] == 1
        c.post(f"/api/v1/retro-tests/{job_id}/cancel")


BAD_FILES: list[tuple[str, str, bytes, str]] = [
    ("missing column", "p.csv", b"customer_id,outcome\n1,0\n", "as_of"),
    ("unparsable date", "p.csv", b"customer_id,as_of\n1,{d}\n2,31/12/2026\n", "line 3"),
    ("duplicates", "p.csv", b"customer_id,as_of\n1,{d}\n1,{d}\n", "duplicate"),
    ("outside the period", "p.csv", b"customer_id,as_of\n1,2001-01-01\n", "outside the period"),
    ("not UTF-8", "p.csv", b"customer_id,as_of\n1,{d}\n\xff\xfe,{d}\n", "UTF-8"),
    ("empty", "p.csv", b"", "empty"),
    ("header only", "p.csv", b"customer_id,as_of\n", "no rows"),
    ("bad outcome", "p.csv", b"customer_id,as_of,outcome\n1,{d},2\n", "0 or 1"),
]


@pytest.mark.parametrize(("case", "name", "body", "says"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_population_files_are_refused_and_nothing_is_queued(  # type: ignore[no-untyped-def]
    client, case: str, name: str, body: bytes, says: str
) -> None:
    make_partner(client, "pop-bad")
    day = POP_START.isoformat().encode()
    resp = client.post(
        "/api/v1/retro-tests/with-population",
        data={"request": request_json("pop-bad")},
        files={"population": (name, body.replace(b"{d}", day), "text/csv")},
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == "invalid_population" and says in resp.json()["detail"], resp.json()
    assert client.get("/api/v1/retro-tests", params={"partner": "pop-bad"}).json()["total"] == 0


def test_a_population_too_large_is_refused_with_413(client) -> None:  # type: ignore[no-untyped-def]
    from app.config import Settings, get_settings

    make_partner(client, "pop-big")
    client.app.dependency_overrides[get_settings] = lambda: Settings(population_max_bytes=1_000)
    try:
        body = csv_bytes(population_frame(200))
        resp = client.post(
            "/api/v1/retro-tests/with-population",
            data={"request": request_json("pop-big")},
            files={"population": ("p.csv", body, "text/csv")},
        )
    finally:
        del client.app.dependency_overrides[get_settings]
    assert resp.status_code == 413 and "RETRO_POPULATION_MAX_BYTES" in resp.json()["detail"], resp.text
    assert client.get("/api/v1/retro-tests", params={"partner": "pop-big"}).json()["total"] == 0


def test_a_parquet_population_is_read_like_a_csv() -> None:
    from app.retro_tests.population import PopulationColumns, PopulationUpload, read_population

    frame = population_frame(100)
    sink = io.BytesIO()
    frame.to_parquet(sink)
    checked = read_population(
        PopulationUpload(data=sink.getvalue(), filename="p.parquet"),
        columns=PopulationColumns(id_columns=("customer_id",), as_of_column="as_of", outcome_column="outcome"),
        start=POP_START,
        end=POP_START + timedelta(days=POP_DAYS),
        max_bytes=10**6,
        max_rows=10**6,
    )
    table = pq.read_table(io.BytesIO(checked.parquet))
    assert checked.rows == 100 and table.column("as_of").type == __import__("pyarrow").date32()
    assert table.column_names == ["customer_id", "as_of", "outcome"] and isinstance(POP_START, date)
