"""The quality report of a job (report.json + a self-contained report.html), written while it publishes.

Figures come from the job's committed parts through DuckDB under RETRO_REPORT_MEMORY_LIMIT (it spills to disk
past it), and from each chunk's input statistics written with its parts (null rates): nothing holds the result in
Python's memory. AUC and KS are exact: DuckDB counts positives and negatives per distinct score (per month, and
overall), the rows stream back in score order, and one pass adds them up, ties counted half as
sklearn.metrics.roc_auc_score does, KS as scipy.stats.ks_2samp's statistic (the largest gap of the two ECDFs).
Deciles use DuckDB's approx_quantile (a t-digest). Charts are drawn with matplotlib as inline SVG, glyphs as
paths: the page loads no script, font or image from anywhere, and opens offline.
"""

from __future__ import annotations

import html
import io
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from app.core.periods import days_text
from app.i18n import N_, _, current_language
from app.integrations.history.local import duckdb_connection
from app.integrations.history.port import HistoryQuery
from app.integrations.storage.results import ResultStore

HIST_BINS = 20
_EPS = 1e-6  # PSI: an empty bin counts as this share, so the log stays finite


@dataclass(frozen=True)
class ReportInputs:
    """What the report is made of: the job's committed parts, its chunks' statistics, and its row counts."""

    store: ResultStore
    parts: list[str]
    stats: list[str]
    query: HistoryQuery
    score_column: str
    rows: dict[str, int | None]  # requested, matched, scored, rejected, unmatched
    days_without_history: list[str] | None  # YYYY-MM-DD days of the period with no history (None: not known)
    memory_limit: str
    spill_dir: Path | None = None
    only_scored: bool = False  # a compared model: leave out the rows it refused (null in its column)


def build(inputs: ReportInputs) -> dict[str, Any]:
    """Every figure of the report, as report.json holds them."""
    pop = inputs.query.population
    outcome = pop.outcome_column if pop else None
    report: dict[str, Any] = {
        "score_column": inputs.score_column,
        "day_column": pop.as_of_column if pop else inputs.query.date_column,
        "outcome_column": outcome,
        "rows": inputs.rows,
        "period": {"start": inputs.query.start.isoformat(), "end": inputs.query.end.isoformat()},
        "days_without_history": inputs.days_without_history,
        "null_rate": _null_rates(inputs),
    }
    if not inputs.parts:
        return report | {"rows_per_day": [], "score": None, "psi": [], "quality": None}
    with duckdb_connection(memory_limit=inputs.memory_limit, spill_dir=inputs.spill_dir) as con:
        _results_view(con, inputs, outcome=outcome)
        report["rows_per_day"] = [
            {"day": d.isoformat(), "rows": int(n)}
            for d, n in con.execute("SELECT d, count(*) FROM r GROUP BY d ORDER BY d").fetchall()
        ]
        report["score"] = _distribution(con)
        edges = report["score"]["deciles"]
        report["psi"] = _psi(con, edges)
        report["quality"] = _quality(con, edges) if outcome else None
    return report


def _results_view(con: Any, inputs: ReportInputs, *, outcome: str | None) -> None:
    day = f'"{day_column(inputs)}"'
    y = f', CAST("{outcome}" AS INTEGER) AS y' if outcome else ""
    parts_view(con, inputs)
    where = f' WHERE "{inputs.score_column}" IS NOT NULL' if inputs.only_scored else ""
    con.execute(
        f'CREATE VIEW r AS SELECT CAST({day} AS DATE) AS d, CAST("{inputs.score_column}" AS DOUBLE) AS s{y}, '
        f"strftime(CAST({day} AS DATE), '%Y-%m') AS m FROM parts{where}"
    )


def parts_view(con: Any, inputs: ReportInputs) -> None:
    """The view `parts`: the job's committed parts, read where they are."""
    store = inputs.store
    if store.is_local:
        files = [store.local_path(p) for p in inputs.parts]
    else:  # DuckDB reads the parts where they are, through the store's own fsspec filesystem
        con.register_filesystem(store.filesystem)
        files = [store.location(p) for p in inputs.parts]
    # By name: a compared model left out part way (allow_partial) has its columns in the earlier parts only.
    con.read_parquet(files, union_by_name=True).create_view("parts")


