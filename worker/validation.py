"""The validating stage: before any partner row is scored, the deployment scores a reference whose expected scores
are known, and a difference beyond RETRO_REFERENCE_TOLERANCE fails the job.

The reference is, in order of preference:
1. the artifact named by the version's `retro.reference` tag: a Parquet, CSV or JSON (records) table holding
   the model's input columns and, in every other column, the expected outputs in the model's output order; the
   tag is a path in the version's run artifacts (`reference/expected.parquet`) or a full artifact URI;
2. the input example logged with the model, scored in-process by mlflow's pyfunc inside the model's own
   environment (app/integrations/environments/model_predict.py) — or the worker's, with RETRO_MODEL_ENV=worker.
A version with neither is scored unchecked, and the job says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from app.core.model_types import Feature, ModelVersionInfo
from app.core.records import Mismatch, ValidationRecord
from app.errors import EnvironmentFailed, ReferenceMismatch
from app.integrations.environments import model_predict
from app.integrations.environments.cache import ModelEnvironment
from app.integrations.environments.sandbox import (
    ModelSandbox,
    SandboxUnavailable,
    model_environment,
    python_roots,
    reported_error,
)
from app.integrations.scoring.scorers import Scorer

log = logging.getLogger(__name__)

REFERENCE_TAG = "retro.reference"
MAX_REFERENCE_ROWS = 10_000
SHOWN_MISMATCHES = 5


@dataclass(frozen=True)
class Reference:
    """Rows to score and the outputs the model should give for them."""

    source: str  # for people: where the expected outputs come from
    columns: dict[str, list[Any]]  # the model's inputs, by name
    expected: list[list[Any]]  # one row of expected outputs per input row

    @property
    def rows(self) -> int:
        return len(self.expected)


def load_reference(
    *,
    model: ModelVersionInfo,
    model_dir: Path,
    environment: ModelEnvironment | None,
    timeout_s: float,
    sandbox: ModelSandbox | None = None,
    cache_dir: Path | None = None,
) -> Reference | None:
    """The version's reference: its retro.reference artifact, else its input example scored in-process.

    With cache_dir, a reference an earlier job of this host computed for the same version in the same environment is
    read back instead (scoring in-process costs seconds, mostly mlflow's import: a job on a warm model server would
    otherwise wait for it); one not there yet is kept there for the next job.
    """
    cached = cache_dir / f"{_reference_key(model, environment)}.json" if cache_dir else None
    if cached is not None and (found := _read_cached(cached)) is not None:
        return found
    reference = _load_reference(
        model=model, model_dir=model_dir, environment=environment, timeout_s=timeout_s, sandbox=sandbox
    )
    if cached is not None and reference is not None:
        _keep(cached, reference)
    return reference


def _reference_key(model: ModelVersionInfo, environment: ModelEnvironment | None) -> str:
    """What a reference depends on: the version, its artifacts and reference tag, and the environment it ran in."""
    identity = [model.name, model.version, model.run_id, model.artifact_uri, model.tags.get(REFERENCE_TAG)]
    identity.append(environment.key if environment else "worker")
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def _read_cached(path: Path) -> Reference | None:
    try:
        kept = json.loads(path.read_text())
        return Reference(
            source=f"{kept['source']}; computed by an earlier job on this worker",
            columns=kept["columns"],
            expected=kept["expected"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not there, or unreadable: computed again


def _keep(path: Path, reference: Reference) -> None:
    """Write the reference for later jobs, atomically; one that JSON cannot hold (dates in a table) is not kept."""
    try:
        text = json.dumps({"source": reference.source, "columns": reference.columns, "expected": reference.expected})
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(text)
        os.replace(partial, path)
    except (TypeError, ValueError, OSError):
        log.debug("reference not kept at %s", path, exc_info=True)


def _load_reference(
    *,
    model: ModelVersionInfo,
    model_dir: Path,
    environment: ModelEnvironment | None,
    timeout_s: float,
    sandbox: ModelSandbox | None,
) -> Reference | None:
    tag = model.tags.get(REFERENCE_TAG)
    if tag:
        return _tagged_reference(model, tag)
    example = _input_example(model_dir, model.inputs)
    if example is None:
        return None
    where = f"Python {environment.python}, MLServer {environment.server_version}" if environment else "worker's own"
    expected = predict_in_process(
        model_dir=model_dir,
        features=model.inputs,
        columns=example,
        environment=environment,
        timeout_s=timeout_s,
        sandbox=sandbox,
    )
    return Reference(
        source=f"the model's input example, scored in-process in its environment ({where})",
        columns=example,
        expected=expected,
    )


def check(reference: Reference, *, scorer: Scorer, features: tuple[Feature, ...], tolerance: float) -> ValidationRecord:
    """Score the reference through the deployment; the outcome, or ReferenceMismatch naming the first differing rows."""
    batch = pa.RecordBatch.from_arrays(
        [pa.array(reference.columns[f.name], type=pa.type_for_alias(f.arrow_type)) for f in features],
        names=[f.name for f in features],
    )
    scored = scorer.score(batch)
    if scored.rejected_rows.num_rows:
        raise ReferenceMismatch(
            f"the deployment refused {scored.rejected_rows.num_rows} of the {reference.rows} reference rows "
            f"({reference.source}): {scored.reject_reasons[0]}"
        )
    got = [list(row) for row in zip(*(c.to_pylist() for c in scored.scores.columns), strict=True)]
    mismatches, worst = [], 0.0
    for i, (want, have) in enumerate(zip(reference.expected, got, strict=True)):
        same, diff = _same(want, have, tolerance)
        worst = max(worst, diff) if math.isfinite(diff) else worst
        if not same:
            mismatches.append(Mismatch(row=i, expected=_plain(want), got=_plain(have)))
    outcome = ValidationRecord(
        source=reference.source,
        rows=reference.rows,
        tolerance=tolerance,
        max_abs_diff=worst,
        passed=not mismatches,
        mismatches=mismatches[:SHOWN_MISMATCHES],
    )
    if mismatches:
        shown = "; ".join(f"row {m.row}: expected {m.expected}, got {m.got}" for m in outcome.mismatches or [])
        raise ReferenceMismatch(
            f"the deployed model does not reproduce its reference ({reference.source}): {len(mismatches)} of "
            f"{reference.rows} rows differ by more than {tolerance:g}; {shown}",
            outcome=outcome.stored(),
        )
    return outcome


def _same(want: list[Any], have: list[Any], tolerance: float) -> tuple[bool, float]:
    """Whether two rows of outputs agree (NaN and None agree with each other), and their largest difference."""
    if len(want) != len(have):
        return False, math.inf
    worst = 0.0
    for a, b in zip(want, have, strict=True):
        a, b = _nan_to_none(a), _nan_to_none(b)
        if a is None or b is None:
            if a is not b:
                return False, math.inf
        elif isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
            diff = abs(float(a) - float(b))
            worst = max(worst, diff)
            if diff > tolerance * max(1.0, abs(float(a))):
                return False, worst
        elif a != b:
            return False, math.inf
    return True, worst


def _plain(row: list[Any]) -> list[Any]:
    """A row as JSON keeps it (NaN is not JSON)."""
    return [_nan_to_none(v) for v in row]


def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def predict_in_process(
    *,
    model_dir: Path,
    features: tuple[Feature, ...],
    columns: dict[str, list[Any]],
    environment: ModelEnvironment | None,
    timeout_s: float,
    sandbox: ModelSandbox | None = None,
) -> list[list[Any]]:
    """The model's own scores for the rows, by mlflow's pyfunc in the model's environment (or the worker's).

    The model's code runs there as a model process (app/integrations/environments/sandbox.py): a minimal environment, the
    sandbox where it works, no network; the job learns only the exception's type and message it reports.
    """
    python = environment.python_executable if environment else sys.executable
    model_dir = model_dir.resolve()  # the path the sandbox mounts it at
    request = {
        "model_dir": str(model_dir),
        "columns": [f.name for f in features],
        "dtypes": {f.name: "object" if f.arrow_type == "string" else f.arrow_type for f in features},
        "data": [list(row) for row in zip(*(columns[f.name] for f in features), strict=True)],
    }
    script = Path(model_predict.__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="retro-reference-") as scratch:
        work = Path(scratch)
        result = work / "result.json"
        try:
            argv = (sandbox or ModelSandbox()).command(
                [python, str(script), str(result)],
                cwd=work,
                readable=[*python_roots(python), script, model_dir],
                writable=[work],
                network=False,
            )
        except SandboxUnavailable as exc:
            raise EnvironmentFailed(str(exc)) from exc
        try:
            out = subprocess.run(
                argv,
                input=json.dumps(request),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                cwd=work,
                env=model_environment(home=work / "home"),
            )
        except subprocess.TimeoutExpired as exc:
            raise EnvironmentFailed(f"scoring the input example in-process took longer than {timeout_s:.0f} s") from exc
        reported = _read_result(result)
    if "scores" in reported and out.returncode == 0:
        return [list(row) for row in reported["scores"]]
    # The model's output may hold anything it likes: the worker's log keeps a bounded tail, the job never sees it.
    log.warning("the in-process reference exited with %s; its stderr ends: %r", out.returncode, out.stderr[-2000:])
    error = reported.get("error")
    if isinstance(error, dict):
        cause = reported_error(error.get("type"), error.get("message"))
    else:
        cause = f"the scoring process exited with code {out.returncode} without reporting an exception"
    raise EnvironmentFailed(f"the model does not score its own input example in-process: {cause}")


def _read_result(path: Path) -> dict[str, Any]:
    """The result file model_predict.py writes; empty when it wrote none (or one that is not a JSON object)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _input_example(model_dir: Path, features: tuple[Feature, ...]) -> dict[str, list[Any]] | None:
    """The input example MLflow logged with the model, as columns; None without one (or one retrotest can't read)."""
    path = model_dir / "input_example.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(doc, dict) and "dataframe_split" in doc:
        doc = doc["dataframe_split"]
    if isinstance(doc, dict) and "columns" in doc and "data" in doc:
        rows = [dict(zip(doc["columns"], row, strict=True)) for row in doc["data"]]
    elif isinstance(doc, list) and all(isinstance(r, dict) for r in doc):
        rows = doc
    else:
        log.info("the input example in %s is not a table; no reference", model_dir)
        return None
    if not rows or any(f.name not in rows[0] for f in features):
        return None
    return {f.name: [r.get(f.name) for r in rows[:MAX_REFERENCE_ROWS]] for f in features}


