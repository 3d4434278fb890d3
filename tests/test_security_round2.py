"""The findings of the second outside review (issue 26, N6-N15 and the informational ones), each kept closed by a
test that failed before the fix."""

from __future__ import annotations

import gzip
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.conftest import make_partner, make_user
from tests.test_security import LiveApi
from tests.web_helpers import csrf_of, succeeded_job

PASSWORD = "a long enough password"
EVIL = ['=HYPERLINK("http://evil.example","click")', "=cmd|' /C calc'!A0", "+1", "@SUM(A1)", "plain"]


def _job_with(client, db_session, files: dict[str, tuple[str, str, bytes]]):  # type: ignore[no-untyped-def]
    """A succeeded job of partner acme with these files: name -> (kind, format, bytes)."""
    from app.core.jobs import ResultFile

    make_partner(client, "acme")
    job = succeeded_job(db_session, "acme", {name: blob for name, (_, _, blob) in files.items()})
    for name, (kind, fmt, _) in files.items():
        db_session.execute(
            update(ResultFile)
            .where(ResultFile.retro_test_id == job.id, ResultFile.name == name)
            .values(kind=kind, format=fmt)
        )
    db_session.flush()
    db_session.expire_all()
    return job


def _partner_path(client, job) -> str:  # type: ignore[no-untyped-def]
    resp = client.post(f"/api/v1/retro-tests/{job.id}/links", json={"expires_in_days": 7})
    assert resp.status_code == 201, resp.text
    return "/d/" + resp.json()["url"].rsplit("/d/", 1)[1]


# --- N8: every CSV the service writes is neutralised ------------------------------------------------------------


def test_unmatched_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app.integrations.storage.results import ResultStore
    from worker.publish import _write_unmatched

    store = ResultStore(str(tmp_path))
    batch = pa.record_batch({"customer_id": EVIL, "reason": ["no history"] * len(EVIL)})
    source = SimpleNamespace(unmatched=lambda query, batch_rows: iter([batch]))
    run: Any = SimpleNamespace(
        adapters=SimpleNamespace(store=store, source=source),
        spec=SimpleNamespace(prefix="job"),
        settings=SimpleNamespace(read_batch_rows=1000),
    )
    assert _write_unmatched(run, SimpleNamespace()) == len(EVIL)  # type: ignore[arg-type]
    with store.open_read("job/unmatched.csv.gz") as fh:
        cells = pacsv.read_csv(pa.py_buffer(gzip.decompress(fh.read()))).column("customer_id").to_pylist()
    assert cells == ["'" + v for v in EVIL[:4]] + ["plain"]


# --- N10: requirements.lock is for staff -------------------------------------------------------------------


def test_requirements_lock_is_neither_listed_nor_served_to_partners_but_staff_still_get_it(client, db_session) -> None:  # type: ignore[no-untyped-def]
    lock = b"# Python 3.11.9\nnumpy==1.26.4\n"
    job = _job_with(
        client,
        db_session,
        {"scores.parquet": ("scores", "parquet", b"PAR1"), "requirements.lock": ("environment", "txt", lock)},
    )
    path = _partner_path(client, job)
    with TestClient(client.app) as partner:
        page = partner.get(path)
        assert page.status_code == 200 and "scores.parquet" in page.text
        assert "requirements.lock" not in page.text
        assert partner.get(path + "/requirements.lock").status_code == 404
    staff = client.get(f"/api/v1/retro-tests/{job.id}").json()
    assert "requirements.lock" in {f["name"] for f in staff["files"]}
    assert client.get(f"/api/v1/retro-tests/{job.id}/files/requirements.lock").content == lock


def test_the_partner_manifest_does_not_list_requirements_lock() -> None:
    from worker.publish import partner_manifest

    files = [
        {"name": n, "kind": k}
        for n, k in [("scores.parquet", "scores"), ("requirements.lock", "environment"), ("m.json", "staff_manifest")]
    ]
    manifest = {
        "retro_test": {"id": "x", "created_at": "t"},
        "model": {"name": "churn", "version": "1"},
        "source": {"id_columns": ["customer_id"]},
        "period": {},
        "rows": {},
        "files": files,
        "published_at": "t",
    }
    assert [f["name"] for f in partner_manifest(manifest)["files"]] == ["scores.parquet"]


# --- report.html may not be framed by another site -------------------------------------------------------------


