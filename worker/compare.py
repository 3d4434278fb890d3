"""How several models compare on the same rows: the figures of a comparison report.

The input is a DuckDB view `c` with one row per customer and day that every model scored: `m` (the month,
YYYY-MM), `y` (the 0/1 outcome, or none without outcomes) and `s0`, `s1`, ... (each model's score, as DOUBLE). Every
figure is computed by DuckDB or from what it streams back, so nothing holds the rows in Python's memory.

Per model: the report's own figures (worker/report.py `ranking`: AUC with DeLong's 95% interval, Gini, KS, ROC
curve, AUC per month), so a model's figures here are those of its own report restricted to the shared rows.
Per pair of models:
- DeLong's test for two correlated ROC curves (DeLong, DeLong & Clarke-Pearson 1988, as pROC's roc.test with
  method="delong" computes it): each positive's placement under a model is the share of negatives it outscores
  (ties half), each negative's the share of positives that outscore it; the AUCs' covariance matrix is
  S10/P + S01/N, S10 and S01 the covariances of the placements over the positives and over the negatives. Rows
  sharing a score share a placement, so a placement table per model (one row per distinct score) joined back to
  the rows gives every sum in one pass. z = (AUC1 - AUC2) / sd, two-sided p-value.
- Spearman's correlation of the scores (Pearson's on average ranks, ties sharing the mean of their ranks).
- The overlap of the top deciles: the share of the customers in either model's top 10% (at or above the model's
  exact 90th percentile) that are in both.
- PSI of the second model's scores over the first's decile bins: how differently the two spread the customers.
Without outcomes only the last three are computed.
"""

from __future__ import annotations

import html
import itertools
import math
from typing import Any

from app.i18n import N_, _
from app.integrations.history.local import duckdb_connection
from worker import report

_Z95 = 1.959963984540054


def build(con: Any, *, labels: list[str], outcome: bool) -> dict[str, Any]:
    """The comparison of the models named `labels` (in the order of s0, s1, ...) over the view `c`."""
    rows = int(con.execute("SELECT count(*) FROM c").fetchone()[0])
    out: dict[str, Any] = {"models": labels, "rows": rows, "quality": None, "pairs": []}
    if rows == 0:
        return out
    pairs = list(itertools.combinations(range(len(labels)), 2))
    ranks = _ranks(con, len(labels))
    figures = [
        {
            "first": labels[i],
            "second": labels[j],
            "spearman": _spearman(con, ranks, i, j),
            "top_decile_overlap": _top_decile_overlap(con, i, j),
            "psi": _psi(con, i, j),
        }
        for i, j in pairs
    ]
    if outcome:
        quality = [_quality(con, k) for k in range(len(labels))]
        out["quality"] = [{"model": label} | q for label, q in zip(labels, quality, strict=True)]
        tests = _delong(con, [q["auc"] for q in quality])
        for (i, j), figure in zip(pairs, figures, strict=True):
            figure |= tests.get((i, j), _NO_TEST)
    out["pairs"] = figures
    return out


def build_from_parts(inputs: report.ReportInputs, *, columns: list[str], labels: list[str]) -> dict[str, Any]:
    """The comparison of the models whose scores are `columns` of the job's committed parts."""
    pop = inputs.query.population
    outcome = pop.outcome_column if pop else None
    if not inputs.parts:
        return {"models": labels, "rows": 0, "quality": None, "pairs": []}
    with duckdb_connection(memory_limit=inputs.memory_limit, spill_dir=inputs.spill_dir) as con:
        report.parts_view(con, inputs)
        day = report.day_column(inputs)
        y = f'CAST("{outcome}" AS INTEGER) AS y, ' if outcome else ""
        scores = ", ".join(f'CAST("{c}" AS DOUBLE) AS s{k}' for k, c in enumerate(columns))
        shared = " AND ".join(f'"{c}" IS NOT NULL' for c in [*columns, *([outcome] if outcome else [])])
        con.execute(
            f"CREATE VIEW c AS SELECT strftime(CAST(\"{day}\" AS DATE), '%Y-%m') AS m, {y}{scores} "
            f"FROM parts WHERE {shared}"
        )
        return build(con, labels=labels, outcome=outcome is not None)


_NO_TEST: dict[str, Any] = {"auc_difference": None, "difference_ci95": None, "z": None, "p_value": None}


