"""Publishing a job: its committed parts merged into the result files, a manifest, the row counts reconciled, and
the files recorded on the job together with its success (the last stage, worker/pipeline.py)."""

from __future__ import annotations

import contextlib
import gzip
import html
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from app.clock import utcnow
from app.core.model_types import ModelVersionInfo
from app.core.records import EnvironmentRecord
from app.errors import ReconciliationFailed
from app.i18n import _, use_language
from app.integrations.history.port import HistoryQuery
from app.integrations.storage.results import (
    INTERNAL_MANIFEST,
    STAFF_ONLY_KIND,
    STAFF_ONLY_KINDS,
    ResultStore,
    SafeCsvWriter,
    csv_header,
)
from app.retro_tests.runs import ChunkRecord, ModelTally, ResultFileRecord, Tally
from worker import compare, report
from worker.chunks import stats_path

if TYPE_CHECKING:
    from worker.run import JobModel, JobRun


def publish(run: JobRun, *, models: list[JobModel], query: HistoryQuery) -> None:
    """Merge the parts into the result files, write the manifest, reconcile, and record the files."""
    store, prefix = run.adapters.store, run.spec.prefix
    chunks, tally = run.to_publish()
    counts = tally.counts
    if tally.rows_total is not None and counts.read != tally.rows_total:
        raise ReconciliationFailed(
            f"read {counts.read} rows but the source counted {tally.rows_total} for the period; the source changed "
            "while the job ran, or rows were lost"
        )
    if counts.scored + counts.rejected != counts.read:
        raise ReconciliationFailed(f"read {counts.read} rows but scored {counts.scored} and rejected {counts.rejected}")
    run.control.check()
    left_out = {m.position for m in tally.models if m.error is not None}
    models = [m for m in models if m.position not in left_out]  # left out while scoring: past its reject budget
    unmatched = _write_unmatched(run, query) if query.population is not None else None
    # The report reads the parts, not the merged files: it is built while they are merged (the merge is Arrow's
    # work, mostly outside the GIL; at 1M rows each takes ~0.2-0.3 s).
    with ThreadPoolExecutor(1, thread_name_prefix="report") as background:
        reported = background.submit(
            _write_report, run, models=models, query=query, chunks=chunks, tally=tally, unmatched=unmatched
        )
        # A compared model left out part way (allow_partial) has no column in the result files.
        dropped = tuple(m.column_prefix for m in tally.models if m.error is not None)
        parts = [c.part_path for c in chunks if c.part_path]
        files = [*_merge_scores(run, parts, scored=counts.scored, dropped=dropped)]
        reject_parts = [c.rejects_path for c in chunks if c.rejects_path]
        if reject_parts:
            rows = _merge(store, reject_parts, {"csv.gz": f"{prefix}/rejects.csv.gz"})["csv.gz"]
            files.append(_described(store, prefix, name="rejects.csv.gz", kind="rejects", fmt="csv.gz", rows=rows))
        if unmatched is not None:
            files.append(
                _described(store, prefix, name="unmatched.csv.gz", kind="unmatched", fmt="csv.gz", rows=unmatched)
            )
        files += reported.result()
    if query.population is not None and query.population.staging_table:
        run.adapters.source.drop_staging(query.population.staging_table)  # read for the last time: gone first
    if tally.environment and tally.environment.packages:
        files.append(_write_lock(store, prefix, tally.environment))
    for m in tally.models:  # a comparing job: each model's own environment
        if m.environment and m.environment.packages and m.error is None:
            files.append(
                _write_lock(store, prefix, m.environment, name=f"requirements.{m.column_prefix.rstrip('_')}.lock")
            )
    # The full manifest is for staff (the API); partners' links serve the one without internal details.
    manifest = _manifest(run, model=models[0].model, query=query, tally=tally, files=files)
    with store.open_write(f"{prefix}/{INTERNAL_MANIFEST}") as fh:
        fh.write(json.dumps(manifest, indent=2).encode())
    with store.open_write(f"{prefix}/manifest.json") as fh:
        fh.write(json.dumps(partner_manifest(manifest), indent=2).encode())
    files.append(_described(store, prefix, name=INTERNAL_MANIFEST, kind=STAFF_ONLY_KIND, fmt="json", rows=None))
    files.append(_described(store, prefix, name="manifest.json", kind="manifest", fmt="json", rows=None))
    # The files and the verdict in one transaction, and only then the parts go: a worker killed at any point
    # leaves either a succeeded job with its files, or the parts a next attempt publishes from again.
    run.succeed(files=files, location=store.location(prefix))
    store.remove_tree(f"{prefix}/parts")