def _tagged_reference(model: ModelVersionInfo, tag: str) -> Reference:
    """The table a retro.reference tag names, split into the model's inputs and the expected outputs."""
    import mlflow

    uri = tag if ":/" in tag or tag.startswith("/") else f"runs:/{model.run_id}/{tag.lstrip('/')}"
    with tempfile.TemporaryDirectory(prefix="retro-reference-") as scratch:
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch))
            table = _read_table(path)
        except Exception as exc:
            raise ReferenceMismatch(
                f"cannot read the reference {uri} named by the version's {REFERENCE_TAG} tag: {exc}"
            ) from exc
    inputs = [f.name for f in model.inputs]
    missing = [name for name in inputs if name not in table.column_names]
    outputs = [name for name in table.column_names if name not in inputs]
    if missing or not outputs:
        raise ReferenceMismatch(
            f"the reference {uri} must hold the model's inputs and its expected outputs; "
            + (f"it lacks {', '.join(missing)}" if missing else "it has no column besides the inputs")
        )
    table = table.slice(0, MAX_REFERENCE_ROWS)
    expected = [list(row) for row in zip(*(table.column(c).to_pylist() for c in outputs), strict=True)]
    return Reference(
        source=f"the reference {tag} ({REFERENCE_TAG} tag)",
        columns={name: table.column(name).to_pylist() for name in inputs},
        expected=expected,
    )


def _read_table(path: Path) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    name = path.name.lower()
    if name.endswith(".parquet"):
        return pq.read_table(path)
    if name.endswith((".csv", ".csv.gz")):
        return pacsv.read_csv(path)
    if name.endswith((".json", ".jsonl")):
        return pajson.read_json(path)
    raise ValueError(f"{path.name} is not .parquet, .csv or .json(l)")