def test_report_html_may_not_be_framed_wherever_it_is_served(client, db_session) -> None:  # type: ignore[no-untyped-def]
    job = _job_with(client, db_session, {"report.html": ("report", "html", b"<!doctype html><p>report</p>")})
    path = _partner_path(client, job)
    with TestClient(client.app) as partner:
        answers = [partner.get(path + "/report.html"), client.get(f"/api/v1/retro-tests/{job.id}/files/report.html")]
    for resp in answers:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
        assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]
        assert resp.headers["x-frame-options"] == "DENY"


# --- N15: prod refuses guessable keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret",
    [
        "abcdefghijklmnopqrstuvwxyz012345",  # a sequence
        "zyxwvutsrqponmlkjihgfedcba9876543210",  # backwards
        "qwertyuiopasdfghjklzxcvbnm1234567890",  # keyboard rows
        "йцукенгшщзхъфывапролджэячсмитьбю",  # the Russian ones
        "a1b2c3d4e5f6g7h8" * 3,  # a repeated pattern
        "correct-horse-battery-staple-password-monkey",  # words
        "Tr0ub4dor&3-P@ssw0rd-Dragon-Sunshine-2026!",  # words in leet
    ],
)
def test_prod_refuses_sequences_keyboard_rows_repeats_and_words(secret: str) -> None:
    from pydantic import SecretStr

    from app.config import Settings

    with pytest.raises(RuntimeError, match="RETRO_SECRET_KEY"):
        Settings(env="prod", secret_key=SecretStr(secret)).check_secrets()


def test_prod_still_takes_random_keys_of_either_common_form() -> None:
    import secrets

    from pydantic import SecretStr

    from app.config import Settings, secret_key_problem

    settings = Settings(env="prod")
    for _ in range(2000):
        assert secret_key_problem(secrets.token_urlsafe(32)) is None
        assert secret_key_problem(secrets.token_hex(32)) is None
    settings.secret_key = SecretStr(secrets.token_urlsafe(32))
    settings.check_secrets()


# --- N12: a NUL in the sign-in form is a form error, not a 500 ---------------------------------------------------


@pytest.mark.parametrize(
    "fields", [{"username": "ad\x00min"}, {"password": "pass\x00word"}, {"username": "x\x00", "password": "\x00"}]
)
def test_a_nul_in_the_sign_in_form_is_a_form_error(client, db_session, fields) -> None:  # type: ignore[no-untyped-def]
    make_user(db_session, "admin", role="admin", password=PASSWORD)
    with TestClient(client.app, raise_server_exceptions=False) as browser:
        data = {"username": "admin", "password": PASSWORD, "csrf_token": csrf_of(browser.get("/login").text), **fields}
        resp = browser.post("/login", data=data, follow_redirects=False)
    assert 400 <= resp.status_code < 500 and "Wrong username or password" in resp.text


# --- N6: X-Forwarded-For counts only from RETRO_TRUSTED_PROXIES --------------------------------------------------


def _try_password(browser: Any, username: str, password: str, **headers: str) -> int:
    page = browser.get("/login")
    data = {"username": username, "password": password, "csrf_token": csrf_of(page.text)}
    return int(browser.post("/login", data=data, headers=headers, follow_redirects=False).status_code)


def _serve_as_retrotest_serve_does(app, monkeypatch):  # type: ignore[no-untyped-def]
    """The app under uvicorn with the options `retrotest serve` gives it (and uvicorn's defaults for the rest)."""
    import uvicorn
    from typer.testing import CliRunner

    from app.cli import app as cli

    given: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda target, **kwargs: given.update(kwargs))
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    assert CliRunner().invoke(cli, ["serve", "--skip-migrations"]).exit_code == 0
    options = {k: v for k, v in given.items() if k not in ("host", "port", "workers", "log_config", "log_level")}
    return LiveApi(app, **options)