def _merge_scores(run: JobRun, parts: list[str], *, scored: int, dropped: tuple[str, ...]) -> list[ResultFileRecord]:
    """scores.<format> for each of the job's formats, each checked to hold every scored row; without the columns
    that start with a `dropped` prefix.

    A job of one chunk has its scores.parquet already: its part, written in the result file's encoding
    (worker/chunks.py _PartWriter), is copied as it is.
    """
    store, prefix = run.adapters.store, run.spec.prefix
    targets = {fmt: f"{prefix}/scores.{fmt}" for fmt in run.spec.output_formats}
    copied: dict[str, int] = {}
    if len(parts) == 1 and "parquet" in targets and not dropped:
        target = targets.pop("parquet")
        store.copy(parts[0], target)
        with store.open_read(target) as fh:
            copied["parquet"] = pq.ParquetFile(fh).metadata.num_rows
    written = {**copied, **_merge(store, parts, targets, dropped=dropped)}
    files = []
    for fmt in run.spec.output_formats:
        rows = written[fmt]
        if rows != scored:
            raise ReconciliationFailed(f"wrote {rows} rows to scores.{fmt} but scored {scored}")
        files.append(_described(store, prefix, name=f"scores.{fmt}", kind="scores", fmt=fmt, rows=rows))
    return files


def _described(
    store: ResultStore, prefix: str, *, name: str, kind: str, fmt: str, rows: int | None
) -> ResultFileRecord:
    rel = f"{prefix}/{name}"
    return ResultFileRecord(
        name=name, kind=kind, format=fmt, rows=rows, bytes=store.size(rel), sha256=store.sha256(rel)
    )


def partner_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a partner may read of the manifest: the model by name and version, the period, the ids, rows, files.

    Not the run id, artifact URI, requester, source table, query, environment or timings: they describe our
    systems, not the partner's results.
    """
    public = {
        "retro_test": {"id": manifest["retro_test"]["id"], "created_at": manifest["retro_test"]["created_at"]},
        "model": {"name": manifest["model"]["name"], "version": manifest["model"]["version"]},
        "id_columns": manifest["source"]["id_columns"],
        "period": manifest["period"],
        "rows": manifest["rows"],
        "files": [f for f in manifest["files"] if f["kind"] not in STAFF_ONLY_KINDS],
        "published_at": manifest["published_at"],
    }
    if "models" in manifest:
        keep = ("name", "version", "columns", "outputs", "rows", "left_out")
        public["models"] = [{k: m[k] for k in keep} for m in manifest["models"]]
    return public


def _period(query: HistoryQuery, days_without_history: list[str] | None) -> dict[str, Any]:
    """The period asked for, and the days of it the results cover: those with history (null where unknown)."""
    days = (query.end - query.start).days + 1
    return {
        "start": query.start.isoformat(),
        "end": query.end.isoformat(),
        "days": days,
        "days_covered": days - len(days_without_history) if days_without_history is not None else None,
        "days_without_history": days_without_history,
    }


def _manifest(
    run: JobRun, *, model: ModelVersionInfo, query: HistoryQuery, tally: Tally, files: list[ResultFileRecord]
) -> dict[str, Any]:
    spec, counts = run.spec, tally.counts
    return {
        "retro_test": {
            "id": str(spec.id),
            "partner_id": str(spec.partner_id),
            "requested_by": spec.requested_by,
            "created_at": spec.created_at.isoformat(),
            "stage_started": tally.stage_started,
        },
        "model": {
            "name": model.name,
            "version": model.version,
            "run_id": model.run_id,
            "source": model.source,
            "artifact_uri": model.artifact_uri,
            "inputs": [{"name": f.name, "type": f.type} for f in model.inputs],
        },
        "source": {
            "table": query.table,
            "date_column": query.date_column,
            "id_columns": list(query.id_columns),
            "query": run.adapters.source.describe(query),
            "parameters": {"start": query.start.isoformat(), "end": query.end.isoformat()},
        },
        "period": _period(query, tally.days_without_history),
        "population": spec.population.public() if spec.population else None,
        # "warm": scored on a deployment an earlier job had started and validated again; "new": started for it.
        "scoring": {
            "protocol": tally.score_protocol,
            "deployment": None if tally.deployment_warm is None else "warm" if tally.deployment_warm else "new",
        },
        # What the model server ran from (null: the worker's own packages) and the check before scoring.
        "environment": tally.environment.public() if tally.environment else None,
        "validation": tally.validation.public() if tally.validation else None,
        "rows": {"total": tally.rows_total, "read": counts.read, "scored": counts.scored, "rejected": counts.rejected},
        **({"models": [_model_entry(m) for m in tally.models]} if tally.models else {}),
        "files": [
            {"name": f.name, "kind": f.kind, "format": f.format, "rows": f.rows, "bytes": f.bytes, "sha256": f.sha256}
            for f in files
        ],
        "published_at": utcnow().isoformat(),
    }


def _model_entry(m: ModelTally) -> dict[str, Any]:
    """One compared model in the manifest: which version, where its columns are, its rows, its server."""
    info = m.model_info
    return {
        "name": info.name,
        "version": info.version,
        "run_id": info.run_id,
        "artifact_uri": info.artifact_uri,
        "columns": m.column_prefix,  # its outputs are <columns><output> in the results
        "outputs": [m.column_prefix + o for o in info.outputs],
        "rows": {"scored": m.rows_scored, "rejected": m.rows_rejected},
        "left_out": {"error": m.error[0], "detail": m.error[1]} if m.error else None,
        "protocol": m.score_protocol,
        "environment": m.environment.public() if m.environment else None,
        "validation": m.validation.public() if m.validation else None,
    }


def _write_unmatched(run: JobRun, query: HistoryQuery) -> int:
    """The population's rows with no snapshot to score, each with its reason; returns how many."""
    rows = 0
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(run.adapters.store.open_write(f"{run.spec.prefix}/unmatched.csv.gz"))
        gz = stack.enter_context(gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, compresslevel=6))
        writer: SafeCsvWriter | None = None
        for batch in run.adapters.source.unmatched(query, batch_rows=run.settings.read_batch_rows):
            if writer is None:
                writer = stack.enter_context(SafeCsvWriter(gz, batch.schema))
            writer.write_batch(batch)
            rows += batch.num_rows
        if writer is None:  # none unmatched: the file still says which columns it would have
            pop = query.population
            assert pop is not None
            names = [
                *query.id_columns,
                pop.as_of_column,
                *([pop.outcome_column] if pop.outcome_column else []),
                "reason",
            ]
            gz.write(csv_header(names))
    return rows


