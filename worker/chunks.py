"""A job's period scored as one stream of chunks, each committed together with its part files (the checkpoint).

A chunk is a slice of the period of RETRO_CHUNK_DAYS days. Its rows are read, scored and written to part files
of its own; a row in retro_test_chunks then records it as finished, in the same transaction as the job's
totals. Whatever runs next (a redelivered attempt, a partition helper, the coordinator taking over a helper's
range) skips committed chunks, and the first commit of a chunk wins: a second copy is thrown away, never merged.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from app.config import Settings
from app.errors import ReconciliationFailed, TooManyRejectedRows
from app.integrations.history import HistoryQuery, HistorySource
from app.integrations.prefetch import prefetched
from app.integrations.results import ResultStore
from app.integrations.scoring import ScoredBatch, Scorer, ScoringStopped
from app.retro_tests import runs
from app.retro_tests.runs import ChunkRecord, Counts
from worker.run import JobRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    key: str  # the ISO date of its first day: chunk keys sort like the period
    start: date
    end: date


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


def plan_chunks(start: date, end: date, days: int) -> list[Chunk]:
    """Consecutive, non-overlapping slices of [start, end] of at most `days` days each."""
    chunks = []
    day = start
    while day <= end:
        last = min(end, day + timedelta(days=days - 1))
        chunks.append(Chunk(key=day.isoformat(), start=day, end=last))
        day = last + timedelta(days=1)
    return chunks


def committed_keys(run: JobRun) -> set[str]:
    with run.transaction() as s:
        return runs.committed_keys(session=s, job_id=run.job_id)


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
    with run.transaction() as s:
        done = runs.committed_keys(session=s, job_id=run.job_id)
        base = ChunkCounts()
        base.add(runs.committed_counts(session=s, job_id=run.job_id))
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
        return chunk.key in committed_keys(run)

    stream = _read_ahead(
        run.adapters.source, query, pending, settings, skip=is_committed, depth=settings.score_window_batches
    )
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
    source: HistorySource,
    query: HistoryQuery,
    chunks: list[Chunk],
    settings: Settings,
    *,
    skip: Callable[[Chunk], bool],
    depth: int,
) -> contextlib.AbstractContextManager[Iterator[tuple[Chunk, pa.RecordBatch | _ChunkEnd]]]:
    """Slices of score_batch_rows rows, chunk after chunk, read on a background thread at most `depth` ahead.

    A chunk that `skip` says is finished by the time the reader reaches it is not read at all.
    """

    def produce() -> Iterator[tuple[Chunk, pa.RecordBatch | _ChunkEnd]]:
        for chunk in chunks:
            if skip(chunk):
                continue
            read = 0
            for batch in source.batches(query.between(chunk.start, chunk.end), batch_rows=settings.read_batch_rows):
                read += batch.num_rows
                for offset in range(0, batch.num_rows, settings.score_batch_rows):
                    yield chunk, batch.slice(offset, settings.score_batch_rows)
            yield chunk, _ChunkEnd(read)

    return prefetched(produce, depth=depth, name="history-reader")


class _ChunkOutput:
    """The part files of the chunk being written (`<stem>.parquet`, `<stem>.rejects.parquet`) and its counts."""

    def __init__(self, store: ResultStore, stem: str, query: HistoryQuery) -> None:
        self._store = store
        self._query = query
        self.part_path = f"{stem}.parquet"
        self.rejects_path = f"{stem}.rejects.parquet"
        self._parts = _PartWriter(store, self.part_path)
        self._rejects = _PartWriter(store, self.rejects_path)
        self.counts = ChunkCounts()

    def write(self, result: ScoredBatch) -> None:
        if result.scored_rows.num_rows:
            self._parts.write(_output_table(result.scored_rows, self._query, result.scores))
        if result.rejected_rows.num_rows:
            reasons = pa.table({"reason": pa.array(result.reject_reasons, pa.string())})
            self._rejects.write(_output_table(result.rejected_rows, self._query, reasons))
        self.counts.scored += result.scored_rows.num_rows
        self.counts.rejected += result.rejected_rows.num_rows

    def close(self, *, read: int) -> ChunkCounts:
        """Finish both files; every row the source gave must be scored or rejected."""
        self._parts.__exit__(None, None, None)
        self._rejects.__exit__(None, None, None)
        self.counts.read = read
        if self.counts.scored + self.counts.rejected != read:
            raise ReconciliationFailed(
                f"the source gave {read} rows for a chunk but {self.counts.scored + self.counts.rejected} were accounted for"
            )
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


def commit_chunk(run: JobRun, *, chunk: Chunk, output: _ChunkOutput) -> bool:
    """Record a finished chunk with its part files (the checkpoint); False when another copy was first."""
    counts = output.counts
    record = ChunkRecord(
        key=chunk.key,
        counts=counts.frozen(),
        part_path=output.part_path if counts.scored else None,
        rejects_path=output.rejects_path if counts.rejected else None,
    )
    with run.transaction() as s:
        totals = runs.record_chunk(session=s, job_id=run.job_id, lease=run.control.lease, chunk=record)
    if totals is None:
        return False
    enforce_reject_budget(
        rejected=totals.counts.rejected, read_total=totals.rows_total or totals.counts.read, settings=run.settings
    )
    return True


def enforce_reject_budget(*, rejected: int, read_total: int, settings: Settings) -> None:
    """Fail the job once more rows were rejected than RETRO_MAX_REJECTED_ROWS / _RATIO allow."""
    if rejected > max(settings.max_rejected_rows, int(settings.max_rejected_ratio * read_total)):
        raise TooManyRejectedRows(
            f"{rejected} row(s) were refused by the model (each with its reason in the rejects), more than the "
            f"allowed (RETRO_MAX_REJECTED_ROWS={settings.max_rejected_rows}, RETRO_MAX_REJECTED_RATIO={settings.max_rejected_ratio}); "
            "fix those rows at the source or the model, or raise the budget if scoring the rest is what the partner needs"
        )


class _PartWriter:
    """A Parquet part written through the result store, opened on the first batch."""

    def __init__(self, store: ResultStore, rel: str) -> None:
        self._stack = contextlib.ExitStack()
        self._store = store
        self._rel = rel
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._writer is None:
            fh = self._stack.enter_context(self._store.open_write(self._rel))
            self._writer = self._stack.enter_context(pq.ParquetWriter(fh, table.schema))
        self._writer.write_table(table)

    def __enter__(self) -> _PartWriter:
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._stack.__exit__(*exc)


def _output_table(batch: pa.RecordBatch, query: HistoryQuery, extra: pa.Table) -> pa.Table:
    keys = [*query.id_columns, query.date_column]
    columns = {k: batch.column(k) for k in dict.fromkeys(keys)}
    for name in extra.column_names:
        columns[name] = extra.column(name)
    return pa.table(columns)
