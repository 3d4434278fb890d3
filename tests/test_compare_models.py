"""Comparing model versions in one retro test: two versions of a churn model (one trained two years ago with
scikit-learn 1.3 in its own environment, one current) score the same population with outcomes, through the REST
API, a real Celery worker, two real MLServers and real files; the report compares them. Requests the service
cannot compare are refused at once."""

from __future__ import annotations

import gzip
import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import HISTORY_DAYS, HISTORY_START, ROWS_PER_DAY, Stack, make_partner, make_user
from tests.old_model import OldModel, register_disagreeing
from tests.test_browser import PASSWORD, SHOTS, browser_errors, chromium, watched  # noqa: F401  (the fixtures)
from tests.test_end_to_end import mlserver_processes_for, source_rows

POPULATION_ROWS = 3_000


def delong_by_definition(y: np.ndarray, first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """DeLong's z and two-sided p-value for two correlated AUCs, straight from DeLong et al. (1988): every positive
    against every negative (ties half), O(P x N); independent of worker/compare.py's placement tables."""
    from math import erfc, sqrt

    def placements(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos, neg = s[y == 1], s[y == 0]
        wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return wins.mean(axis=1), wins.mean(axis=0)  # each positive's, each negative's

    (v10a, v01a), (v10b, v01b) = placements(first), placements(second)
    s10, s01 = np.cov(np.vstack([v10a, v10b])), np.cov(np.vstack([v01a, v01b]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / len(v10a) + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / len(v01a)
    z = (v10a.mean() - v10b.mean()) / sqrt(var)
    return float(z), erfc(abs(z) / sqrt(2))


def _population(history: Path) -> pd.DataFrame:
    """Customers of the history as of its days, with an outcome drawn from the current model's own churn score (so
    the models' AUCs differ from 0.5 and from each other)."""
    import mlflow

    rng = np.random.default_rng(30)
    src = source_rows(history)
    picked = src.iloc[rng.choice(len(src), size=POPULATION_ROWS, replace=False)]
    model = mlflow.pyfunc.load_model("models:/churn/1")
    features = [c for c in picked.columns if c not in ("customer_id", "snapshot_date")]
    churn = np.asarray(model.predict(picked[features]))[:, 1]
    return pd.DataFrame(
        {
            "customer_id": picked.customer_id.to_numpy(),
            "as_of": picked.snapshot_date.to_numpy(),
            "outcome": (rng.random(POPULATION_ROWS) < churn).astype(int),
        }
    )


def _submit(stack: Stack, partner: str, population: pd.DataFrame, **overrides: Any) -> dict[str, Any]:
    make_partner_quietly(stack, partner)
    body = {
        "partner_code": partner,
        "models": [{"name": "churn", "version": "1"}, {"name": "legacy_churn", "version": "1"}],
        "period_start": HISTORY_START.isoformat(),
        "period_end": (HISTORY_START + timedelta(days=HISTORY_DAYS - 1)).isoformat(),
        **overrides,
    }
    with stack.client() as c:
        resp = c.post(
            "/api/v1/retro-tests/with-population",
            data={"request": json.dumps(body)},
            files={"population": ("customers.csv", population.to_csv(index=False).encode(), "text/csv")},
        )
    assert resp.status_code == 202, resp.text
    return dict(resp.json())


def make_partner_quietly(stack: Stack, code: str) -> None:
    with stack.client() as c:
        c.post("/api/v1/partners", json={"code": code, "name": code})


def test_two_versions_score_every_row_as_in_their_own_environments_and_the_report_compares_them(
    stack: Stack, history: Path, old_model: OldModel
) -> None:
    import mlflow
    from sklearn.metrics import roc_auc_score

    population = _population(history)
    job = _submit(stack, "compare-main", population)
    assert [m["model_name"] for m in job["models"]] == ["churn", "legacy_churn"]
    done = stack.wait(job["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=900)
    assert done["state"] == "succeeded", (done["error"], stack.tail())
    assert mlserver_processes_for(done["id"]) == []  # both servers gone

    models = {m["model_name"]: m for m in done["models"]}
    assert models["legacy_churn"]["environment"]["packages"]["scikit-learn"] == "1.3.2"
    import sklearn

    assert models["churn"]["environment"]["packages"]["scikit-learn"] == sklearn.__version__
    assert all(m["validation"]["passed"] is True and m["left_out"] is None for m in models.values())
    assert all(m["rows_scored"] == POPULATION_ROWS and m["rows_rejected"] == 0 for m in models.values())

    files = {f["name"]: f for f in done["files"]}
    with stack.client() as c:
        blobs = {name: c.get(f["download_url"]).content for name, f in files.items()}
    scores = pq.read_table(io.BytesIO(blobs["scores.parquet"])).to_pandas()
    assert models["legacy_churn"]["column_prefix"] == "legacy_churn_v1_"
    legacy = "legacy_churn_v1_" + _legacy_output(scores)  # the old model names no output: MLServer's name
    assert list(scores.columns) == [
        "customer_id",
        "as_of",
        "outcome",
        "snapshot_date",
        "churn_v1_p_stay",
        "churn_v1_p_churn",
        legacy,
    ]
    assert len(scores) == POPULATION_ROWS and not scores.duplicated(["customer_id", "as_of"]).any()
    scores["snapshot_date"] = pd.to_datetime(scores["snapshot_date"]).dt.date

    # Every (row, model) score is the model's own: the current model in this process, the old one in its stack.
    src = source_rows(history)
    rows = scores.merge(src, on=["customer_id", "snapshot_date"], how="left")
    current = mlflow.pyfunc.load_model("models:/churn/1")
    features = [c for c in src.columns if c not in ("customer_id", "snapshot_date")]
    expected = np.asarray(current.predict(rows[features]))
    assert np.abs(expected[:, 0] - rows.churn_v1_p_stay).max() <= 1e-9
    assert np.abs(expected[:, 1] - rows.churn_v1_p_churn).max() <= 1e-9
    old = rows.merge(old_model.expected, on=["customer_id", "snapshot_date"], how="left")
    assert old.expected.notna().all() and np.abs(old.expected - old[legacy]).max() <= 1e-9

    report = json.loads(blobs["report.json"])
    y = scores.outcome.to_numpy()
    per_model = {m["name"]: m for m in report["models"]}
    for name, column in (("churn", "churn_v1_p_churn"), ("legacy_churn", legacy)):
        auc = roc_auc_score(y, scores[column].to_numpy())
        assert per_model[name]["quality"]["overall"]["auc"] == pytest.approx(auc, abs=1e-12)
    comparison = report["comparison"]
    assert comparison["rows"] == POPULATION_ROWS and comparison["models"] == ["churn v1", "legacy_churn v1"]
    (pair,) = comparison["pairs"]
    z, p = delong_by_definition(y, scores["churn_v1_p_churn"].to_numpy(), scores[legacy].to_numpy())
    assert pair["z"] == pytest.approx(z, rel=1e-9) and pair["p_value"] == pytest.approx(p, abs=1e-6)

    html = blobs["report.html"].decode()
    assert "churn v1" in html and "legacy_churn v1" in html and html.count("<h1>") == 1
    partner_manifest = json.loads(blobs["manifest.json"])
    assert [(m["name"], m["version"]) for m in partner_manifest["models"]] == [("churn", "1"), ("legacy_churn", "1")]
    assert "environment" not in partner_manifest["models"][0]
    lock_files = {n for n in files if n.startswith("requirements.")}
    assert lock_files == {"requirements.churn_v1.lock", "requirements.legacy_churn_v1.lock"}
    assert "scikit-learn==1.3.2" in blobs["requirements.legacy_churn_v1.lock"].decode()
    if "unmatched.csv.gz" in blobs:
        assert gzip.decompress(blobs["unmatched.csv.gz"]).count(b"\n") == 1  # the header: every customer matched


def _legacy_output(scores: pd.DataFrame) -> str:
    (column,) = [c for c in scores.columns if c.startswith("legacy_churn_v1_")]
    return column.removeprefix("legacy_churn_v1_")


def test_cancelling_a_comparison_stops_every_model_server(stack: Stack, history: Path, old_model: OldModel) -> None:
    """Cancelled while its servers start or score: nothing of either deployment is left."""
    population = _population(history)
    job = _submit(stack, "compare-cancel", population)
    assert job["state"] == "queued"
    stack.wait(job["id"], until={"deploying", "validating"})  # two servers start for seconds
    with stack.client() as c:
        assert c.post(f"/api/v1/retro-tests/{job['id']}/cancel").status_code == 202
    done = stack.wait(job["id"], until={"succeeded", "failed", "cancelled"})
    assert done["state"] == "cancelled", done["error"]
    assert mlserver_processes_for(done["id"]) == []


@pytest.mark.parametrize(
    ("models", "says"),
    [
        ([{"name": "churn", "version": "1"}, {"name": "churn", "version": "1"}], "asked for twice"),
        ([{"name": "churn", "version": "1"}] * 6, "at most 5"),
        ([{"name": "churn", "version": "1"}, {"name": "churn"}], "exactly one of version or alias"),
        ([{"name": "churn", "version": "1"}, {"name": "no_such_model", "version": "1"}], "no_such_model"),
    ],
)
def test_a_comparison_the_service_cannot_run_is_refused_at_once(
    client: Any, registry: dict[str, str], models: list[dict[str, str]], says: str
) -> None:
    make_partner(client, "compare-refused")
    body = {
        "partner_code": "compare-refused",
        "models": models,
        "period_start": HISTORY_START.isoformat(),
        "period_end": HISTORY_START.isoformat(),
    }
    resp = client.post("/api/v1/retro-tests", json=body)
    assert resp.status_code in (404, 422), resp.text
    assert says in resp.text


def test_models_and_model_name_together_are_refused(client: Any) -> None:
    make_partner(client, "compare-both")
    body = {
        "partner_code": "compare-both",
        "model_name": "churn",
        "model_version": "1",
        "models": [{"name": "churn", "version": "1"}],
        "period_start": HISTORY_START.isoformat(),
        "period_end": HISTORY_START.isoformat(),
    }
    resp = client.post("/api/v1/retro-tests", json=body)
    assert resp.status_code == 422 and "not both" in resp.text


assert ROWS_PER_DAY * HISTORY_DAYS > POPULATION_ROWS


def test_a_model_that_fails_its_check_is_left_out_with_allow_partial_and_fails_the_job_without(
    stack: Stack, history: Path, old_model: OldModel
) -> None:
    """A compared model whose reference check fails: by default the job fails naming it; with allow_partial the
    other model's results are published and the job says which model was left out and why."""
    version = register_disagreeing(old_model, "compare_disagrees", off_by=1e-3)
    population = _population(history).head(500)
    models = [{"name": "churn", "version": "1"}, {"name": "compare_disagrees", "version": version}]
    strict = _submit(stack, "compare-strict", population, models=models)
    partial = _submit(stack, "compare-partial", population, models=models, allow_partial=True)

    failed = stack.wait(strict["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=600)
    assert failed["state"] == "failed" and failed["error"]["code"] == "reference_mismatch", failed["error"]
    assert failed["error"]["message"].startswith(f"model compare_disagrees version {version}: ")
    assert failed["files"] == [] and mlserver_processes_for(failed["id"]) == []

    done = stack.wait(partial["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=600)
    assert done["state"] == "succeeded", (done["error"], stack.tail())
    kept, left = done["models"]
    assert kept["left_out"] is None and kept["rows_scored"] == len(population)
    assert left["left_out"]["code"] == "reference_mismatch" and left["validation"]["passed"] is False
    assert left["rows_scored"] == 0
    files = {f["name"]: f for f in done["files"]}
    with stack.client() as c:
        scores = pq.read_table(io.BytesIO(c.get(files["scores.parquet"]["download_url"]).content)).to_pandas()
        report = c.get(files["report.json"]["download_url"]).json()
        manifest = c.get(files["manifest.json"]["download_url"]).json()
    assert [c for c in scores.columns if "_v" in c] == ["churn_v1_p_stay", "churn_v1_p_churn"]
    assert len(scores) == len(population)
    assert [m["model"] for m in report["left_out"]] == [f"compare_disagrees v{version}"]
    assert manifest["models"][1]["left_out"]["error"] == "reference_mismatch"
    assert mlserver_processes_for(done["id"]) == []


def test_an_account_manager_compares_two_models_in_the_browser_and_the_partner_reads_the_comparison(  # type: ignore[no-untyped-def]
    stack: Stack,
    chromium,  # noqa: F811
    browser_errors: list[str],  # noqa: F811
    old_model: OldModel,
) -> None:
    """The form with a second model, the job page with each model's rows, the comparison from a partner's link."""
    import re

    from app.db import get_session_factory

    make_partner_quietly(stack, "compare-web")
    with get_session_factory()() as session:
        make_user(session, "am-compare", role="account_manager", partners=["compare-web"], password=PASSWORD)
        session.commit()
    context = watched(
        chromium.new_context(viewport={"width": 1280, "height": 900}, base_url=stack.base_url), browser_errors
    )
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto("/jobs/new")
    page.fill("#username", "am-compare")
    page.fill("#password", PASSWORD)
    page.press("#password", "Enter")
    page.wait_for_url(re.compile(r".*/jobs/new$"))
    page.select_option("#partner_code", "compare-web")
    page.select_option("#model_name", "churn")
    page.wait_for_selector('#model_ref option[value="version:1"]', state="attached")
    page.select_option("#model_ref", "version:1")
    page.fill("#period_start", HISTORY_START.isoformat())
    page.fill("#period_end", (HISTORY_START + timedelta(days=HISTORY_DAYS - 1)).isoformat())
    page.fill("#compare_with", old_model.name)  # no version: refused next to the field, the rest kept
    page.click("button[type=submit]:has-text('Submit retro test')")
    error = page.locator("#compare_with-error")
    error.wait_for()
    assert "write it as NAME/VERSION" in error.inner_text() and page.input_value("#model_ref") == "version:1"
    page.fill("#compare_with", f"{old_model.name}/1")
    page.screenshot(path=str(SHOTS / "new-job-compare.png"), full_page=True)
    page.click("button[type=submit]:has-text('Submit retro test')")
    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f-]{36}$"))

    rows = page.locator("#models tbody tr")
    assert rows.count() == 2 and old_model.name in rows.nth(1).inner_text()
    page.wait_for_function("() => document.getElementById('job-state').textContent === 'succeeded'", timeout=600_000)
    total = f"{HISTORY_DAYS * ROWS_PER_DAY:,}"
    assert page.inner_text("#model-0-scored") == page.inner_text("#model-1-scored") == total
    assert "passed" in page.inner_text("#model-1-check")
    page.screenshot(path=str(SHOTS / "job-page-compare.png"), full_page=True)

    page.click("button:has-text('Create download link')")
    url = page.input_value("#new-link-url")
    partner = watched(chromium.new_context(viewport={"width": 1024, "height": 768}), browser_errors)
    landing = partner.new_page()
    landing.goto(url)
    landing.click("#view-report")
    landing.wait_for_url(re.compile(r".*/report\.html$"))
    text = landing.inner_text("body")
    assert "Comparison of the models" in text and "Pairs of models" in text
    assert "churn v1" in text and f"{old_model.name} v1" in text
    assert landing.locator("h1").count() == 1 and landing.locator("svg").count() >= 3
    landing.screenshot(path=str(SHOTS / "report-compare.png"), full_page=True)
    partner.close()
    context.close()


def test_a_model_over_its_reject_budget_is_left_out_with_allow_partial_and_its_columns_dropped(
    stack: Stack, history: Path, old_model: OldModel
) -> None:
    """NULLs in monthly_spend: the current model (no imputer) refuses those rows, the old one (gradient boosting)
    scores them. With allow_partial, the current model is left out once past its budget: its columns, written in
    the parts, are dropped from the result files; its refusals stay in the rejects, naming it."""
    folder = history / "features" / "compare_nulls" / f"snapshot_date={HISTORY_START.isoformat()}"
    folder.mkdir(parents=True)
    table = source_rows(history).query("snapshot_date == @HISTORY_START").head(50).drop(columns=["snapshot_date"])
    table.loc[[3, 7], "monthly_spend"] = None
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), folder / "part-0.parquet")
    make_partner_quietly(stack, "compare-rejects")
    body = {
        "partner_code": "compare-rejects",
        "models": [{"name": "churn", "version": "1"}, {"name": old_model.name, "version": "1"}],
        "period_start": HISTORY_START.isoformat(),
        "period_end": HISTORY_START.isoformat(),
        "source": {"table": "features.compare_nulls"},
        "allow_partial": True,
    }
    with stack.client() as c:
        resp = c.post("/api/v1/retro-tests", json=body)
    assert resp.status_code == 202, resp.text
    done = stack.wait(resp.json()["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=600)
    assert done["state"] == "succeeded", (done["error"], stack.tail())
    current, old = done["models"]
    assert current["left_out"]["code"] == "too_many_rejected_rows" and current["rows_rejected"] == 2
    assert "refused by model churn version 1" in current["left_out"]["message"]
    assert old["left_out"] is None and old["rows_scored"] == 50
    files = {f["name"]: f for f in done["files"]}
    with stack.client() as c:
        blobs = {name: c.get(f["download_url"]).content for name, f in files.items()}
    scores = pq.read_table(io.BytesIO(blobs["scores.parquet"])).to_pandas()
    assert len(scores) == 50 and not [c for c in scores.columns if c.startswith("churn_v1_")]
    assert scores[f"{old_model.name}_v1_{_legacy_output(scores)}"].notna().all()
    rejects = pacsv.read_csv(io.BytesIO(gzip.decompress(blobs["rejects.csv.gz"]))).to_pandas()
    assert len(rejects) == 2 and set(rejects["model"]) == {"churn v1"}
    assert json.loads(blobs["report.json"])["left_out"][0]["model"] == "churn v1"