def _write_report(
    run: JobRun,
    *,
    models: list[JobModel],
    query: HistoryQuery,
    chunks: list[ChunkRecord],
    tally: Tally,
    unmatched: int | None,
) -> list[ResultFileRecord]:
    """report.json and report.html, from the committed parts and each chunk's input statistics: one model's
    figures, or each compared model's and their comparison (worker/compare.py)."""
    store, prefix, counts = run.adapters.store, run.spec.prefix, tally.counts
    parts = [c.part_path for c in chunks if c.part_path]
    stems = [_stem(c) for c in chunks]
    population = run.spec.population
    inputs = report.ReportInputs(
        store=store,
        parts=parts,
        stats=[stats_path(stem) for stem in stems if stem],
        query=query,
        score_column="",
        rows={
            "requested": population.rows if population is not None else counts.read,
            "matched": counts.read,
            "scored": counts.scored,
            "rejected": counts.rejected,
            "unmatched": unmatched,
        },
        days_without_history=tally.days_without_history,
        memory_limit=run.settings.report_memory_limit,
        spill_dir=run.settings.resolved_spill_dir(),
    )
    language = run.spec.report_language or run.settings.default_language
    partner = run.spec.partner_name
    if not run.spec.models:
        model = models[0].model
        figures = report.build(replace(inputs, score_column=_score_column(store, parts, query, model)))
        with use_language(language):
            title = _("{model} version {version} on {partner}'s customers, {start} to {end}").format(
                model=model.name,
                version=model.version,
                partner=partner or _("the partner"),
                start=query.start,
                end=query.end,
            )
            page = report.render_html(figures, title=title)
    else:
        figures, page = _comparison_report(inputs, models=models, tally=tally, language=language, partner=partner)
    with store.open_write(f"{prefix}/report.json") as fh:
        fh.write(json.dumps(figures, indent=2, default=str).encode())
    with store.open_write(f"{prefix}/report.html") as fh:
        fh.write(page.encode())
    return [
        _described(store, prefix, name="report.html", kind="report", fmt="html", rows=None),
        _described(store, prefix, name="report.json", kind="report", fmt="json", rows=None),
    ]


def _stem(chunk: ChunkRecord) -> str | None:
    if chunk.part_path:
        return chunk.part_path.removesuffix(".parquet")
    if chunk.rejects_path:
        return chunk.rejects_path.removesuffix(".rejects.parquet")
    return None


