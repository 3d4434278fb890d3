"""A job's period scored as one stream of chunks, each committed together with its part files (the checkpoint).

A chunk is consecutive days of the period holding about RETRO_CHUNK_ROWS rows, planned from the rows of each day
(plan_chunks), and read with one query. Its rows are read, scored and written to part files of its own; a row in
retro_test_chunks then records it as finished, in the same transaction as the job's totals. Whatever runs next
(a redelivered attempt, a partition helper, the coordinator taking over a helper's range) uses the plan the
first attempt recorded, skips committed chunks, and the first commit of a chunk wins: a second copy is thrown
away, never merged.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from app.config import Settings
from app.core.periods import days_text, missing_days
from app.core.records import ChunkPlanRecord
from app.errors import NoHistoryInPeriod, ReconciliationFailed, TooManyRejectedRows
from app.integrations.history.port import HistoryQuery, HistorySource
from app.integrations.history.prefetch import prefetched
from app.integrations.scoring.scorers import ScoredBatch, Scorer, ScoringStopped
from app.integrations.storage.results import ResultStore
from app.retro_tests.runs import ChunkRecord, Counts, Tally
from worker.run import JobRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    key: str  # the ISO date of its first day: chunk keys sort like the period
    start: date
    end: date
    rows: int | None = None  # as the plan counted them; None when planned by days


@dataclass
class ChunkCounts:
    """Rows counted as they go by (a chunk being written, or what one stream committed)."""

    read: int = 0
    scored: int = 0
    rejected: int = 0

    def add(self, other: ChunkCounts | Counts) -> None:
        self.read += other.read
        self.scored += other.scored
        self.rejected += other.rejected

    def frozen(self) -> Counts:
        return Counts(read=self.read, scored=self.scored, rejected=self.rejected)


def plan_chunks(run: JobRun, query: HistoryQuery) -> list[Chunk]:
    """The job's chunks: as its first attempt recorded them, else planned now and recorded.

    Planned by rows from the rows of each day of the period (the GROUP BY the extracting stage's count just
    sent, HistorySource.rows_by_day). A source that does not count rows, and a job that committed chunks before
    plans were recorded (they were RETRO_CHUNK_DAYS days each), are cut by days. Resumed attempts and helpers
    read the recorded plan rather than planning again, so every copy of a chunk covers the same days even if the
    source changed in between (publishing's reconciliation then fails the job). An attempt that has just made
    the plan opens its first chunk's query at once, for its reader to take once the model server is up.
    """
    if run.spec.chunk_plan is not None:
        return chunks_of(run.spec.chunk_plan)
    resumed = bool(run.committed_keys())
    by_day = None if resumed else run.adapters.source.rows_by_day(query)
    if by_day is not None and query.population is None:
        check_coverage(run, query, by_day)
    if by_day is None:
        chunks = plan_days(query.start, query.end, run.settings.chunk_days)
    else:
        chunks = plan_rows(query.start, query.end, by_day, rows=run.settings.chunk_rows)
    kept = chunks_of(run.keep_chunk_plan(plan_record(chunks)))
    if not resumed and kept == chunks:
        # The first chunk's query runs while the model environment is prepared and the server starts: on a
        # production Hive its seconds of planning and start-up pass there instead of before the first score.
        _EARLY.open(run, query.between(chunks[0].start, chunks[0].end))
    return kept


def check_coverage(run: JobRun, query: HistoryQuery, by_day: Mapping[date, int]) -> None:
    """Record the days of the period the count found no row for; refuse them if the request requires the full
    period. The API names them at submission where partitions tell (the local source); on Hive this is where they
    are first known."""
    missing = missing_days(start=query.start, end=query.end, days_with_history=(d for d, n in by_day.items() if n))
    run.record_days_without_history(missing)
    if missing and run.spec.require_full_period:
        raise NoHistoryInPeriod(
            f"history table {query.table} has no rows on {len(missing)} of the {(query.end - query.start).days + 1} "
            f"days of the period ({days_text(missing)}); the request requires the full period",
            field="period_start",
        )


def plan_rows(start: date, end: date, by_day: Mapping[date, int], *, rows: int) -> list[Chunk]:
    """Consecutive days of [start, end] merged into chunks of about `rows` rows; a day is never split.

    A chunk ends on the first day at which the period's running total reaches the next multiple of `rows`, so a
    period of N rows has at most ceil(N / rows) chunks (each but the last ends past another multiple), and a day
    larger than `rows` ends its chunk alone. Days without rows join a neighbour: the chunks cover the period
    without gaps, so a row that appears later is still read (and reconciliation notices it).
    """
    with_rows = [d for d, n in by_day.items() if n > 0 and start <= d <= end]
    last = max(with_rows, default=end)
    chunks: list[Chunk] = []
    first, total, at_first, mark = start, 0, 0, rows
    day = start
    while day <= end:
        total += by_day.get(day, 0)
        if day >= last or total >= mark:
            close = end if day >= last else day
            chunks.append(Chunk(key=first.isoformat(), start=first, end=close, rows=total - at_first))
            if close == end:
                break
            first, at_first, mark = day + timedelta(days=1), total, (total // rows + 1) * rows
        day += timedelta(days=1)
    return chunks


def plan_days(start: date, end: date, days: int) -> list[Chunk]:
    """Consecutive, non-overlapping slices of [start, end] of at most `days` days each."""
    chunks = []
    day = start
    while day <= end:
        last = min(end, day + timedelta(days=days - 1))
        chunks.append(Chunk(key=day.isoformat(), start=day, end=last))
        day = last + timedelta(days=1)
    return chunks


def plan_record(chunks: list[Chunk]) -> ChunkPlanRecord:
    """A plan as the job's row keeps it."""
    return ChunkPlanRecord(chunks=[(c.start, c.end, c.rows) for c in chunks])


def chunks_of(record: ChunkPlanRecord) -> list[Chunk]:
    """The chunks of a recorded plan."""
    return [Chunk(key=start.isoformat(), start=start, end=end, rows=rows) for start, end, rows in record.chunks]


def score_chunks(
    run: JobRun,
    *,
    query: HistoryQuery,
    chunks: list[Chunk],
    scorer: Scorer,
    live_progress: bool = True,
    tally: ChunkCounts | None = None,
) -> None:
    """Score the given chunks, in the given order, skipping any already committed; commit each as it ends.

    `tally`, when given, adds up the rows of the chunks this stream committed itself, even if it stops early.

    Reading (a background thread), scoring (`score_concurrency` requests in flight) and writing (this thread,
    in source order) overlap, and the stream does not drain at chunk boundaries. Up to `score_window_batches`
    batches are handed to the scoring threads ahead of the one being written, so one slow answer (a hang
    given up and retried, a batch cut up around a poison row) does not stop the others. With live_progress the job's
    counters move with every batch; without (several workers share the job) they move with each commit.
    """
    settings, control, store = run.settings, run.control, run.adapters.store
    done, committed = run.committed()
    base = ChunkCounts()
    base.add(committed)
    pending = [c for c in chunks if c.key not in done]
    tag = uuid.uuid4().hex[:8]  # this stream's part files never collide with another's for the same chunk
    own = tally if tally is not None else ChunkCounts()
    window: deque[tuple[Chunk, Future[ScoredBatch] | _ChunkEnd]] = deque()
    current: _ChunkOutput | None = None

    def handle(chunk: Chunk, item: Future[ScoredBatch] | _ChunkEnd) -> None:
        nonlocal current
        if current is None:
            current = _ChunkOutput(store, f"{run.spec.prefix}/parts/{chunk.key}.{tag}", query)
        if isinstance(item, _ChunkEnd):
            output, current = current, None
            counts = output.close(read=item.read)
            if commit_chunk(run, chunk=chunk, output=output):
                base.add(counts)
                own.add(counts)
            else:
                log.info(
                    "chunk %s of retro test %s was committed by another worker first; dropping this copy",
                    chunk.key,
                    run.job_id,
                )
                output.remove()
            return
        try:
            result = item.result()
        except ScoringStopped:
            control.check()  # raises why: cancelled, lease lost or deadline passed
            raise
        current.write(result)
        if not live_progress:
            control.check()
            return
        control.progress(base.frozen() + current.counts.frozen())

    def in_flight() -> int:
        return sum(1 for _, item in window if not isinstance(item, _ChunkEnd))

    def is_committed(chunk: Chunk) -> bool:
        return chunk.key in run.committed_keys()

    stream = _read_ahead(run, query, pending, skip=is_committed)
    with (
        ThreadPoolExecutor(max_workers=settings.score_concurrency, thread_name_prefix="score") as pool,
        stream as items,
    ):
        try:
            for chunk, item in items:
                if not isinstance(item, _ChunkEnd):  # the scoring thread logs with this job's id
                    item = pool.submit(contextvars.copy_context().run, scorer.score, item)
                window.append((chunk, item))
                while in_flight() >= settings.score_window_batches:
                    handle(*window.popleft())
            while window:
                handle(*window.popleft())
        finally:
            for _, item in window:
                if isinstance(item, Future):
                    item.cancel()
            if current is not None:
                current.abort()


@dataclass(frozen=True)
class _ChunkEnd:
    """Marks the end of a chunk in the stream, with how many rows the source gave for it."""

    read: int


def _read_ahead(
    run: JobRun, query: HistoryQuery, chunks: list[Chunk], *, skip: Callable[[Chunk], bool]
) -> contextlib.AbstractContextManager[Iterator[tuple[Chunk, pa.RecordBatch | _ChunkEnd]]]:
    """Slices of score_batch_rows rows, chunk after chunk, read from the job's history source on a background
    thread at most score_window_batches slices ahead.

    Each chunk is one query, and the next chunk's query is opened as soon as the reader starts on a chunk, on a
    thread of its own: a production Hive spends seconds before a query's first row, and that time passes while
    this chunk is read and scored instead of after it. The first chunk's query may have been opened already,
    while the model server started (plan_chunks). A chunk that `skip` says is finished by the time the reader
    reaches it is not read at all.
    """

    source, settings, job_id = run.adapters.source, run.settings, run.job_id

    def produce() -> Iterator[tuple[Chunk, pa.RecordBatch | _ChunkEnd]]:
        todo = deque(chunks)
        ahead: deque[tuple[Chunk, _OpenQuery]] = deque()

        def open_next() -> None:
            while todo and len(ahead) < _QUERIES_AHEAD:
                chunk = todo.popleft()
                if skip(chunk):
                    continue
                between = query.between(chunk.start, chunk.end)
                opened = _EARLY.take(job_id, between) or _OpenQuery(source, between, settings)
                ahead.append((chunk, opened))

        try:
            open_next()
            while ahead:
                chunk, opened = ahead.popleft()
                with opened:
                    open_next()
                    if skip(chunk):  # another worker committed it while its query was opened
                        continue
                    read = 0
                    for batch in opened.batches:
                        read += batch.num_rows
                        for offset in range(0, batch.num_rows, settings.score_batch_rows):
                            yield chunk, batch.slice(offset, settings.score_batch_rows)
                yield chunk, _ChunkEnd(read)
        finally:
            for _, opened in ahead:
                opened.close()

    return prefetched(produce, depth=settings.score_window_batches, name="history-reader")


# Chunk queries open beyond the one being read: one hides a query's latency whenever reading and scoring a chunk
# takes at least as long, which RETRO_CHUNK_ROWS is sized for; more would hold more sessions and buffers.
_QUERIES_AHEAD = 1


class _OpenQuery:
    """A chunk's query, started now on a thread of its own: it runs, and its first rows arrive, until read."""

    def __init__(self, source: HistorySource, query: HistoryQuery, settings: Settings) -> None:
        self._stack = contextlib.ExitStack()
        self.batches: Iterator[pa.RecordBatch] = self._stack.enter_context(
            prefetched(lambda: source.batches(query, batch_rows=settings.read_batch_rows), depth=1, name="chunk-query")
        )

    def close(self) -> None:
        """Stop reading; the query's session is closed once its current call returns."""
        self._stack.close()

    def __enter__(self) -> _OpenQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EarlyQueries:
    """First chunk queries opened while a job's model server starts, each until the job's reader takes it.

    A query that no reader takes (the attempt failed or stopped before scoring) is closed when the attempt's
    JobRun goes away, on a thread of its own, so the attempt does not wait for a query it no longer needs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._opened: dict[tuple[uuid.UUID, HistoryQuery], _OpenQuery] = {}

    def open(self, run: JobRun, query: HistoryQuery) -> None:
        key = (run.job_id, query)
        opened = _OpenQuery(run.adapters.source, query, run.settings)
        with self._lock:
            replaced = self._opened.pop(key, None)
            self._opened[key] = opened
        if replaced is not None:
            _close_soon(replaced)
        weakref.finalize(run, self._drop, key, opened).atexit = False  # a process that exits closes its sockets

    def take(self, job_id: uuid.UUID, query: HistoryQuery) -> _OpenQuery | None:
        with self._lock:
            return self._opened.pop((job_id, query), None)

    def _drop(self, key: tuple[uuid.UUID, HistoryQuery], opened: _OpenQuery) -> None:
        with self._lock:
            if self._opened.get(key) is not opened:
                return  # taken by the reader, or replaced
            del self._opened[key]
        _close_soon(opened)


def _close_soon(opened: _OpenQuery) -> None:
    threading.Thread(target=opened.close, name="chunk-query-close", daemon=True).start()


_EARLY = _EarlyQueries()


class _ChunkOutput:
    """The part files of the chunk being written (`<stem>.parquet`, `<stem>.rejects.parquet`) and its counts."""

    def __init__(self, store: ResultStore, stem: str, query: HistoryQuery) -> None:
        self._store = store
        self._query = query
        self.part_path = f"{stem}.parquet"
        self.rejects_path = f"{stem}.rejects.parquet"
        self.stats_path = stats_path(stem)
        self._parts = _PartWriter(store, self.part_path)
        self._rejects = _PartWriter(store, self.rejects_path)
        self.counts = ChunkCounts()
        self.model_counts: list[list[int]] | None = None  # a comparing job's [scored, rejected] per model
        self.has_rejects = False
        self.nulls = dict.fromkeys((f.name for f in query.features), 0)

    def write(self, result: ScoredBatch) -> None:
        for rows in (result.scored_rows, result.not_scored):
            for name in self.nulls:
                self.nulls[name] += rows.column(name).null_count
        if result.scored_rows.num_rows:
            self._parts.write(_output_table(result.scored_rows, self._query, result.scores))
        if result.rejected_rows.num_rows:
            reasons = {"reason": pa.array(result.reject_reasons, pa.string())}
            if result.reject_models is not None:
                reasons = {"model": pa.array(result.reject_models, pa.string())} | reasons
            self._rejects.write(_output_table(result.rejected_rows, self._query, pa.table(reasons)))
        self.counts.scored += result.scored_rows.num_rows
        self.counts.rejected += result.not_scored.num_rows
        self.has_rejects = self.has_rejects or result.rejected_rows.num_rows > 0
        if result.model_counts is not None:
            if self.model_counts is None:
                self.model_counts = [[0, 0] for _ in result.model_counts]
            for total, (scored, rejected) in zip(self.model_counts, result.model_counts, strict=True):
                total[0] += scored
                total[1] += rejected

    def close(self, *, read: int) -> ChunkCounts:
        """Finish both files; every row the source gave must be scored or rejected."""
        self._parts.__exit__(None, None, None)
        self._rejects.__exit__(None, None, None)
        self.counts.read = read
        if self.counts.scored + self.counts.rejected != read:
            raise ReconciliationFailed(
                f"the source gave {read} rows for a chunk but {self.counts.scored + self.counts.rejected} were accounted for"
            )
        # The report's null rates are added up from these, one per committed chunk: no second pass over the inputs.
        with self._store.open_write(self.stats_path) as fh:
            fh.write(json.dumps({"rows": read, "nulls": self.nulls}).encode())
        return self.counts

    def abort(self) -> None:
        """Drop unfinished files; the chunk is read and scored again on the next attempt."""
        error = RuntimeError("chunk aborted")
        self._parts.__exit__(RuntimeError, error, None)
        self._rejects.__exit__(RuntimeError, error, None)

    def remove(self) -> None:
        """Delete finished files that lost the race to another copy of the chunk."""
        self._store.remove(self.part_path)
        self._store.remove(self.rejects_path)
        self._store.remove(self.stats_path)


def commit_chunk(run: JobRun, *, chunk: Chunk, output: _ChunkOutput) -> bool:
    """Record a finished chunk with its part files (the checkpoint); False when another copy was first."""
    counts = output.counts
    record = ChunkRecord(
        key=chunk.key,
        counts=counts.frozen(),
        part_path=output.part_path if counts.scored else None,
        rejects_path=output.rejects_path if output.has_rejects else None,
        model_counts=tuple((a, b) for a, b in output.model_counts) if output.model_counts is not None else None,
    )
    totals = run.commit_chunk(record)
    if totals is None:
        return False
    enforce_reject_budgets(run, totals)
    return True


def enforce_reject_budgets(run: JobRun, totals: Tally) -> None:
    """The job's rejects within budget, and each compared model's own: a model past its budget fails the job, or,
    with allow_partial while another model is left, is left out (publishing drops its columns)."""
    settings = run.settings
    read_total = totals.rows_total or totals.counts.read
    enforce_reject_budget(rejected=totals.counts.rejected, read_total=read_total, settings=settings)
    kept = [m for m in totals.models if m.error is None]
    for model in list(kept):
        label = f"model {model.model_info.name} version {model.model_info.version}"
        try:
            enforce_reject_budget(rejected=model.rows_rejected, read_total=read_total, settings=settings, model=label)
        except TooManyRejectedRows as exc:
            if not run.spec.allow_partial or len(kept) < 2:
                raise
            log.warning("retro test %s: leaving out %s (allow_partial): %s", run.job_id, label, exc.detail)
            run.record_left_out(model.position, code=exc.code, message=exc.detail)
            kept.remove(model)


def enforce_reject_budget(*, rejected: int, read_total: int, settings: Settings, model: str = "the model") -> None:
    """Fail the job once more rows were rejected than RETRO_MAX_REJECTED_ROWS / _RATIO allow."""
    if rejected > max(settings.max_rejected_rows, int(settings.max_rejected_ratio * read_total)):
        raise TooManyRejectedRows(
            f"{rejected} row(s) were refused by {model} (each with its reason in the rejects), more than the "
            f"allowed (RETRO_MAX_REJECTED_ROWS={settings.max_rejected_rows}, RETRO_MAX_REJECTED_RATIO={settings.max_rejected_ratio}); "
            "fix those rows at the source or the model, or raise the budget if scoring the rest is what the partner needs"
        )


# A part's row groups: the size publishing's merge writes (worker/publish.py reads parts in batches of this many).
PART_ROW_GROUP_ROWS = 65_536


class _PartWriter:
    """A Parquet part written through the result store, opened on the first batch.

    Written as the result file is (zstd, row groups of PART_ROW_GROUP_ROWS rows, the scored batches gathered until
    one is full), so that publishing a job of one chunk takes its part as scores.parquet as it is, without reading
    and encoding every row again.
    """

    def __init__(self, store: ResultStore, rel: str) -> None:
        self._stack = contextlib.ExitStack()
        self._store = store
        self._rel = rel
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= PART_ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        group = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        if self._writer is None:
            fh = self._stack.enter_context(self._store.open_write(self._rel))
            self._writer = self._stack.enter_context(pq.ParquetWriter(fh, group.schema, compression="zstd"))
        self._writer.write_table(group, row_group_size=PART_ROW_GROUP_ROWS)

    def __enter__(self) -> _PartWriter:
        return self

    def __exit__(self, *exc: Any) -> Any:
        if exc[0] is None:
            self._flush()
        return self._stack.__exit__(*exc)


def stats_path(stem: str) -> str:
    """A chunk's input statistics (rows, nulls of each model input), next to its part files."""
    return f"{stem}.stats.json"


def _output_table(batch: pa.RecordBatch, query: HistoryQuery, extra: pa.Table) -> pa.Table:
    columns = {k: batch.column(k) for k in query.carried}
    for name in extra.column_names:
        columns[name] = extra.column(name)
    return pa.table(columns)
