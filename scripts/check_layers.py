"""The layer rules CI holds app/ and worker/ to (scripts/lint.sh runs this; exit status 1 when one is broken).

1. No import cycle between packages. A package is a first-level package or module of app/ or worker/
   (app.retro_tests, app.metrics, worker.run, ...), or a port of app/integrations/ (app.integrations.history); every import counts wherever it stands, inside a function
   or under TYPE_CHECKING too, since a hidden import is still a dependency.
2. The bottom stays at the bottom: app.core (the job contract) and the modules under it (BOTTOM) import only
   BOTTOM, so that every feature may import them; an upward import need not close a cycle to be wrong.
3. No function takes more than MAX_PARAMS parameters besides self/cls (*args and **kwargs not counted), except
   FastAPI route handlers and CLI commands, whose parameters are the route's or the command's own inputs: they
   are told by their decorators (`@router.get(...)`, `@app.command(...)`).
4. worker/run.py (JobRun) is the one writer of a running job. No other module of worker/ calls a method named
   `transaction` (`run.transaction()`, `self.transaction()`, ...), imports the module app.retro_tests.runs
   (`from app.retro_tests import runs`, `import app.retro_tests.runs`), or imports from it anything but its
   types and exceptions: `from app.retro_tests.runs import X` only where X is a CapWords name (JobSpec, Counts,
   LeaseLost, ...); its functions (lowercase: record_chunk, enter_stage, finish, tally, ...) are the job row's
   writes and reads, which only worker/run.py calls.
5. The job's JSON facts are read as their record types (app/core/records.py), never by string key: no module of
   app/ or worker/ subscripts (`x.environment["python"]`) or calls .get/.items/.keys/.values on an attribute
   named after one of them (RECORD_FIELDS), whatever object it is on. app/core/records.py itself is exempt.

Usage: python scripts/check_layers.py [ROOT]   (ROOT: the folder holding app/ and worker/; default the repo)
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TOPS = ("app", "worker")
CORE = "app.core"
# What app.core stands on: settings, the database session, errors, the clock, the Prometheus metrics, the language.
BOTTOM = frozenset({"app.config", "app.key_strength", "app.db", "app.errors", "app.clock", "app.metrics", "app.i18n"})
MAX_PARAMS = 6
# Decorator attributes that make a function a route handler (FastAPI's APIRouter/FastAPI methods) or a CLI
# command (typer's Typer.command and Typer.callback).
ROUTE_DECORATORS = frozenset({"get", "post", "put", "patch", "delete", "head", "options", "trace", "api_route"})
COMMAND_DECORATORS = frozenset({"command", "callback"})
# Rule 4: the running job's writes (app.retro_tests.runs) and the one worker module that may make them.
JOB_WRITES = "app.retro_tests.runs"
JOB_WRITER = "worker/run.py"
# Rule 5: the job row's JSON columns that hold a record (app/core/records.py), and the module that defines them
# (stage_started and stage_log are read through its StageTimeline).
RECORD_FIELDS = frozenset(
    {
        "model_info",
        "population",
        "chunk_plan",
        "environment",
        "validation",
        "source_override",
        "stage_started",
        "stage_log",
    }
)
RECORDS = "app/core/records.py"
DICT_READS = frozenset({"get", "items", "keys", "values"})


@dataclass(frozen=True)
class Edge:
    """One import that makes package `source` depend on package `target`."""

    source: str
    target: str
    where: str  # path:line of the import


PORTS = "app.integrations"  # its folders are ports (registry, history, deployers, ...): each counts as a package


def package_of(module: str) -> str:
    """The package a dotted module name belongs to: its first-level package or module (app.retro_tests.models ->
    app.retro_tests), or for the adapters its port (app.integrations.history.hive -> app.integrations.history)."""
    parts = module.split(".")
    if module.startswith(PORTS + ".") and len(parts) > 2:
        return ".".join(parts[:3])
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def module_name(path: Path, root: Path) -> str:
    name = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
    return name.removesuffix(".__init__")


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement reaches (a relative import resolved against the importing module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = from_module(node, module, is_package)
    # `from app import retro_tests` imports the package app.retro_tests, not app itself.
    return [f"{base}.{alias.name}" for alias in node.names] if base in TOPS else [base]


def from_module(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from ... import` statement imports from (a relative one resolved against `module`)."""
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        if not is_package:
            anchor = anchor[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    return base


def python_files(root: Path) -> Iterator[Path]:
    for top in TOPS:
        if (root / top).is_dir():
            yield from sorted((root / top).rglob("*.py"))


def import_edges(root: Path) -> list[Edge]:
    """Every import from one package of app/ or worker/ into another."""
    edges: list[Edge] = []
    for path in python_files(root):
        module = module_name(path, root)
        source = package_of(module)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in imported_modules(node, module, path.name == "__init__.py"):
                if name.split(".")[0] not in TOPS:
                    continue
                target = package_of(name)
                if target != source and target not in TOPS:
                    edges.append(Edge(source, target, f"{path.relative_to(root)}:{node.lineno}"))
    return edges


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The groups of packages that reach each other through imports (strongly connected components, Tarjan)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group: list[str] = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(edges: list[Edge]) -> list[Edge]:
    """Imports from app.core or a BOTTOM module into anything but BOTTOM."""
    return [e for e in edges if (e.source == CORE or e.source in BOTTOM) and e.target not in BOTTOM]


def _decorator_name(decorator: ast.expr) -> str | None:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return target.attr if isinstance(target, ast.Attribute) else None


def is_entry_point(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A route handler or CLI command: its parameters are the request's or the command line's inputs."""
    return any(_decorator_name(d) in ROUTE_DECORATORS | COMMAND_DECORATORS for d in func.decorator_list)


def parameter_count(func: ast.FunctionDef | ast.AsyncFunctionDef, *, in_class: bool) -> int:
    args = func.args
    positional = [*args.posonlyargs, *args.args]
    if in_class and positional and positional[0].arg in ("self", "cls", "mcs"):
        positional = positional[1:]
    return len(positional) + len(args.kwonlyargs)


def long_signatures(root: Path) -> list[str]:
    """Functions of app/ and worker/ with more than MAX_PARAMS parameters, as 'path:line name (n)'."""
    found: list[str] = []
    for path in python_files(root):
        tree = ast.parse(path.read_text(), filename=str(path))
        methods = {
            id(item)
            for cls in ast.walk(tree)
            if isinstance(cls, ast.ClassDef)
            for item in cls.body
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or is_entry_point(node):
                continue
            count = parameter_count(node, in_class=id(node) in methods)
            if count > MAX_PARAMS:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({count} parameters)")
    return found


def _job_write(node: ast.AST, module: str, is_package: bool) -> str | None:
    """What in `node` writes the running job's row outside JobRun (rule 4), or None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "transaction":
        return "opens a transaction (.transaction()); call a JobRun method (worker/run.py) instead"
    if not isinstance(node, ast.Import | ast.ImportFrom):
        return None
    if isinstance(node, ast.Import):
        reached = [alias.name for alias in node.names]
    else:
        base = from_module(node, module, is_package)
        if base == JOB_WRITES:  # from app.retro_tests.runs import ...: its types only
            functions = [alias.name for alias in node.names if not alias.name[:1].isupper()]
            if functions:
                return f"imports {', '.join(functions)} from {JOB_WRITES}; only worker/run.py calls its functions"
            return None
        reached = [f"{base}.{alias.name}" for alias in node.names]  # from app.retro_tests import runs
    if JOB_WRITES in reached:
        return f"imports {JOB_WRITES}; call a JobRun method (worker/run.py) instead"
    return None


def job_writes_outside_jobrun(root: Path) -> list[str]:
    """Rule 4: modules of worker/ other than worker/run.py that open a transaction or use runs' functions."""
    found: list[str] = []
    for path in python_files(root):
        rel = path.relative_to(root).as_posix()
        if not rel.startswith("worker/") or rel == JOB_WRITER:
            continue
        module = module_name(path, root)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            why = _job_write(node, module, path.name == "__init__.py")
            if why is not None:
                found.append(f"{rel}:{getattr(node, 'lineno', 0)} {why}")
    return found


def _record_field(node: ast.expr) -> str | None:
    """The fact an expression reads: `job.environment`, or `(job.environment or {})`, as a default hides it."""
    if isinstance(node, ast.BoolOp) and node.values:
        node = node.values[0]
    return node.attr if isinstance(node, ast.Attribute) and node.attr in RECORD_FIELDS else None


def records_read_by_key(root: Path) -> list[str]:
    """Rule 5: a job's JSON fact read as a dict (by key, or its keys, values or items) outside its record type."""
    found: list[str] = []
    for path in python_files(root):
        rel = path.relative_to(root).as_posix()
        if rel == RECORDS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Subscript | ast.Attribute):
                continue
            if isinstance(node, ast.Attribute) and node.attr not in DICT_READS:
                continue
            field = _record_field(node.value)
            if field is not None:
                found.append(f"{rel}:{node.lineno} reads .{field} by key; read its record's attributes")
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    failed = False
    edges = import_edges(root)
    for group in cycles(edges):
        failed = True
        members = set(group)
        print(f"import cycle between packages: {' <-> '.join(group)}")
        for edge in edges:
            if edge.source in members and edge.target in members:
                print(f"  {edge.where}: {edge.source} imports {edge.target}")
    for edge in upward_imports(edges):
        failed = True
        print(f"{edge.source} is below {edge.target} and may not import it: {edge.where}")
    for line in long_signatures(root):
        failed = True
        print(f"more than {MAX_PARAMS} parameters (pass a request object, or keyword-only fields of one): {line}")
    for line in job_writes_outside_jobrun(root):
        failed = True
        print(f"a write to the running job outside JobRun: {line}")
    for line in records_read_by_key(root):
        failed = True
        print(f"a job's fact read as a dict: {line}")
    if failed:
        print("layers: FAILED (scripts/check_layers.py says what the rules are)")
        return 1
    print(
        "layers: no import cycle between packages; app.core imports only the bottom; no function over 6 parameters; "
        "only worker/run.py writes a running job; no job fact read by key"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
