"""The comparison report's figures against independent implementations: DeLong's paired test as R's pROC computes
it (tests/data/delong: the rows, the R script and its output), AUC as sklearn has it, Spearman's correlation as
scipy has it, the top-decile overlap and PSI counted with numpy. No service: DuckDB in memory."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from worker import compare, report

DATA = Path(__file__).parent / "data" / "delong"
MODELS = ["a", "b", "c", "d"]


def _rows() -> dict[str, np.ndarray]:
    with open(DATA / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    return {k: np.array([float(r[k]) for r in rows]) for k in ["y", *MODELS]}


def _connection(data: dict[str, np.ndarray], *, outcome: bool = True) -> duckdb.DuckDBPyConnection:
    n = len(data["y"])
    columns = {"m": [f"2026-{1 + i % 3:02d}" for i in range(n)]}
    if outcome:
        columns["y"] = data["y"].astype(np.int32)
    columns |= {f"s{k}": data[name] for k, name in enumerate(MODELS)}
    con = duckdb.connect()
    con.register("t", pa.table(columns))
    con.execute("CREATE VIEW c AS SELECT * FROM t")
    return con


@pytest.fixture(scope="module")
def figures() -> dict:  # type: ignore[type-arg]
    return compare.build(_connection(_rows()), labels=MODELS, outcome=True)


def test_delong_matches_proc(figures: dict) -> None:  # type: ignore[type-arg]
    """Each AUC, its variance and interval, and each pair's z and p-value as pROC 1.18's roc.test(method="delong")."""
    expected = json.loads((DATA / "reference.json").read_text())
    quality = {q["model"]: q for q in figures["quality"]}
    for name, ref in expected["models"].items():
        assert quality[name]["auc"] == pytest.approx(ref["auc"], abs=1e-12)
        assert quality[name]["auc_se"] ** 2 == pytest.approx(ref["var"], rel=1e-9)
        assert quality[name]["auc_ci95"] == pytest.approx(ref["ci95"], abs=1e-9)
    pairs = {(p["first"], p["second"]): p for p in figures["pairs"]}
    assert len(pairs) == len(expected["pairs"]) == 6
    for ref in expected["pairs"]:
        got = pairs[ref["first"], ref["second"]]
        assert got["z"] == pytest.approx(ref["z"], rel=1e-9)
        assert got["p_value"] == pytest.approx(ref["p_value"], abs=1e-6, rel=1e-6)
        first, second = expected["models"][ref["first"]], expected["models"][ref["second"]]
        sd = math.sqrt(first["var"] + second["var"] - 2 * ref["cov"])
        assert got["auc_difference"] == pytest.approx(first["auc"] - second["auc"], abs=1e-12)
        assert got["difference_ci95"] == pytest.approx(
            [got["auc_difference"] - 1.959963984540054 * sd, got["auc_difference"] + 1.959963984540054 * sd], abs=1e-9
        )
    # the pair whose difference is not significant: a p-value far from 0, where 1e-6 means something
    assert 0.1 < pairs["a", "d"]["p_value"] < 0.3


def test_auc_per_model_and_month_as_sklearn(figures: dict) -> None:  # type: ignore[type-arg]
    data = _rows()
    months = np.array([f"2026-{1 + i % 3:02d}" for i in range(len(data["y"]))])
    for q in figures["quality"]:
        assert q["auc"] == pytest.approx(roc_auc_score(data["y"], data[q["model"]]), abs=1e-12)
        assert [m["month"] for m in q["by_month"]] == ["2026-01", "2026-02", "2026-03"]
        for m in q["by_month"]:
            here = months == m["month"]
            assert m["auc"] == pytest.approx(roc_auc_score(data["y"][here], data[q["model"]][here]), abs=1e-12)
            assert m["rows"] == here.sum()


def _top_decile(s: np.ndarray) -> np.ndarray:
    return s >= np.quantile(s, 0.9, method="inverted_cdf")


def _psi_by_numpy(first: np.ndarray, second: np.ndarray) -> float:
    edges = np.quantile(first, np.linspace(0.1, 0.9, 9))
    bins = np.searchsorted(edges, first, side="left"), np.searchsorted(edges, second, side="left")
    a, b = (np.bincount(x, minlength=10) / len(x) for x in bins)
    return report.psi(list(a), list(b))


@pytest.mark.parametrize("outcome", [True, False])
def test_distribution_comparisons_by_numpy_and_scipy(outcome: bool) -> None:
    data = _rows()
    figures = compare.build(_connection(data, outcome=outcome), labels=MODELS, outcome=outcome)
    assert figures["rows"] == len(data["y"])
    for pair in figures["pairs"]:
        first, second = data[pair["first"]], data[pair["second"]]
        assert pair["spearman"] == pytest.approx(spearmanr(first, second).statistic, abs=1e-9)
        top1, top2 = _top_decile(first), _top_decile(second)
        assert pair["top_decile_overlap"] == pytest.approx((top1 & top2).sum() / (top1 | top2).sum(), abs=1e-12)
        assert pair["psi"] == pytest.approx(_psi_by_numpy(first, second), abs=1e-9)
        if not outcome:
            assert pair["p_value"] is None if "p_value" in pair else True
    assert (figures["quality"] is None) == (not outcome)


def test_a_model_compared_with_itself_has_no_test() -> None:
    """Identical rankings: the difference's variance is 0, so there is no z, and the figures say so plainly."""
    data = _rows()
    con = duckdb.connect()
    con.register("t", pa.table({"m": ["2026-01"] * len(data["y"]), "y": data["y"].astype(np.int32), "s0": data["a"]}))
    con.execute("CREATE VIEW c AS SELECT m, y, s0, s0 * 2 AS s1 FROM t")
    pair = compare.build(con, labels=["a", "twice a"], outcome=True)["pairs"][0]
    assert pair["auc_difference"] == 0.0 and pair["z"] is None and pair["p_value"] is None
    assert pair["spearman"] == pytest.approx(1.0) and pair["top_decile_overlap"] == 1.0


@pytest.mark.parametrize("language", ["en", "ru"])
def test_comparison_section_of_the_report(figures: dict, language: str) -> None:  # type: ignore[type-arg]
    """Every model and pair is in the section, the figures as the JSON has them; labels are escaped."""
    from app.i18n import use_language

    labelled = figures | {"quality": [q | {"model": f"<{q['model']}>"} for q in figures["quality"]]}
    with use_language(language):
        page = compare.render_html(labelled)
        intervals = [report.interval(p["difference_ci95"]) for p in figures["pairs"]]
    assert page.count("<svg") == 1  # the ROC curves of every model on one chart
    for q in figures["quality"]:
        assert f"&lt;{q['model']}&gt;" in page and f"<{q['model']}>" not in page
        assert f"{q['auc']:.3f}" in page
    assert all(i in page for i in intervals)
    a_and_d = next(p for p in figures["pairs"] if (p["first"], p["second"]) == ("a", "d"))
    assert f"{a_and_d['p_value']:.4f}" in page
    assert ("Сравнение моделей" in page) == (language == "ru")
    assert ("Comparison of the models" in page) == (language == "en")


def test_comparison_without_outcomes_has_no_quality_columns() -> None:
    figures = compare.build(_connection(_rows(), outcome=False), labels=MODELS, outcome=False)
    page = compare.render_html(figures)
    assert "<svg" not in page and "p-value" not in page and "Spearman" in page
