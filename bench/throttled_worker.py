"""A retrotest worker whose history source delivers at most BENCH_SOURCE_ROWS_PER_S rows/s per reader.

    BENCH_SOURCE_ROWS_PER_S=40000 python -m bench.throttled_worker worker --name w0

bench/scale_out uses it to stand for a source slower than the model server (PyHive pulls ~41k rows/s here),
the case where a second worker, with a reader of its own, should add throughput.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from app.integrations import wiring
from app.integrations.history.port import HistoryQuery, HistorySource


class ThrottledSource:
    """Wraps a real source; each `batches` stream is paced to rows_per_s."""

    def __init__(self, inner: HistorySource, rows_per_s: float) -> None:
        self._inner = inner
        self._rows_per_s = rows_per_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def batches(self, query: HistoryQuery, *, batch_rows: int) -> Iterator[pa.RecordBatch]:
        started, rows = time.monotonic(), 0
        for batch in self._inner.batches(query, batch_rows=batch_rows):
            rows += batch.num_rows
            ahead = rows / self._rows_per_s - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
            yield batch


def main() -> None:
    rate = float(os.environ["BENCH_SOURCE_ROWS_PER_S"])
    real = wiring.make_history_source

    def make_history_source(settings: Any) -> HistorySource:
        return ThrottledSource(real(settings), rate)

    wiring.make_history_source = make_history_source  # before worker.tasks imports it
    from app.cli import app as cli

    cli(sys.argv[1:])


if __name__ == "__main__":
    main()