def test_a_forged_x_forwarded_for_from_loopback_gets_no_fresh_tries(client, db_session, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import httpx

    make_user(db_session, "target", role="admin", password=PASSWORD)
    live = _serve_as_retrotest_serve_does(client.app, monkeypatch)
    try:
        with httpx.Client(base_url=live.url, timeout=30) as attacker:
            answers = [
                _try_password(attacker, "target", f"guess {i}", **{"X-Forwarded-For": f"198.51.100.{i}"})
                for i in range(7)
            ]
    finally:
        live.stop()
    assert answers[:5] == [401] * 5 and answers[5:] == [429, 429]  # still one address: 5 wrong passwords, not 50


def test_only_trusted_proxies_say_who_the_client_is_read_from_the_right(client, db_session) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from app.audit.models import AuditEvent
    from app.client_address import TrustedProxies

    make_user(db_session, "walker", role="admin", password=PASSWORD)
    behind = TrustedProxies(client.app, trusted=["127.0.0.0/8", "10.0.0.0/8"])
    live = LiveApi(behind, proxy_headers=False)
    try:
        with httpx.Client(base_url=live.url, timeout=30) as browser:
            # The client wrote the leftmost entry itself; our proxies appended the others.
            forged = {"X-Forwarded-For": "1.2.3.4, 203.0.113.9, 10.1.2.3"}
            assert _try_password(browser, "walker", PASSWORD, **forged) == 303
    finally:
        live.stop()
    event = db_session.query(AuditEvent).filter_by(action="user.sign_in", actor="walker").one()
    assert event.detail["ip"] == "203.0.113.9"


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "client"),
    [
        ([], "127.0.0.1", "203.0.113.9", "127.0.0.1"),  # the default: nobody's header counts
        (["10.0.0.0/8"], "10.0.0.5", "203.0.113.9, 10.0.0.7", "203.0.113.9"),
        (["10.0.0.0/8"], "10.0.0.5", "10.0.0.6, 10.0.0.7", "10.0.0.6"),  # all trusted: the leftmost
        (["10.0.0.0/8"], "10.0.0.5", "not-an-ip, 10.0.0.7", "10.0.0.7"),
        (["10.0.0.0/8"], "192.0.2.1", "203.0.113.9", "192.0.2.1"),  # an untrusted peer's header is ignored
        (["10.0.0.0/8"], "10.0.0.5", "", "10.0.0.5"),
        (["::1", "fd00::/8"], "::1", "2001:db8::7, fd00::3", "2001:db8::7"),
    ],
)
def test_client_host_walks_the_chain_right_to_left(trusted: list[str], peer: str, forwarded: str, client: str) -> None:
    from app.client_address import client_host, parse_networks

    assert client_host(peer=peer, forwarded_for=forwarded, trusted=parse_networks(trusted)) == client


def test_a_trusted_proxy_that_is_no_address_is_refused_with_the_settings() -> None:
    from pydantic import ValidationError

    from app.config import Settings

    with pytest.raises(ValidationError, match=r"proxy\.example"):
        Settings(trusted_proxies=["10.0.0.0/8", "proxy.example"])
    assert Settings(trusted_proxies=["10.0.0.0/8", "::1"]).trusted_proxies == ["10.0.0.0/8", "::1"]


# --- N7: a shared address throttles wrong guesses and never shuts out a right password ----------------------