def day_column(inputs: ReportInputs) -> str:
    pop = inputs.query.population
    return pop.as_of_column if pop else inputs.query.date_column


def _null_rates(inputs: ReportInputs) -> dict[str, float | None]:
    rows, nulls = 0, dict.fromkeys((f.name for f in inputs.query.features), 0)
    for rel in inputs.stats:
        if not inputs.store.exists(rel):
            continue
        with inputs.store.open_read(rel) as fh:
            stats = json.loads(fh.read())
        rows += int(stats["rows"])
        for name, n in stats["nulls"].items():
            nulls[name] = nulls.get(name, 0) + int(n)
    return {name: (n / rows if rows else None) for name, n in nulls.items()}


def _distribution(con: Any) -> dict[str, Any]:
    n, lo, hi, mean, deciles = con.execute(
        "SELECT count(*), min(s), max(s), avg(s), approx_quantile(s, [0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9]) FROM r"
    ).fetchone()
    width = (hi - lo) / HIST_BINS if hi > lo else 1.0
    counts = [0] * HIST_BINS
    for b, c in con.execute(
        f"SELECT least(CAST(floor((s - {lo!r}) / {width!r}) AS INTEGER), {HIST_BINS - 1}), count(*) FROM r GROUP BY 1"
    ).fetchall():
        counts[int(b)] = int(c)
    edges = [lo + i * width for i in range(HIST_BINS + 1)]
    return {
        "rows": int(n),
        "min": lo,
        "max": hi,
        "mean": mean,
        "deciles": [float(x) for x in deciles],
        "histogram": {"edges": edges, "counts": counts},
    }


def _bin_sql(edges: list[float]) -> str:
    """The decile bin (0-9) of score s, by the overall deciles' edges."""
    whens = " ".join(f"WHEN s <= {e!r} THEN {i}" for i, e in enumerate(edges))
    return f"CASE {whens} ELSE {len(edges)} END"


def _psi(con: Any, edges: list[float]) -> list[dict[str, Any]]:
    """Population stability of the score between each month and the one before, over the overall decile bins."""
    shares: dict[str, list[float]] = {}
    for m, b, c in con.execute(f"SELECT m, {_bin_sql(edges)} AS b, count(*) FROM r GROUP BY ALL ORDER BY m").fetchall():
        shares.setdefault(m, [0.0] * (len(edges) + 1))[int(b)] = float(c)
    months = sorted(shares)
    for m in months:
        total = sum(shares[m])
        shares[m] = [c / total for c in shares[m]]
    return [{"from": b, "to": a, "psi": psi(shares[b], shares[a])} for b, a in itertools.pairwise(months)]


def psi(before: list[float], after: list[float]) -> float:
    """The population stability index of two distributions over the same bins (shares that add up to 1)."""
    return sum(
        (max(a, _EPS) - max(b, _EPS)) * math.log(max(a, _EPS) / max(b, _EPS))
        for a, b in zip(after, before, strict=True)
    )


# The two-sided 95% normal quantile, for the AUC's confidence interval.
_Z95 = 1.959963984540054
# ROC and gain curves keep a point at every this share of the rows (and at both ends): ~200 points at most.
_CURVE_STEP = 0.005