def _quality(con: Any, k: int) -> dict[str, Any]:
    """Model k's AUC, interval, Gini, KS, ROC curve and AUC per month, over the shared rows."""
    con.execute(f"CREATE OR REPLACE TEMP VIEW r AS SELECT m, s{k} AS s, y FROM c")
    quality = report.ranking(con)
    overall: dict[str, Any] = quality["overall"]
    by_month = [{"month": q["month"], "auc": q["auc"], "rows": q["rows"]} for q in quality["by_month"]]
    return overall | {"by_month": by_month}


def _placements(con: Any, k: int) -> None:
    """Table p{k}: per distinct score of model k, a positive's placement (v10) and a negative's (v01)."""
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE p{k} AS
        WITH g AS (SELECT s{k} AS s, sum(y) AS pos, count(*) - sum(y) AS neg FROM c GROUP BY s{k}),
        t AS (SELECT sum(pos) AS p, sum(neg) AS n FROM g)
        SELECT s,
          (coalesce(sum(neg) OVER (ORDER BY s ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) + 0.5 * neg)
            / (SELECT n FROM t) AS v10,
          (coalesce(sum(pos) OVER (ORDER BY s ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING), 0) + 0.5 * pos)
            / (SELECT p FROM t) AS v01
        FROM g"""
    )


def _delong(con: Any, aucs: list[float | None]) -> dict[tuple[int, int], dict[str, Any]]:
    """DeLong's paired test for every pair of models: the AUC difference, its 95% interval, z and p."""
    k = len(aucs)
    pos, neg = (int(v) for v in con.execute("SELECT sum(y), count(*) - sum(y) FROM c").fetchone())
    if pos < 2 or neg < 2 or any(a is None for a in aucs):
        return {}
    for i in range(k):
        _placements(con, i)
    joins = " ".join(f"JOIN p{i} ON c.s{i} = p{i}.s" for i in range(k))
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    # Centred on the AUCs (each placement's mean), so the sums of products lose nothing to cancellation.
    cols = ", ".join(
        f"fsum(CASE WHEN y = 1 THEN (p{i}.v10 - {aucs[i]!r}) * (p{j}.v10 - {aucs[j]!r}) END), "
        f"fsum(CASE WHEN y = 0 THEN (p{i}.v01 - {aucs[i]!r}) * (p{j}.v01 - {aucs[j]!r}) END)"
        for i, j in pairs
    )
    sums = con.execute(f"SELECT {cols} FROM c {joins}").fetchone()
    cov: dict[tuple[int, int], float] = {}
    for n, (i, j) in enumerate(pairs):
        s10, s01 = sums[2 * n] / (pos - 1), sums[2 * n + 1] / (neg - 1)
        cov[i, j] = cov[j, i] = s10 / pos + s01 / neg
    out = {}
    for i, j in itertools.combinations(range(k), 2):
        diff = float(aucs[i]) - float(aucs[j])  # type: ignore[arg-type]
        var = cov[i, i] + cov[j, j] - 2 * cov[i, j]
        if var <= 0:  # two models that rank every pair alike
            out[i, j] = _NO_TEST | {"auc_difference": diff}
            continue
        sd = math.sqrt(var)
        z = diff / sd
        out[i, j] = {
            "auc_difference": diff,
            "difference_ci95": [diff - _Z95 * sd, diff + _Z95 * sd],
            "z": z,
            "p_value": math.erfc(abs(z) / math.sqrt(2)),
        }
    return out


def _ranks(con: Any, k: int) -> list[str]:
    """Tables q{i}: per distinct score of model i, its average rank among the shared rows."""
    for i in range(k):
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE q{i} AS
            WITH g AS (SELECT s{i} AS s, count(*) AS cnt FROM c GROUP BY s{i})
            SELECT s, coalesce(sum(cnt) OVER (ORDER BY s ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
              + (cnt + 1) / 2.0 AS rk FROM g"""
        )
    return [f"q{i}" for i in range(k)]


def _spearman(con: Any, ranks: list[str], i: int, j: int) -> float | None:
    value = con.execute(
        f"SELECT corr({ranks[i]}.rk, {ranks[j]}.rk) FROM c "
        f"JOIN {ranks[i]} ON c.s{i} = {ranks[i]}.s JOIN {ranks[j]} ON c.s{j} = {ranks[j]}.s"
    ).fetchone()[0]
    return None if value is None or math.isnan(value) else float(value)


def _top_decile_overlap(con: Any, i: int, j: int) -> float | None:
    both, either = con.execute(
        f"""WITH t AS (SELECT quantile_disc(s{i}, 0.9) AS ti, quantile_disc(s{j}, 0.9) AS tj FROM c)
        SELECT count(*) FILTER (WHERE s{i} >= ti AND s{j} >= tj), count(*) FILTER (WHERE s{i} >= ti OR s{j} >= tj)
        FROM c, t"""
    ).fetchone()
    return int(both) / int(either) if either else None


def _psi(con: Any, i: int, j: int) -> float:
    """PSI of model j's scores over model i's decile bins."""
    edges = con.execute(f"SELECT quantile_cont(s{i}, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]) FROM c").fetchone()[
        0
    ]
    bins = len(edges) + 1

    def shares(column: str) -> list[float]:
        whens = " ".join(f"WHEN {column} <= {float(e)!r} THEN {n}" for n, e in enumerate(edges))
        counts = [0.0] * bins
        for b, n in con.execute(f"SELECT CASE {whens} ELSE {bins - 1} END AS b, count(*) FROM c GROUP BY b").fetchall():
            counts[int(b)] = float(n)
        total = sum(counts)
        return [n / total for n in counts]

    return report.psi(shares(f"s{i}"), shares(f"s{j}"))


# --- the comparison's section of report.html ---------------------------------------------------------------------

EXPLAIN = {
    "compare": N_(
        "The models below scored the same customers on the same days; only rows every model scored are compared, "
        "so each model's figures here may differ slightly from its own report."
    ),
    "delong": N_(
        "AUC difference: how much better the first model ranks than the second, with its 95% interval. p-value "
        "(DeLong's test for two models on the same rows): the chance of a difference at least this large if the "
        "models were equally good; under 0.05, the difference is unlikely to be chance."
    ),
    "agreement": N_(
        "Spearman: how alike the two models order the customers (1: the same order). Top-decile overlap: the share "
        "of the customers in either model's top 10% who are in both. PSI: how differently the two models spread "
        "the customers over the first one's deciles (under 0.1: alike, over 0.25: very different)."
    ),
}


def render_html(figures: dict[str, Any]) -> str:
    """The comparison as a section of report.html: the models side by side, each pair, the ROC curves together."""
    parts = [report.heading(2, _("Comparison of the models")), _explain("compare")]
    parts.append("<p>" + html.escape(_("Rows compared: {rows}").format(rows=f"{figures['rows']:,}")) + "</p>")
    quality = figures.get("quality")
    if quality:
        parts.append(
            report.table(
                [_("model"), "AUC", _("AUC 95% interval"), "Gini", _("Gini 95% interval"), "KS"],
                [
                    [
                        q["model"],
                        report.f3(q["auc"]),
                        report.interval(q["auc_ci95"]),
                        report.f3(q["gini"]),
                        report.interval(q["gini_ci95"]),
                        report.f3(q["ks"]),
                    ]
                    for q in quality
                ],
            )
        )
    if figures["pairs"]:
        parts += [report.heading(3, _("Pairs of models")), _explain("agreement")]
        head = [_("first model"), _("second model")]
        if quality:
            parts.append(_explain("delong"))
            head += [_("AUC difference"), _("95% interval"), _("p-value")]
        head += ["Spearman", _("top-decile overlap"), "PSI"]
        rows = []
        for p in figures["pairs"]:
            row = [p["first"], p["second"]]
            if quality:
                row += [report.f3(p["auc_difference"]), report.interval(p["difference_ci95"]), _p_value(p["p_value"])]
            row += [report.f3(p["spearman"]), report.pct(p["top_decile_overlap"]), report.f4(p["psi"])]
            rows.append(row)
        parts.append(report.table(head, rows))
    if quality:
        months = [m["month"] for m in quality[0]["by_month"]]
        by_model = [{m["month"]: m["auc"] for m in q["by_month"]} for q in quality]
        parts += [
            report.heading(3, _("AUC per month")),
            report.table(
                [_("month"), *(q["model"] for q in quality)],
                [[month, *(report.f3(auc.get(month)) for auc in by_model)] for month in months],
            ),
        ]
        if all(q.get("roc") for q in quality):
            parts += [report.heading(3, _("ROC curves")), _svg_roc_curves(quality)]
    return "\n".join(parts)


def _explain(key: str) -> str:
    return f"<p class='explain'>{html.escape(_(EXPLAIN[key]))}</p>"


def _p_value(p: float | None) -> str:
    if p is None:
        return "-"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def _svg_roc_curves(quality: list[dict[str, Any]]) -> str:
    fig = report.figure(square=True)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label=_("guessing"))
    for q in quality:
        ax.plot(q["roc"]["fpr"], q["roc"]["tpr"], label=f"{q['model']} (AUC {q['auc']:.3f})")
    ax.set_xlabel(_("false positive rate"))
    ax.set_ylabel(_("true positive rate"))
    ax.legend(loc="lower right", fontsize=8)
    return report.svg(fig)