def test_wrong_passwords_from_a_shared_address_do_not_lock_out_the_others(client, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.auth.models import SignInFailure
    from app.config import get_settings

    bar = get_settings().sign_in_address_max_failures
    make_user(db_session, "victim", role="account_manager", password=PASSWORD)
    with TestClient(client.app) as proxy:  # everyone comes through one address
        answers = [_try_password(proxy, f"nobody{i}", "wrong") for i in range(bar)]
        assert answers == [401] * bar
        assert _try_password(proxy, "someone-else", "wrong") == 429  # wrong guesses are throttled now
        assert _try_password(proxy, "victim", PASSWORD) == 303  # a right password still gets in
        assert _try_password(proxy, "victim", "wrong") == 429
        # The victim's account now has a failure of its own: while the address is throttled, it waits too.
        assert _try_password(proxy, "victim", PASSWORD) == 429
        # The throttle runs out; one wrong guess after it does not start it again.
        expired = update(SignInFailure).where(SignInFailure.key == "address:testclient")
        db_session.execute(expired.values(locked_until=SignInFailure.locked_until - timedelta(hours=1)))
        assert [_try_password(proxy, "nobody", "wrong") for _ in range(3)] == [401] * 3
        assert _try_password(proxy, "victim", PASSWORD) == 303
        # Only another bar's worth of failures throttles again, and for longer.
        more = [_try_password(proxy, f"other{i}", "wrong") for i in range(bar - 3)]
        assert more == [401] * (bar - 3)
        page = proxy.post(
            "/login", data={"username": "x", "password": "wrong", "csrf_token": csrf_of(proxy.get("/login").text)}
        )
        assert page.status_code == 429 and int(page.headers["retry-after"]) > get_settings().sign_in_address_lock_s


# --- N11: strict types: JSON ints are ints, dates are exactly YYYY-MM-DD, paging is digits -----------------------


@pytest.mark.parametrize("days", ["1", 1.0, True])
def test_lookback_days_must_be_a_json_integer(client, days) -> None:  # type: ignore[no-untyped-def]
    import json

    from app.errors import Invalid
    from app.retro_tests.router import parse_request_json
    from tests.test_retro_tests_api import request

    make_partner(client, "acme")
    resp = client.post("/api/v1/retro-tests", json=request(lookback_days=days))
    assert resp.status_code == 422 and resp.json().get("field") == "lookback_days", resp.text
    with pytest.raises(Invalid) as refused:  # the multipart route's JSON part
        parse_request_json(json.dumps(request(lookback_days=days)))
    assert refused.value.field == "lookback_days"
    assert parse_request_json(json.dumps(request(lookback_days=1))).lookback_days == 1


@pytest.mark.parametrize("day", ["2026-10-05T00:00:00", "2026-10-05 00:00", "20261005", " 2026-10-05", "2026-10-05Z"])
def test_dates_must_be_exactly_yyyy_mm_dd(client, day: str) -> None:  # type: ignore[no-untyped-def]
    from tests.test_retro_tests_api import request

    make_partner(client, "acme")
    resp = client.post("/api/v1/retro-tests", json=request(period_start=day))
    assert resp.status_code == 422 and resp.json()["field"] == "period_start"


@pytest.mark.parametrize("query", ["limit=10.0", "offset=1.0", "limit=1e1", "limit=%2010", "limit=true"])
def test_paging_parameters_must_be_whole_numbers(client, query: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.get(f"/api/v1/retro-tests?{query}")
    assert resp.status_code == 422, resp.text
    assert client.get("/api/v1/retro-tests?limit=10&offset=0").status_code == 200


def test_the_web_list_page_number_must_be_a_whole_number(client, db_session) -> None:  # type: ignore[no-untyped-def]
    make_user(db_session, "pager", role="admin", password=PASSWORD)
    with TestClient(client.app) as browser:
        from tests.web_helpers import sign_in

        sign_in(browser, "pager", PASSWORD)
        assert browser.get("/jobs?page=2.0").status_code == 422
        assert browser.get("/jobs?page=1").status_code == 200


# --- N13: no server paths in answers to account managers ---------------------------------------------------------


def test_an_unknown_history_table_is_refused_without_naming_the_history_folder(client) -> None:  # type: ignore[no-untyped-def]
    from app.config import get_settings
    from tests.test_retro_tests_api import request

    make_partner(client, "acme")
    resp = client.post("/api/v1/retro-tests", json=request(source={"table": "features.nowhere"}))
    assert resp.status_code == 422 and "features.nowhere" in resp.json()["detail"]
    history_dir = str(get_settings().resolved_history_dir())
    assert history_dir not in resp.text and "<server path>" not in resp.text


def test_an_error_naming_a_server_path_reaches_people_without_it(client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app.errors import SourceUnknown
    from tests.test_retro_tests_api import request

    def missing(**_: object) -> None:
        raise SourceUnknown("history table 'x' not found: no folder /srv/retro/history/features/x", field="source")

    make_partner(client, "acme")
    monkeypatch.setattr(
        "app.integrations.history.local.LocalParquetSource.history_days", lambda self, **kw: missing(**kw)
    )
    resp = client.post("/api/v1/retro-tests", json=request())
    assert resp.status_code == 422 and "/srv/retro" not in resp.text and "not found" in resp.json()["detail"]


def test_job_json_shows_account_managers_no_file_uris_and_admins_all(
    client, db_session, account_manager_client
) -> None:  # type: ignore[no-untyped-def]
    from app.core.jobs import RetroTest

    job = _job_with(client, db_session, {"scores.parquet": ("scores", "parquet", b"PAR1")})
    db_session.execute(
        update(RetroTest)
        .where(RetroTest.id == job.id)
        .values(
            model_uri="file:///srv/mlflow/1/0123abcd/artifacts/model",
            result_location="file:///var/lib/retrotest/results/acme/x",
            environment={"python": "3.11.9", "warnings": ["no Python 3.10 here: took /usr/bin/python3.11"]},
        )
    )
    db_session.flush()
    jane = account_manager_client("jane-paths", ["acme"])
    for answer in (jane.get(f"/api/v1/retro-tests/{job.id}"), jane.get("/api/v1/retro-tests")):
        assert answer.status_code == 200
        assert "/srv/" not in answer.text and "/var/lib" not in answer.text and "/usr/bin" not in answer.text
        assert "file://" not in answer.text
    staff = client.get(f"/api/v1/retro-tests/{job.id}").json()
    assert staff["model_uri"].startswith("file:///srv/mlflow") and staff["result_location"].startswith("file:///var")


# --- N14: the k8s check never prints secret material ----------------------------------------------------------


class _OneSecret:
    """Just enough of CustomResources for the storage check: one Secret in one namespace."""

    namespace = "retro"

    def __init__(self, data: dict[str, str]) -> None:
        self.data = data

    def get_core(self, kind: object, name: str) -> dict[str, Any]:
        return {"metadata": {"name": name}, "data": self.data}


@pytest.mark.parametrize(
    "config",
    [
        b'name: s3\ntype: s3\nparameters: {secret_access_key: "SECRETs3cr3tVALUE, access_key_id: AKIAEXAMPLEKEY\n',
        b"name: s3\nparameters:\n  secret_access_key: SECRETs3cr3tVALUE\n   access_key_id: AKIAEXAMPLEKEY\n\t",
        b"SECRETs3cr3tVALUE\xff\xfe",
    ],
)
def test_the_k8s_check_names_a_broken_secret_without_printing_it(config: bytes) -> None:
    import base64

    from app.config import Settings
    from app.integrations.deployers.kubernetes_check import _checks

    settings = Settings(deployer="seldon_v2", k8s_storage_secret="retro-storage", model_staging_url="s3://b/x")
    secret = _OneSecret({"rclone.yaml": base64.b64encode(config).decode()})
    results = {}
    for result in _checks(settings=settings, resources=secret):  # type: ignore[arg-type]
        results[result.name] = result
        if result.name == "storage credentials":
            break
    found = results["storage credentials"]
    assert "SECRET" not in found.detail and "AKIA" not in found.detail, found.detail
    assert not found.ok and "retro-storage" in found.detail and "rclone.yaml" in found.detail


def test_the_k8s_check_prints_a_config_name_only_when_it_is_a_plain_name() -> None:
    import base64

    from app.config import Settings
    from app.integrations.deployers.kubernetes_check import _checks

    settings = Settings(deployer="seldon_v2", k8s_storage_secret="retro-storage", model_staging_url="s3://b/x")
    config = b'{"name": "AKIAEXAMPLEKEY SECRETs3cr3tVALUE", "type": "s3"}'
    secret = _OneSecret({"rclone.json": base64.b64encode(config).decode()})
    found = next(r for r in _checks(settings=settings, resources=secret) if r.name == "storage credentials")  # type: ignore[arg-type]
    assert not found.ok and "SECRET" not in found.detail and "32 characters" in found.detail


# --- API tokens end with a password reset -------------------------------------------------------------------


def test_a_password_reset_by_an_admin_revokes_the_users_api_tokens(client, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.audit.models import AuditEvent

    token = make_user(db_session, "leaky", role="account_manager", password=PASSWORD)
    other = make_user(db_session, "bystander", role="account_manager", password=PASSWORD)
    with TestClient(client.app, headers={"Authorization": f"Bearer {token}"}) as script:
        me = script.get("/api/v1/me")
        assert me.status_code == 200
        assert client.patch(f"/api/v1/users/{me.json()['id']}", json={"role": "account_manager"}).status_code == 200
        assert script.get("/api/v1/me").status_code == 200  # other changes leave tokens alone
        assert (
            client.patch(f"/api/v1/users/{me.json()['id']}", json={"password": "a new long password"}).status_code
            == 200
        )
        assert script.get("/api/v1/me").status_code == 401
    with TestClient(client.app, headers={"Authorization": f"Bearer {other}"}) as bystander:
        assert bystander.get("/api/v1/me").status_code == 200  # only that user's tokens
    events = db_session.query(AuditEvent).filter_by(action="api_token.revoke", subject_id=me.json()["id"]).all()
    assert [e.detail["reason"] for e in events] == ["password reset"] and events[0].actor == "tester"