@dataclass
class _Ranking:
    """AUC, its DeLong variance, KS and the ROC/gain curves of one group, added up from its positives and negatives
    per distinct score, in ascending score order.

    DeLong et al. (1988): each positive's placement is the share of negatives scored below it (ties half), each
    negative's the share of positives scored above it; AUC is the mean placement, and its variance is
    var(positive placements)/P + var(negative placements)/N. Rows that share a score share a placement, so one pass
    over the distinct scores holds the sums the variance needs.
    """

    pos: int = 0
    neg: int = 0
    area: float = 0.0  # sum over positives of the negatives below them (ties: half)
    ks: float = 0.0
    curves: bool = False
    _cum_pos: int = 0
    _cum_neg: int = 0
    _sq10: float = 0.0  # sum over positives of their placement squared
    _sq01: float = 0.0  # sum over negatives of their placement squared
    _points: list[tuple[float, float, float]] | None = None  # (share of rows above, FPR, TPR), highest first
    _next_point: float = 0.0

    def totals(self, pos: int, neg: int) -> None:
        self.pos, self.neg = pos, neg

    def add(self, pos: int, neg: int) -> None:
        if self.pos and self.neg:
            placement10 = (self._cum_neg + 0.5 * neg) / self.neg
            placement01 = (self.pos - self._cum_pos - 0.5 * pos) / self.pos
            self._sq10 += pos * placement10 * placement10
            self._sq01 += neg * placement01 * placement01
        self.area += pos * (self._cum_neg + 0.5 * neg)
        self._cum_pos += pos
        self._cum_neg += neg
        if self.pos and self.neg:
            self.ks = max(self.ks, abs(self._cum_pos / self.pos - self._cum_neg / self.neg))
            if self.curves:
                self._curve_point()

    def _curve_point(self) -> None:
        """A point of the ROC and gain curves for the threshold 'score above the scores added so far'."""
        total = self.pos + self.neg
        below = (self._cum_pos + self._cum_neg) / total
        if self._points is None:
            self._points = [(1.0, 1.0, 1.0)]  # every row selected
        if below >= self._next_point or below >= 1.0:
            self._points.append(
                (1.0 - below, (self.neg - self._cum_neg) / self.neg, (self.pos - self._cum_pos) / self.pos)
            )
            self._next_point = below + _CURVE_STEP

    def result(self) -> dict[str, Any]:
        auc = self.area / (self.pos * self.neg) if self.pos and self.neg else None
        out: dict[str, Any] = {
            "rows": self.pos + self.neg,
            "positives": self.pos,
            "auc": auc,
            "gini": 2 * auc - 1 if auc is not None else None,
            "ks": self.ks if self.pos and self.neg else None,
            "auc_se": None,
            "auc_ci95": None,
            "gini_ci95": None,
        }
        if auc is not None and self.pos > 1 and self.neg > 1:
            var10 = max(self._sq10 - self.pos * auc * auc, 0.0) / (self.pos - 1)
            var01 = max(self._sq01 - self.neg * auc * auc, 0.0) / (self.neg - 1)
            se = math.sqrt(var10 / self.pos + var01 / self.neg)
            lo, hi = max(0.0, auc - _Z95 * se), min(1.0, auc + _Z95 * se)
            out |= {"auc_se": se, "auc_ci95": [lo, hi], "gini_ci95": [2 * lo - 1, 2 * hi - 1]}
        if self.curves and self._points:
            points = self._points[::-1]  # from the highest threshold (no row selected) to every row
            out["roc"] = {"fpr": [p[1] for p in points], "tpr": [p[2] for p in points]}
            out["gain"] = {"selected": [p[0] for p in points], "captured": [p[2] for p in points]}
        return out


def _stream(con: Any, sql: str) -> Iterator[tuple[Any, ...]]:
    cursor = con.execute(sql)
    while rows := cursor.fetchmany(10_000):
        yield from rows


def _quality(con: Any, edges: list[float]) -> dict[str, Any]:
    figures = ranking(con)
    return figures | {"deciles": _deciles(con, edges, positives=figures["overall"]["positives"])}


def ranking(con: Any) -> dict[str, Any]:
    """AUC with its interval, Gini, KS and the curves over the view r (s, y, m): overall and per month."""
    totals = {
        m: (int(p), int(n))
        for m, p, n in con.execute("SELECT m, sum(y), count(*) - sum(y) FROM r GROUP BY m").fetchall()
    }
    overall = _Ranking(curves=True)
    overall.totals(sum(p for p, _n in totals.values()), sum(n for _p, n in totals.values()))
    for _score, p, n in _stream(con, "SELECT s, sum(y), count(*) - sum(y) FROM r GROUP BY s ORDER BY s"):
        overall.add(int(p), int(n))
    monthly: dict[str, _Ranking] = {}
    for m, _score, p, n in _stream(con, "SELECT m, s, sum(y), count(*) - sum(y) FROM r GROUP BY m, s ORDER BY m, s"):
        if m not in monthly:
            monthly[m] = _Ranking()
            monthly[m].totals(*totals[m])
        monthly[m].add(int(p), int(n))
    return {
        "overall": overall.result(),
        "by_month": [{"month": m, **monthly[m].result()} for m in sorted(monthly)],
    }


