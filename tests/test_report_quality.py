"""The report's quality figures against independent implementations: AUC as sklearn has it, its DeLong interval
as the placement definition gives it (every positive against every negative), the ROC curve's points on
sklearn's curve. No service: DuckDB in memory."""

from __future__ import annotations

import html
import math

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from worker import report


def _sample(seed: int = 11, rows: int = 2_000) -> tuple[np.ndarray, np.ndarray]:
    """Scores with many ties (two decimals) and an outcome that depends on them."""
    rng = np.random.default_rng(seed)
    y = (rng.random(rows) < 0.3).astype(int)
    s = np.round(np.clip(rng.normal(0.4 + 0.25 * y, 0.2), 0, 1), 2)
    return s, y


def _quality(s: np.ndarray, y: np.ndarray) -> dict:  # type: ignore[type-arg]
    con = duckdb.connect()
    table = pa.table({"s": s, "y": y.astype(np.int32), "m": ["2026-11"] * len(s)})
    con.register("t", table)
    con.execute("CREATE VIEW r AS SELECT s, y, m FROM t")
    edges = [float(x) for x in np.quantile(s, np.linspace(0.1, 0.9, 9))]
    return report._quality(con, edges)


def delong_by_definition(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """AUC and its DeLong standard error straight from DeLong et al. (1988): placements of every positive among
    the negatives and of every negative among the positives (ties half), O(P x N)."""
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10 = wins.mean(axis=1)  # each positive's placement
    v01 = wins.mean(axis=0)  # each negative's placement
    auc = float(v10.mean())
    se = math.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    return auc, se


def test_the_auc_interval_is_delongs_and_the_auc_is_sklearns() -> None:
    s, y = _sample()
    overall = _quality(s, y)["overall"]
    auc, se = delong_by_definition(s, y)
    assert overall["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert overall["auc"] == pytest.approx(auc, abs=1e-12)
    assert overall["auc_se"] == pytest.approx(se, abs=1e-6)
    lo, hi = overall["auc_ci95"]
    assert lo == pytest.approx(auc - 1.959963984540054 * se, abs=1e-6)
    assert hi == pytest.approx(auc + 1.959963984540054 * se, abs=1e-6)
    assert overall["gini_ci95"] == pytest.approx([2 * lo - 1, 2 * hi - 1], abs=1e-12)
    # On a few thousand rows the interval is several points wide: what a partner comparing models must see.
    assert 0.02 < hi - lo < 0.1


def test_a_small_sample_has_a_wide_interval_and_one_class_has_none() -> None:
    s, y = _sample(seed=3, rows=120)
    small = _quality(s, y)["overall"]
    _, se = delong_by_definition(s, y)
    assert small["auc_se"] == pytest.approx(se, abs=1e-6)
    assert small["auc_ci95"][1] - small["auc_ci95"][0] > 0.1
    ones = _quality(s, np.ones_like(y))["overall"]
    assert ones["auc"] is None and ones["auc_ci95"] is None and "roc" not in ones


def test_the_roc_and_gain_curves_lie_on_sklearns_curve() -> None:
    s, y = _sample(seed=5, rows=5_000)
    overall = _quality(s, y)["overall"]
    fpr, tpr, _ = roc_curve(y, s)
    ours = list(zip(overall["roc"]["fpr"], overall["roc"]["tpr"], strict=True))
    assert ours[0] == (0.0, 0.0) and ours[-1] == (1.0, 1.0)
    assert len(ours) <= 1 / report._CURVE_STEP + 2
    for f, t in ours:
        assert np.min(np.abs(fpr - f) + np.abs(tpr - t)) < 1e-12, (f, t)
    # Gain: the share of outcomes captured is the ROC's TPR; the share selected is the rows above the threshold.
    assert overall["gain"]["captured"] == overall["roc"]["tpr"]
    selected = overall["gain"]["selected"]
    assert selected[0] == 0.0 and selected[-1] == 1.0 and selected == sorted(selected)
    positives, rows = int(y.sum()), len(y)
    for share, f, t in zip(selected, overall["roc"]["fpr"], overall["roc"]["tpr"], strict=True):
        assert share == pytest.approx((t * positives + f * (rows - positives)) / rows, abs=1e-12)


def test_the_html_report_leads_with_the_summary_and_explains_each_figure() -> None:
    s, y = _sample()
    quality = _quality(s, y)
    figures = {
        "score_column": "p1",
        "outcome_column": "churned",
        "rows": {"requested": 2100, "matched": 2000, "scored": 2000, "rejected": 0, "unmatched": 100},
        "null_rate": {"x": 0.01},
        "score": None,
        "quality": quality,
    }
    page = report.render_html(figures, title="churn version 3 on ACME's customers, 2026-10-01 to 2026-10-31")
    assert page.index("<h1>churn version 3 on ACME&#x27;s customers") < page.index("id='summary'")
    summary = page[page.index("id='summary'") : page.index("</section>")]
    lo, hi = quality["overall"]["auc_ci95"]
    assert f"{quality['overall']['auc']:.3f} ({lo:.3f} to {hi:.3f})" in summary
    assert "Customers not found in the history" in summary and "100" in summary
    for key in ("auc", "ci", "gini", "ks", "roc", "gain", "lift", "null", "rows"):
        assert html.escape(report.EXPLAIN[key]) in page, key  # the whole sentence, as the page escapes it
    assert page.count("<svg") >= 3  # ROC, gain, calibration


def test_days_without_history_are_named_in_the_summary_and_marked_on_the_rows_per_day_chart() -> None:
    figures = {
        "score_column": "p1",
        "outcome_column": None,
        "rows": {"requested": 300, "matched": 300, "scored": 300, "rejected": 0, "unmatched": None},
        "days_without_history": ["2026-11-28", "2026-11-29", "2026-12-01"],
        "null_rate": {},
        "score": None,
        "quality": None,
    }
    page = report.render_html(figures, title="t")
    summary = page[page.index("id='summary'") : page.index("</section>")]
    assert "Days without history (not in the results)" in summary
    assert "3: 2026-11-28 to 2026-11-29, 2026-12-01" in summary
    days = [{"day": "2026-11-27", "rows": 100}, {"day": "2026-11-30", "rows": 100}]
    with_gaps = report._svg_days(days, missing=figures["days_without_history"])
    without = report._svg_days(days, missing=[])
    assert with_gaps.count("<path") > without.count("<path")  # the red marks and the legend are drawn
