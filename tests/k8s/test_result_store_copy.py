"""ResultStore.copy, which publishing uses to take a one-chunk job's part as its scores.parquet: on a local folder and
on S3 (moto's server), the copy is whole, replaces what was there, and leaves no temporary file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.k8s.conftest import BUCKET


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_copy_is_whole_replaces_the_target_and_leaves_no_temporary_file(
    where: str, tmp_path: Path, s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.integrations.storage.results import ResultStore

    if where == "s3":
        for name, value in (
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_ENDPOINT_URL", s3),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            monkeypatch.setenv(name, value)
        store = ResultStore(f"s3://{BUCKET}/results-{tmp_path.name}")
    else:
        store = ResultStore(str(tmp_path / "results"))
    part = b"PAR1" + bytes(range(256)) * 4096 + b"PAR1"  # 1 MiB and some
    with store.open_write("p/j/parts/0001.parquet") as fh:
        fh.write(part)
    with store.open_write("p/j/scores.parquet") as fh:
        fh.write(b"an earlier attempt's file")

    store.copy("p/j/parts/0001.parquet", "p/j/scores.parquet")

    with store.open_read("p/j/scores.parquet") as fh:
        assert fh.read() == part
    assert store.exists("p/j/parts/0001.parquet")  # the part stays until the job's success is recorded
    assert not store.exists("p/j/scores.parquet.tmp")