def _deciles(con: Any, edges: list[float], *, positives: int) -> list[dict[str, Any]]:
    """The lift/gain table, highest scores first, and the calibration points (mean score vs observed rate)."""
    rows = con.execute(
        f"SELECT {_bin_sql(edges)} AS b, count(*), sum(y), avg(s), min(s), max(s) FROM r GROUP BY b ORDER BY b DESC"
    ).fetchall()
    total = sum(int(n) for _, n, *_ in rows)
    base = positives / total if total else 0.0
    out, cum_pos, cum_rows = [], 0, 0
    for rank, (_score, n, p, mean, lo, hi) in enumerate(rows, start=1):
        cum_pos += int(p)
        cum_rows += int(n)
        rate = int(p) / int(n)
        out.append(
            {
                "decile": rank,
                "rows": int(n),
                "positives": int(p),
                "score_min": lo,
                "score_max": hi,
                "mean_score": mean,
                "observed_rate": rate,
                "lift": rate / base if base else None,
                "cumulative_gain": cum_pos / positives if positives else None,
                "cumulative_rows": cum_rows / total,
            }
        )
    return out


# --- report.html ------------------------------------------------------------------------------------------------


# One plain sentence for each figure, as a partner reads it.
EXPLAIN = {
    "rows": N_(
        "Requested: the rows asked for (the partner's customers, or every row of the period); matched: those "
        "found in the history; scored: those the model gave a score; rejected: those the model refused; unmatched: "
        "the partner's customers not found in the history on their date."
    ),
    "auc": N_(
        "AUC: the chance that a randomly chosen customer with the outcome gets a higher score than one without "
        "it; 0.5 is guessing, 1 is a perfect ranking."
    ),
    "ci": N_(
        "95% interval: where the model's true AUC lies with 95% confidence, given how many rows this sample has "
        "(DeLong's method); it narrows as the sample grows, and two models whose intervals overlap widely may not "
        "really differ."
    ),
    "gini": N_("Gini: the same ranking power on a scale from 0 (guessing) to 1 (perfect), 2 x AUC - 1."),
    "ks": N_("KS: the largest gap between the score distributions of customers with and without the outcome."),
    "psi": N_(
        "PSI: how much the score distribution moved from one month to the next; under 0.1 is stable, over 0.25 "
        "a large shift."
    ),
    "lift": N_(
        "Lift: how many times more often the outcome occurs in a decile than on average; cumulative gain: the "
        "share of all outcomes found in the top deciles."
    ),
    "roc": N_(
        "ROC curve: the share of customers with the outcome found (true positive rate) against the share of "
        "the others flagged by mistake (false positive rate), over every score threshold."
    ),
    "gain": N_(
        "Gain curve: the share of all outcomes captured when the customers with the highest scores are "
        "contacted first; the diagonal is a random order."
    ),
    "missing": N_(
        "Days marked in red had no history at all: the model scored nobody on them, so they are missing "
        "from the results rather than days without customers."
    ),
    "null": N_("Null rate: the share of rows in which a model input had no value; the model scored them as it does."),
}


def render_html(report: dict[str, Any], *, title: str) -> str:
    """The report as one HTML page: a summary first, then tables, and charts as inline SVG; nothing loaded."""
    return page(title=title, body=render_body(report))


def page(*, title: str, body: str) -> str:
    """A self-contained HTML page: no script, font or image loaded from anywhere."""
    return (
        f"<!doctype html><html lang='{current_language()}'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; "
        'img-src data:">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"{body}</body></html>"
    )


