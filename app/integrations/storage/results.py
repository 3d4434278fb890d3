"""Result storage: a local directory by default, any fsspec URL (e.g. s3://bucket/prefix) as an option."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

# The full manifest (run id, artifact URI, requester, source table and query): staff read it through the API; a
# partner's link never serves it.
INTERNAL_MANIFEST = "manifest.internal.json"
STAFF_ONLY_KIND = "staff_manifest"
# requirements.lock (kind "environment") names the model server's Python and every pinned package: a map of what
# runs inside for an outsider, so it is for staff too.
STAFF_ONLY_KINDS = frozenset({STAFF_ONLY_KIND, "environment"})


class ResultStore:
    """Files of retro tests under one root, addressed by relative paths like '<partner>/<job>/scores.parquet'."""

    def __init__(self, url: str) -> None:
        self._fs, root = fsspec.core.url_to_fs(url)
        self._root = root.rstrip("/")
        self.url = url

    def path(self, rel: str) -> str:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"unsafe result path {rel!r}")
        return f"{self._root}/{rel}"

    def location(self, rel: str) -> str:
        """Where a person or another system finds rel."""
        return str(self._fs.unstrip_protocol(self.path(rel)))

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[Any]]:
        """Write rel atomically: readers see the old file or the complete new one, never a partial one."""
        final = self.path(rel)
        tmp = f"{final}.tmp"
        self._fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        try:
            with self._fs.open(tmp, "wb") as fh:
                yield fh
            self._fs.mv(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm(tmp)
            raise

    def copy(self, src: str, dst: str) -> None:
        """Copy src to dst atomically (a server-side copy where the store has one); dst is replaced."""
        final = self.path(dst)
        tmp = f"{final}.tmp"
        self._fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        try:
            self._fs.copy(self.path(src), tmp)
            self._fs.mv(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm(tmp)
            raise

    @property
    def is_local(self) -> bool:
        protocols = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
        return "file" in protocols or "local" in protocols

    @property
    def filesystem(self) -> Any:
        """The fsspec filesystem, for readers that take one (DuckDB's register_filesystem)."""
        return self._fs

    def local_path(self, rel: str, *, cache_dir: Path | None = None) -> str:
        """rel as a path on this machine, for readers that take paths (DuckDB, pyarrow); a remote file is copied
        into cache_dir once (the name carries rel's folders, so two jobs' files never meet)."""
        if self.is_local:
            return self.path(rel)
        if cache_dir is None:
            raise ValueError(f"result store {self.url} is not local: {rel} has no local path")
        local = cache_dir / rel.replace("/", "__")
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_suffix(".tmp")
            self._fs.get(self.path(rel), str(tmp))
            tmp.replace(local)
        return str(local)

    def open_read(self, rel: str) -> IO[Any]:
        return self._fs.open(self.path(rel), "rb")  # type: ignore[no-any-return]

    def exists(self, rel: str) -> bool:
        return bool(self._fs.exists(self.path(rel)))

    def size(self, rel: str) -> int:
        return int(self._fs.size(self.path(rel)))

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.open_read(rel) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def remove_tree(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm(self.path(rel), recursive=True)

    def free_bytes(self, rel: str) -> int | None:
        """Free space where rel would be written, where the store can tell (a local file system); else None."""
        if "file" not in (self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)):
            return None
        path = Path(self.path(rel))
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            return shutil.disk_usage(path).free
        except OSError:
            return None

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm(self.path(rel))


# A cell starting with one of these is a formula to a spreadsheet program (OWASP "CSV injection"): `=HYPERLINK(...)`
# in a partner's own data would run when the partner opens scores.csv.gz. Tab and CR start formulas in some too.
FORMULA_PREFIXES = "=+-@\t\r"
_FORMULA_START = "^[" + re.escape(FORMULA_PREFIXES) + "]"


def csv_safe(batch: pa.RecordBatch) -> pa.RecordBatch:
    """batch with every string cell that a spreadsheet would read as a formula prefixed by `'` (shown, not run).

    Only for CSV files: Parquet keeps the values exactly.
    """
    columns = []
    for column in batch.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            risky = pc.match_substring_regex(column, _FORMULA_START)
            quoted = pc.binary_join_element_wise(pa.scalar("'", column.type), column, pa.scalar("", column.type))
            column = pc.if_else(pc.fill_null(risky, False), quoted, column)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


class SafeCsvWriter:
    """The one way the service writes a CSV file: every batch (and every header name) through csv_safe first."""

    def __init__(self, sink: io.BufferedIOBase | IO[bytes], schema: pa.Schema) -> None:
        names = [_cell_safe(name) for name in schema.names]
        self._schema = pa.schema([field.with_name(name) for field, name in zip(schema, names, strict=True)])
        self._writer = pacsv.CSVWriter(sink, self._schema)

    def write_batch(self, batch: pa.RecordBatch) -> None:
        safe = csv_safe(batch)
        self._writer.write_batch(pa.RecordBatch.from_arrays(safe.columns, schema=self._schema))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> SafeCsvWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cell_safe(value: str) -> str:
    return "'" + value if value[:1] and value[0] in FORMULA_PREFIXES else value


def csv_header(names: list[str]) -> bytes:
    """A CSV header line of quoted names, neutralised as csv_safe does cells (for a file with no rows)."""
    return (",".join('"' + _cell_safe(n).replace('"', '""') + '"' for n in names) + "\n").encode()
