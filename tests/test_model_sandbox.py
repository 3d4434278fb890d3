"""Model code is untrusted (issue 26, N3-N5): a model's requirements may only name packages on the configured
index, wheels only unless allowed; the processes that run its code see neither the worker's environment nor its
/proc; what they report reaches the job only as `Type: message`, bounded.

The sdist case serves a real PEP 503 index on loopback (`python -m http.server`) holding an sdist whose setup.py
(its own in-tree build backend, so no setuptools is needed) writes a marker file with the environment it saw."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.core.model_types import Feature, ModelVersionInfo
from app.errors import DeploymentFailed, EnvironmentFailed
from app.integrations.deployers.local import LocalMLServerDeployer
from app.integrations.environments.cache import EnvironmentCache, ModelRequirements, read_requirements
from app.integrations.environments.sandbox import ModelSandbox
from tests.conftest import Stack, free_port
from tests.old_model import register_model_folder
from tests.test_end_to_end import mlserver_processes_for, submit
from worker.validation import predict_in_process

WORKER_PYTHON = ".".join(str(p) for p in sys.version_info[:3])
SECRET = "s3cr3t-key-for-the-sandbox-test-0123456789"
SETUP_PY = """
import json, os, zipfile
try:
    with open({marker!r}, "w") as fh:
        json.dump(dict(os.environ), fh)
except OSError:
    pass
METADATA = "Metadata-Version: 2.1\\nName: markerpkg\\nVersion: 1.0\\n"
WHEEL = "Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
def get_requires_for_build_wheel(config_settings=None):
    return []
def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    folder = os.path.join(metadata_directory, "markerpkg-1.0.dist-info")
    os.makedirs(folder)
    for name, text in (("METADATA", METADATA), ("WHEEL", WHEEL)):
        with open(os.path.join(folder, name), "w") as fh:
            fh.write(text)
    return "markerpkg-1.0.dist-info"
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = "markerpkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        z.writestr("markerpkg.py", "")
        z.writestr("markerpkg-1.0.dist-info/METADATA", METADATA)
        z.writestr("markerpkg-1.0.dist-info/WHEEL", WHEEL)
        z.writestr("markerpkg-1.0.dist-info/RECORD", "")
    return name