def render_body(report: dict[str, Any], *, null_rates: bool = True) -> str:
    """One model's figures: a summary card, the rows, quality, deciles, distribution, stability, null rates (those
    of the inputs, once for every model of a comparison: render_null_rates)."""
    rows = report["rows"]
    quality = report.get("quality")
    parts = [_summary_card(report), heading(2, _("Rows")), _explain("rows")]
    parts.append(table(["", _("rows")], [[_row_label(k), _n(v)] for k, v in rows.items()]))
    if quality:
        o = quality["overall"]
        parts += [
            heading(2, _("Quality against {column}").format(column=report["outcome_column"])),
            _explain("auc"),
            _explain("ci"),
            _explain("gini"),
            _explain("ks"),
            table(
                ["", _("rows"), _("positives"), "AUC", _("AUC 95% interval"), "Gini", _("Gini 95% interval"), "KS"],
                [_quality_row(_("overall"), o)] + [_quality_row(m["month"], m) for m in quality["by_month"]],
            ),
        ]
        if o.get("roc"):
            parts += [heading(3, _("ROC curve")), _explain("roc"), _svg_roc(o["roc"], auc=o["auc"])]
            parts += [heading(3, _("Cumulative gain")), _explain("gain"), _svg_gain(o["gain"])]
        parts += [
            heading(3, _("Deciles (highest scores first): lift and gain")),
            _explain("lift"),
            table(
                [
                    _("decile"),
                    _("rows"),
                    _("positives"),
                    _("score range"),
                    _("observed rate"),
                    _("lift"),
                    _("cumulative gain"),
                ],
                [
                    [
                        d["decile"],
                        _n(d["rows"]),
                        _n(d["positives"]),
                        _("{low} to {high}").format(low=f4(d["score_min"]), high=f4(d["score_max"])),
                        pct(d["observed_rate"]),
                        f4(d["lift"]),
                        pct(d["cumulative_gain"]),
                    ]
                    for d in quality["deciles"]
                ],
            ),
            heading(3, _("Calibration")),
            _svg_calibration(quality["deciles"]),
        ]
    if report.get("score"):
        score = report["score"]
        parts += [
            heading(2, _("Score distribution ({column})").format(column=report["score_column"])),
            _svg_histogram(score["histogram"]),
            table([_("decile"), _("score")], [[f"{10 * (i + 1)}%", f4(x)] for i, x in enumerate(score["deciles"])]),
            heading(2, _("Rows per day")),
            _explain("missing") if report.get("days_without_history") else "",
            _svg_days(report["rows_per_day"], missing=report.get("days_without_history") or []),
            heading(2, _("Score stability between months (PSI)")),
            _explain("psi"),
            table([_("from"), _("to"), "PSI"], [[p["from"], p["to"], f4(p["psi"])] for p in report["psi"]])
            if report["psi"]
            else "<p>" + html.escape(_("One month only.")) + "</p>",
        ]
    if null_rates:
        parts.append(render_null_rates(report))
    return "\n".join(parts)


def render_null_rates(report: dict[str, Any]) -> str:
    """The share of rows each model input had no value in."""
    rates = [[k, pct(v)] for k, v in report["null_rate"].items()]
    return "\n".join(
        [heading(2, _("Null rate of each model input")), _explain("null"), table([_("input"), _("null rate")], rates)]
    )


def _summary_card(report: dict[str, Any]) -> str:
    """What a reader needs first: how many rows were scored, and how well the score ranks them."""
    rows = report["rows"]
    items = [(_("Rows scored"), _n(rows.get("scored"))), (_("Rows refused by the model"), _n(rows.get("rejected")))]
    if rows.get("unmatched") is not None:
        items.append((_("Customers not found in the history"), _n(rows["unmatched"])))
    missing = report.get("days_without_history")
    if missing:
        items.append((_("Days without history (not in the results)"), _days_text(missing)))
    quality = report.get("quality")
    o = quality["overall"] if quality else None
    if o and o.get("auc") is not None:
        items.append((_("AUC (95% interval)"), f"{f3(o['auc'])} ({interval(o.get('auc_ci95'))})"))
        items.append((_("Gini (95% interval)"), f"{f3(o['gini'])} ({interval(o.get('gini_ci95'))})"))
        with_outcome = _("{rows}, of them {positives} positive").format(
            rows=_n(o["rows"]), positives=_n(o["positives"])
        )
        items.append((_("Rows with an outcome"), with_outcome))
    elif report.get("outcome_column") is None:
        items.append((_("Quality"), _("no outcomes were given, so the report shows the score only")))
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items)
    title = heading(2, _("Summary"))
    return f"<section class='card' id='summary'>{title}<dl>{dl}</dl></section>"


def _quality_row(label: str, q: dict[str, Any]) -> list[Any]:
    return [
        label,
        _n(q["rows"]),
        _n(q["positives"]),
        f4(q["auc"]),
        interval(q.get("auc_ci95")),
        f4(q["gini"]),
        interval(q.get("gini_ci95")),
        f4(q["ks"]),
    ]