def _comparison_report(
    inputs: report.ReportInputs, *, models: list[JobModel], tally: Tally, language: str, partner: str
) -> tuple[dict[str, Any], str]:
    """A comparing job's report: the comparison first, then each model's own figures; and those left out."""
    by_position = {m.position: m for m in tally.models}
    columns = [_score_column(inputs.store, inputs.parts, inputs.query, m.model, prefix=m.column_prefix) for m in models]
    per_model = []
    for each, column in zip(models, columns, strict=True):
        assert each.position is not None
        counted = by_position[each.position]
        rows = inputs.rows | {"scored": counted.rows_scored, "rejected": counted.rows_rejected}
        figures = report.build(replace(inputs, score_column=column, rows=rows, only_scored=True))
        per_model.append({"model": each.short, "name": each.model.name, "version": each.model.version} | figures)
    comparison = compare.build_from_parts(inputs, columns=columns, labels=[m.short for m in models])
    left_out = [
        {"model": f"{m.model_info.name} v{m.model_info.version}", "error": m.error[0], "detail": m.error[1]}
        for m in tally.models
        if m.error
    ]
    content = {"comparison": comparison, "models": per_model, "left_out": left_out}
    with use_language(language):
        title = _("{count} models compared on {partner}'s customers, {start} to {end}").format(
            count=len(models), partner=partner or _("the partner"), start=inputs.query.start, end=inputs.query.end
        )
        body = [compare.render_html(comparison)]
        for m in left_out:
            body.append(
                "<p class='explain'>"
                + html.escape(_("{model} was left out: {detail}").format(model=m["model"], detail=m["detail"]))
                + "</p>"
            )
        for figures in per_model:
            own = report.render_body(figures, null_rates=False)
            body += [f"<section>{report.heading(2, figures['model'])}", own, "</section>"]
        body.append(report.render_null_rates(per_model[0]))  # the inputs all models read: one table
        page = report.page(title=title, body="\n".join(body))
    return content, page


def _score_column(
    store: ResultStore, parts: list[str], query: HistoryQuery, model: ModelVersionInfo, *, prefix: str = ""
) -> str:
    """The model's score in the results: its last output; for a model without declared outputs, the last column
    of its own that the results hold."""
    if model.outputs:
        return prefix + model.outputs[-1]
    if not parts:
        return prefix + "score"
    with store.open_read(parts[0]) as fh:
        names = pq.read_schema(fh).names
    own = [n for n in names if n not in query.carried and n.startswith(prefix)]
    return str(own[-1]) if own else prefix + "score"


def _write_lock(
    store: ResultStore, prefix: str, environment: EnvironmentRecord, *, name: str = "requirements.lock"
) -> ResultFileRecord:
    """The model server's packages, pinned, kept with the results: `uv pip sync` rebuilds the environment."""
    lines = [f"# Python {environment.python}, as the model server of this retro test ran"]
    lines += [f"{name}=={version}" for name, version in sorted((environment.packages or {}).items())]
    with store.open_write(f"{prefix}/{name}") as fh:
        fh.write(("\n".join(lines) + "\n").encode())
    return _described(store, prefix, name=name, kind="environment", fmt="txt", rows=None)


def _merge(
    store: ResultStore, parts: list[str], targets: dict[str, str], *, dropped: tuple[str, ...] = ()
) -> dict[str, int]:
    """Stream Parquet parts, in order, into one file per format (without the columns that start with a `dropped`
    prefix); returns rows written per format."""
    rows = dict.fromkeys(targets, 0)
    if not parts or not targets:
        return rows
    with store.open_read(parts[0]) as first:
        schema = pq.read_schema(first)
    if dropped:
        schema = pa.schema([f for f in schema if not f.name.startswith(dropped)])
    with contextlib.ExitStack() as stack:
        writers: dict[str, Any] = {}
        for fmt, rel in targets.items():
            fh: IO[bytes] = stack.enter_context(store.open_write(rel))
            if fmt == "parquet":
                writers[fmt] = stack.enter_context(pq.ParquetWriter(fh, schema, compression="zstd"))
            else:
                gz = stack.enter_context(gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, compresslevel=6))
                writers[fmt] = stack.enter_context(SafeCsvWriter(gz, schema))
        for rel in parts:
            with store.open_read(rel) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=65_536, columns=schema.names):
                    for fmt, writer in writers.items():
                        writer.write_batch(batch)
                        rows[fmt] += batch.num_rows
    return rows