"""
PYPROJECT = '[build-system]\nrequires = []\nbuild-backend = "setup"\nbackend-path = ["."]\n'


class SdistIndex:
    """A PEP 503 index on loopback holding one sdist-only package whose setup.py writes `marker`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = root / "marker.json"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/simple"
        self.sdist_url = f"http://127.0.0.1:{self.port}/simple/markerpkg/markerpkg-1.0.tar.gz"
        source = root / "src" / "markerpkg-1.0"
        source.mkdir(parents=True)
        (source / "setup.py").write_text(SETUP_PY.format(marker=str(self.marker)))
        (source / "pyproject.toml").write_text(PYPROJECT)
        (source / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: markerpkg\nVersion: 1.0\n")
        package = root / "simple" / "markerpkg"
        package.mkdir(parents=True)
        with tarfile.open(package / "markerpkg-1.0.tar.gz", "w:gz") as tar:
            tar.add(source, arcname="markerpkg-1.0")
        (package / "index.html").write_text('<a href="markerpkg-1.0.tar.gz">markerpkg-1.0.tar.gz</a>\n')
        (root / "simple" / "index.html").write_text('<a href="markerpkg/">markerpkg</a>\n')


@pytest.fixture(scope="module")
def sdist_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdistIndex]:
    index = SdistIndex(tmp_path_factory.mktemp("index"))
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(index.port), "--bind", "127.0.0.1", "--directory", str(index.root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{index.url}/markerpkg/", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline and server.poll() is None, "the index did not start"
            time.sleep(0.1)
        yield index
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture()
def clean_marker(sdist_index: SdistIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SdistIndex:
    """No marker yet, and a uv cache of the test's own: a wheel built earlier must not stand in for a build."""
    sdist_index.marker.unlink(missing_ok=True)
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    monkeypatch.setenv("RETRO_SECRET_KEY", SECRET)
    return sdist_index


def _model(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def _python_env(*deps: str) -> str:
    return json.dumps({"python": WORKER_PYTHON, "build_dependencies": ["pip"], "dependencies": list(deps)})


REFUSED = {
    "url": ("python_env.yaml", "markerpkg @ {sdist_url}", "names a URL"),
    "url-in-requirements.txt": ("requirements.txt", "markerpkg @ {sdist_url}", "names a URL"),
    "relative path": ("python_env.yaml", "./markerpkg", "not a package name"),
    "file url": ("python_env.yaml", "file:///{root}/simple/markerpkg/markerpkg-1.0.tar.gz", "not a package name"),
    "archive": ("requirements.txt", "markerpkg-1.0.tar.gz", "names a URL, a VCS link or a file"),
    "vcs": ("python_env.yaml", "git+https://127.0.0.1:1/markerpkg.git", "not a package name"),
    "vcs by name": ("python_env.yaml", "markerpkg @ git+https://127.0.0.1:1/markerpkg.git", "names a URL"),
    "newline-smuggled option": ("python_env.yaml", "numpy==1.26.4\n--extra-index-url {url}", "line break"),
    "option": ("requirements.txt", "--extra-index-url {url}", "is an option"),
    "editable": ("requirements.txt", "-e ./markerpkg", "is an option"),
    "find-links": ("requirements.txt", "-f {url}", "is an option"),
    "carriage return": ("requirements.txt", "numpy==1.26.4\r-i {url}", "is an option"),  # a line of its own
    "line separator": ("python_env.yaml", "numpy==1.26.4\u2028--index-url {url}", "line break"),
    "continuation": ("requirements.txt", "numpy==1.26.4 \\", "backslash"),
    "constraint url": ("constraints.txt", "markerpkg @ {sdist_url}", "names a URL"),
    "conda pip url": ("conda.yaml", "markerpkg @ {sdist_url}", "names a URL"),
}


def _refused_model(folder: Path, case: str, index: SdistIndex) -> Path:
    """A model folder whose environment files hold the case's entry where the case says."""
    where, template, _ = REFUSED[case]
    entry = template.format(sdist_url=index.sdist_url, url=index.url, root=str(index.root).lstrip("/"))
    if where == "python_env.yaml":
        return _model(folder, {"python_env.yaml": _python_env("mlflow", entry)})
    if where == "conda.yaml":
        conda = {"dependencies": [f"python={WORKER_PYTHON}", "pip", {"pip": ["mlflow", entry]}]}
        return _model(folder, {"conda.yaml": json.dumps(conda)})
    flag = "-c" if where == "constraints.txt" else "-r"
    return _model(
        folder, {"python_env.yaml": _python_env(f"{flag} {where}"), where: f"# logged by mlflow\nmlflow\n{entry}\n"}
    )


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_requirement_that_is_not_a_named_package_from_the_index_is_refused_and_nothing_runs(
    case: str, clean_marker: SdistIndex, tmp_path: Path
) -> None:
    model = _refused_model(tmp_path / "model", case, clean_marker)
    cache = EnvironmentCache(root=tmp_path / "envs", server_versions=("1.7.1",))
    with pytest.raises(EnvironmentFailed) as refused:
        cache.prepare(read_requirements(model, what="model 'm' version 1"))
    detail = refused.value.detail
    assert REFUSED[case][2] in detail and "refused" in detail, detail
    assert "\n" not in detail and "\r" not in detail and len(detail) < 600, detail
    assert not clean_marker.marker.exists()


def test_a_requirements_file_that_includes_itself_is_refused_not_a_recursion(tmp_path: Path) -> None:
    model = _model(
        tmp_path, {"python_env.yaml": _python_env("-r requirements.txt"), "requirements.txt": "-r requirements.txt\n"}
    )
    with pytest.raises(EnvironmentFailed, match="more than 20 files"):
        read_requirements(model, what="m")


def test_named_packages_with_extras_specifiers_and_markers_pass(tmp_path: Path) -> None:
    deps = ["mlflow==2.9.2", "scikit-learn[alldeps]>=1.3,<1.4", 'pandas==2.1.4; python_version >= "3.8"', "numpy"]
    model = _model(tmp_path, {"python_env.yaml": _python_env(*deps)})
    assert read_requirements(model, what="m").requirements == tuple(deps)
    # A requirements file saved by a Windows editor (a byte order mark, CRLF line ends) reads the same.
    (tmp_path / "requirements.txt").write_bytes(("\ufeff" + "\r\n".join(deps) + "\r\n").encode())
    (tmp_path / "python_env.yaml").write_text(_python_env("-r requirements.txt"))
    assert read_requirements(model, what="m").requirements == tuple(deps)


def test_an_sdist_only_package_on_the_index_is_refused_unless_allowed_and_then_built_in_the_sandbox(
    clean_marker: SdistIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requirements = ModelRequirements(python=WORKER_PYTHON, requirements=("markerpkg==1.0",))

    def cache(name: str, sandbox: str, allowed: tuple[str, ...] = ()) -> EnvironmentCache:
        # A uv cache per step: uv would reuse the wheel an earlier step built instead of building it again.
        monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / name / "uv-cache"))
        return EnvironmentCache(
            root=tmp_path / name,
            server_versions=("1.7.1",),
            index_url=clean_marker.url,
            build_allowed=allowed,
            sandbox=ModelSandbox(sandbox),  # type: ignore[arg-type]
        )

    with pytest.raises(EnvironmentFailed) as refused:
        cache("default", "none").prepare(requirements)
    assert "markerpkg has no wheel" in refused.value.detail, refused.value.detail
    assert "RETRO_ENV_BUILD_ALLOWED_PACKAGES" in refused.value.detail
    assert not clean_marker.marker.exists()

    # Allowed and sandboxed: it is built (the resolution gets as far as MLServer, which this index lacks), but its
    # setup.py cannot reach the worker's files.
    with pytest.raises(EnvironmentFailed, match="no MLServer release resolves"):
        cache("sandboxed", "auto", ("markerpkg",)).prepare(requirements)
    assert not clean_marker.marker.exists()

    # Allowed, without the sandbox: the build runs (the marker proves the test sees it), in the minimal environment.
    with pytest.raises(EnvironmentFailed, match="no MLServer release resolves"):
        cache("unsandboxed", "none", ("markerpkg",)).prepare(requirements)
    seen = json.loads(clean_marker.marker.read_text())
    assert not [k for k in seen if k.startswith(("RETRO_", "AWS_", "KUBECONFIG"))], sorted(seen)
    assert SECRET not in json.dumps(seen) and os.environ["RETRO_DATABASE_URL"] not in json.dumps(seen)


# Models whose code is hostile: scored in-process (the reference check) and served by a local MLServer.

LEAKY_MODEL = """
import atexit, json, os, sys
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

BEHAVIOUR = {behaviour!r}


def read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace").replace("\\0", "\\n")
    except Exception as exc:
        return "unreadable: " + type(exc).__name__


def spy():
    seen = {{"environ": dict(os.environ), "self": read("/proc/self/environ"), "uid": os.getuid()}}
    seen["parent"] = read("/proc/%d/environ" % os.getppid())
    # Every process it can see, the worker among them unless it is hidden.
    seen["others"] = [read("/proc/%s/environ" % p) for p in os.listdir("/proc") if p.isdigit()]
    return json.dumps(seen)


class Hostile(PythonModel):
    def load_context(self, context):
        if BEHAVIOUR == "raise-on-load":
            sys.stderr.write("JUNK-ON-STDERR " * 50 + "\\n")
            raise ValueError("cannot load: " + "y" * 5000)

    def predict(self, context, model_input, params=None):
        if BEHAVIOUR == "leak-to-file":  # MLServer answers numbers: what it saw goes to a file in its folder
            with open("seen.json", "w") as fh:
                fh.write(spy())
            return pd.DataFrame({{"leak": [1.0] * len(model_input)}})
        if BEHAVIOUR == "raise":
            sys.stderr.write("JUNK-ON-STDERR " * 50 + "\\n")
            atexit.register(lambda: sys.stderr.write("JUNK-AT-EXIT the last line of stderr\\n"))
            raise ValueError("the model refuses: " + "x" * 5000)
        return pd.DataFrame({{"leak": [spy()] * len(model_input)}})


set_model(Hostile())
"""


def save_hostile_model(folder: Path, behaviour: str, *, pip_requirements: list[str] | None = None) -> Path:
    """A models-from-code pyfunc (its code is a file in the model, so it loads anywhere) with an input example."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    code = folder.parent / f"{folder.name}_code.py"
    code.write_text(LEAKY_MODEL.format(behaviour=behaviour))
    example = pd.DataFrame({"tenure_months": [3, 12], "monthly_spend": [10.5, 99.0]})
    mlflow.pyfunc.save_model(
        str(folder),
        python_model=str(code),
        signature=infer_signature(example, pd.DataFrame({"leak": ["a", "b"] if behaviour == "leak" else [1.0, 2.0]})),
        input_example=example,
        pip_requirements=pip_requirements or [f"mlflow=={mlflow.__version__}"],
    )
    return folder


FEATURES = (Feature("tenure_months", "long"), Feature("monthly_spend", "double"))
COLUMNS = {"tenure_months": [3], "monthly_spend": [10.5]}


@pytest.fixture()
def worker_secrets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The worker's secrets as a production worker has them; the values a model must never see."""
    extra = {
        "RETRO_SECRET_KEY": SECRET,
        "AWS_SECRET_ACCESS_KEY": "aws-secret-for-the-sandbox-test",
        "KUBECONFIG": "/etc/kube/config-for-the-sandbox-test",
        "CELERY_BROKER_URL": "redis://celery-broker-for-the-sandbox-test",
    }
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    return [*extra.values(), os.environ["RETRO_DATABASE_URL"], os.environ["RETRO_BROKER_URL"]]


def _assert_nothing_leaked(seen: dict[str, object], secrets: list[str], *, whole: str) -> None:
    environ = seen["environ"]
    assert isinstance(environ, dict) and "HOME" in environ, seen  # the model did read its environment
    assert not [k for k in environ if k.startswith(("RETRO_", "AWS_", "GOOGLE_", "AZURE_", "KUBECONFIG", "CELERY"))]
    for secret in secrets:
        assert secret not in whole, f"{secret!r} reached the model"
    assert "RETRO_" not in whole


def test_the_reference_scoring_sees_no_worker_secret_and_no_worker_process(
    worker_secrets: list[str], tmp_path: Path
) -> None:
    model = save_hostile_model(tmp_path / "model", "leak")
    scores = predict_in_process(model_dir=model, features=FEATURES, columns=COLUMNS, environment=None, timeout_s=300)
    whole = scores[0][0]
    seen = json.loads(whole)
    _assert_nothing_leaked(seen, worker_secrets, whole=whole)
    assert seen["uid"] != 0  # an unprivileged user in the sandbox


def test_without_the_sandbox_the_reference_scoring_still_gets_only_the_minimal_environment(
    worker_secrets: list[str], tmp_path: Path
) -> None:
    model = save_hostile_model(tmp_path / "model", "leak")
    scores = predict_in_process(
        model_dir=model,
        features=FEATURES,
        columns=COLUMNS,
        environment=None,
        timeout_s=300,
        sandbox=ModelSandbox("none"),
    )
    seen = json.loads(scores[0][0])
    # Its own environment is clean; without a sandbox, its parent's /proc is the platform's limit (docs/security.md).
    mine = json.dumps({"environ": seen["environ"], "self": seen["self"]})
    _assert_nothing_leaked({"environ": seen["environ"]}, worker_secrets, whole=mine)


def test_a_model_error_reaches_the_job_as_its_type_and_message_bounded_never_its_output(tmp_path: Path) -> None:
    model = save_hostile_model(tmp_path / "model", "raise")
    with pytest.raises(EnvironmentFailed) as failed:
        predict_in_process(model_dir=model, features=FEATURES, columns=COLUMNS, environment=None, timeout_s=300)
    detail = failed.value.detail
    prefix = "the model does not score its own input example in-process: "
    assert detail.startswith(prefix + "ValueError: the model refuses: xxx"), detail
    assert len(detail) - len(prefix) <= 300 and "JUNK" not in detail


def _served(model_dir: Path, name: str) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=name,
        version="1",
        run_id=None,
        source=str(model_dir),
        artifact_uri=str(model_dir),
        inputs=FEATURES,
        outputs=("leak",),
    )


@pytest.mark.integration  # starts MLServer
def test_the_local_model_server_sees_no_worker_secret_and_no_worker_process(
    worker_secrets: list[str], tmp_path: Path
) -> None:
    model = save_hostile_model(tmp_path / "model", "leak-to-file")
    deployer = LocalMLServerDeployer(work_dir=tmp_path / "deployments")
    name = "retro-sandboxtestleak"
    deployment = deployer.start(name=name, job_id="j1", model=_served(model, name))
    try:
        deployer.wait_ready(deployment, timeout_s=180, should_stop=lambda: False)
        inputs = [
            {"name": "tenure_months", "shape": [1], "datatype": "INT64", "data": [3]},
            {"name": "monthly_spend", "shape": [1], "datatype": "FP64", "data": [10.5]},
        ]
        answer = httpx.post(f"{deployment.base_url}/v2/models/{name}/infer", json={"inputs": inputs}, timeout=60)
        assert answer.status_code == 200, answer.text
        whole = (tmp_path / "deployments" / name / "seen.json").read_text()
        seen = json.loads(whole)
        _assert_nothing_leaked(seen, worker_secrets, whole=whole)
        assert seen["uid"] != 0
    finally:
        deployer.stop(name)
    assert not (tmp_path / "deployments" / name).exists()


@pytest.mark.integration  # starts MLServer
def test_a_model_server_that_fails_to_start_names_only_the_exception_bounded(tmp_path: Path) -> None:
    model = save_hostile_model(tmp_path / "model", "raise-on-load")
    deployer = LocalMLServerDeployer(work_dir=tmp_path / "deployments")
    name = "retro-sandboxtestraise"
    deployment = deployer.start(name=name, job_id="j2", model=_served(model, name))
    try:
        with pytest.raises(DeploymentFailed) as failed:
            deployer.wait_ready(deployment, timeout_s=180, should_stop=lambda: False)
    finally:
        deployer.stop(name)
    detail = failed.value.detail
    assert "ValueError: cannot load: yyy" in detail and "JUNK" not in detail, detail
    cause = detail.split("starting: ", 1)[1]
    assert len(cause) <= 300, len(cause)


# Through a real job: the API, a Celery worker, the registry.


def _register_folder(name: str, folder: Path) -> str:
    return register_model_folder(name, folder, tags={})


def test_a_job_whose_model_names_a_url_fails_preparing_its_environment_and_nothing_of_it_runs(
    stack: Stack, clean_marker: SdistIndex, tmp_path: Path
) -> None:
    import mlflow

    tracking = os.environ["RETRO_MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    source = client.get_model_version_download_uri("churn", "1")
    model = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "churn")))
    with (model / "requirements.txt").open("a") as fh:
        fh.write(f"\nmarkerpkg @ {clean_marker.sdist_url}\n")
    version = _register_folder("url_requirement", model)
    job = submit(stack, "sandbox-url", model_name="url_requirement", model_alias=None, model_version=version)
    done = stack.wait(job["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=300)
    assert done["state"] == "failed", done
    assert done["error"]["code"] == "environment_failed", done["error"]
    message = done["error"]["message"]
    assert "markerpkg @ http://127.0.0.1" in message and "names a URL" in message, message
    states = [s["state"] for s in done["stages"]]
    assert states[-2:] == ["preparing_environment", "failed"], states
    assert not clean_marker.marker.exists()
    assert done["files"] == [] and mlserver_processes_for(done["id"]) == []


def test_a_job_whose_model_raises_in_its_reference_shows_only_the_exception_bounded(
    stack: Stack, tmp_path: Path
) -> None:
    import cloudpickle
    import mlflow
    import numpy as np
    import pandas as pd
    import sklearn

    # The churn model's pins: its environment is the one the session's end-to-end jobs build (or reuse).
    pins = [
        f"mlflow=={mlflow.__version__}",
        f"scikit-learn=={sklearn.__version__}",
        f"pandas=={pd.__version__}",
        f"numpy=={np.__version__}",
        f"cloudpickle=={cloudpickle.__version__}",
    ]
    model = save_hostile_model(tmp_path / "model", "raise", pip_requirements=pins)
    version = _register_folder("raises_in_reference", model)
    job = submit(stack, "sandbox-raise", model_name="raises_in_reference", model_alias=None, model_version=version)
    done = stack.wait(job["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=900)
    assert done["state"] == "failed", done
    message = done["error"]["message"]
    prefix = "the model does not score its own input example in-process: "
    assert message.startswith(prefix + "ValueError: the model refuses: xxx"), message
    assert len(message) - len(prefix) <= 300 and "JUNK" not in message, message
    assert mlserver_processes_for(done["id"]) == []


def test_the_sandbox_cannot_read_a_file_outside_what_it_is_given(tmp_path: Path) -> None:
    """The worker's configuration files (here: one beside the model) are not in the sandbox's file system."""
    sandbox = ModelSandbox("auto")
    if not sandbox.active():
        pytest.skip("bubblewrap does not work on this machine")
    config = tmp_path / "worker.env"
    config.write_text(f"RETRO_SECRET_KEY={SECRET}\n")
    scratch = Path(tempfile.mkdtemp(dir=tmp_path))
    probe = "import sys\ntry:\n    print(open(sys.argv[1]).read())\nexcept OSError as e:\n    print(type(e).__name__)\n"
    argv = sandbox.command(
        ["/usr/bin/python3", "-c", probe, str(config)], cwd=scratch, writable=[scratch], network=False
    )
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout and "Error" in out.stdout, out.stdout
    shutil.rmtree(scratch)


@pytest.mark.parametrize("hidden", [True, False])
def test_without_a_sandbox_a_non_dumpable_worker_hides_its_environ_from_its_own_user(hidden: bool) -> None:
    """As the worker is (worker_init): a model process of the worker's user cannot read /proc/<worker>/environ."""
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run both processes as another user")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"]
    root = str(Path(__file__).resolve().parent.parent)
    worker_code = (
        f"import sys, time; sys.path.insert(0, {root!r})\n"
        "from app.integrations.environments.sandbox import hide_process_environment\n"
        f"print(hide_process_environment() if {hidden} else 'visible', flush=True); time.sleep(120)\n"
    )
    worker = subprocess.Popen(
        [*as_nobody, worker_code], stdout=subprocess.PIPE, text=True, env={"RETRO_SECRET_KEY": SECRET}
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() in ("True", "visible")
        model_code = (
            "import sys\ntry:\n    print(open('/proc/%s/environ' % sys.argv[1]).read())\n"
            "except OSError as e:\n    print(type(e).__name__)\n"
        )
        model = subprocess.run(
            [*as_nobody, model_code, str(worker.pid)], capture_output=True, text=True, timeout=60, env={}
        )
    finally:
        worker.kill()
        worker.wait()
    # The control case shows the model could read it; the hidden worker's is refused.
    assert (SECRET in model.stdout) is not hidden, model.stdout
    if hidden:
        assert "PermissionError" in model.stdout