def heading(level: int, text: str) -> str:
    return f"<h{level}>{html.escape(text)}</h{level}>"


def _explain(key: str) -> str:
    return f"<p class='explain'>{html.escape(_(EXPLAIN[key]))}</p>"


def _row_label(key: str) -> str:
    """The row counts' names: requested, matched, scored, rejected, unmatched."""
    names = {
        "requested": _("requested"),
        "matched": _("matched"),
        "scored": _("scored"),
        "rejected": _("rejected"),
        "unmatched": _("unmatched"),
    }
    return names.get(key, key)


def interval(ci: list[float] | None) -> str:
    return "-" if not ci else _("{low} to {high}").format(low=f3(ci[0]), high=f3(ci[1]))


def f3(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:960px;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:right}th{background:#f4f4f4}td:first-child{text-align:left}svg{max-width:100%;height:auto}"
    ".card{border:1px solid #ccc;border-radius:6px;padding:.5em 1em;margin:1em 0}.card h2{margin-top:.3em}"
    ".card dl{display:grid;grid-template-columns:max-content 1fr;gap:.3em 1.5em}.card dt{font-weight:600}"
    ".card dd{margin:0}.explain{color:#555;max-width:48em}"
)


def _n(v: Any) -> str:
    return "-" if v is None else f"{int(v):,}"


def f4(v: Any) -> str:
    return "-" if v is None else f"{float(v):.4f}"


def pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.2f}%"


def table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def svg(fig: Any) -> str:
    """A matplotlib figure as inline SVG (text drawn as paths: no font is needed to show it)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def figure(*, square: bool = False) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(4.2, 4.2) if square else (7, 2.8), dpi=96)


def _svg_histogram(hist: dict[str, Any]) -> str:
    fig = figure()
    ax = fig.subplots()
    edges = hist["edges"]
    ax.bar(edges[:-1], hist["counts"], width=[b - a for a, b in itertools.pairwise(edges)], align="edge")
    ax.set_xlabel(_("score"))
    ax.set_ylabel(_("rows"))
    return svg(fig)


def _svg_days(days: list[dict[str, Any]], *, missing: list[str]) -> str:
    """Rows of each day of the period, days without history as red zeros in their place."""
    rows = {date.fromisoformat(str(d["day"])[:10]): d["rows"] for d in days}
    rows.update({date.fromisoformat(d): 0 for d in missing})
    order = sorted(rows)
    fig = figure()
    ax = fig.subplots()
    ax.plot(order, [rows[d] for d in order], marker=".")
    gaps = [date.fromisoformat(d) for d in missing]
    if gaps:
        ax.scatter(gaps, [0] * len(gaps), color="#c62828", marker="x", zorder=3, label=_("no history"))
        ax.legend(loc="upper right")
    ax.set_ylabel(_("rows"))
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    return svg(fig)


def _days_text(days: list[str]) -> str:
    return f"{len(days)}: {days_text([date.fromisoformat(d) for d in days])}"


def _svg_calibration(deciles: list[dict[str, Any]]) -> str:
    fig = figure()
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label=_("perfect"))
    ax.plot([d["mean_score"] for d in deciles], [d["observed_rate"] for d in deciles], marker="o", label=_("deciles"))
    ax.set_xlabel(_("mean score"))
    ax.set_ylabel(_("observed rate"))
    ax.legend()
    return svg(fig)


def _svg_roc(roc: dict[str, list[float]], *, auc: float) -> str:
    fig = figure(square=True)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label=_("guessing"))
    ax.plot(roc["fpr"], roc["tpr"], label=_("model (AUC {auc})").format(auc=f"{auc:.3f}"))
    ax.set_xlabel(_("false positive rate"))
    ax.set_ylabel(_("true positive rate"))
    ax.legend(loc="lower right")
    return svg(fig)


def _svg_gain(gain: dict[str, list[float]]) -> str:
    fig = figure(square=True)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label=_("random order"))
    ax.plot(gain["selected"], gain["captured"], label=_("by score"))
    ax.set_xlabel(_("share of customers, highest scores first"))
    ax.set_ylabel(_("share of outcomes captured"))
    ax.legend(loc="lower right")
    return svg(fig)
