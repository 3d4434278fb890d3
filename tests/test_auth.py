"""Sign-in, API tokens, roles and partner scoping through the REST API and the CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.conftest import ROOT, make_partner, make_user
from tests.test_retro_tests_api import request
from tests.web_helpers import csrf_of, sign_in, succeeded_job

NO_TOKEN_PATHS = [
    ("GET", "/api/v1/retro-tests"),
    ("POST", "/api/v1/retro-tests"),
    ("GET", "/api/v1/retro-tests/00000000-0000-0000-0000-000000000000"),
    ("GET", "/api/v1/partners"),
    ("POST", "/api/v1/partners"),
    ("GET", "/api/v1/models"),
    ("GET", "/api/v1/me"),
    ("GET", "/api/v1/users"),
    ("POST", "/api/v1/tokens"),
    ("GET", "/api/v1/retro-tests/00000000-0000-0000-0000-000000000000/links"),
]


@pytest.mark.parametrize(("method", "path"), NO_TOKEN_PATHS)
def test_api_without_a_token_is_a_401_json_error(client, method, path) -> None:  # type: ignore[no-untyped-def]
    with TestClient(client.app) as anonymous:
        resp = anonymous.request(method, path, json={})
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"] == "unauthorized" and "Bearer" in resp.json()["detail"]
    assert resp.headers["www-authenticate"] == "Bearer"


def test_health_docs_and_metrics_stay_open(client) -> None:  # type: ignore[no-untyped-def]
    with TestClient(client.app) as anonymous:
        for path in ("/health", "/ready", "/docs", "/openapi.json", "/metrics"):
            assert anonymous.get(path).status_code == 200, path


@pytest.mark.parametrize(
    "authorization",
    ["Bearer nope", "Bearer rtk_" + "A" * 43, "Basic dGVzdGVyOnRlc3Q=", "Bearer ", "bearer rtk_\x00"],
)
def test_bad_credentials_are_401(client, authorization) -> None:  # type: ignore[no-untyped-def]
    with TestClient(client.app) as anonymous:
        resp = anonymous.get("/api/v1/retro-tests", headers={"Authorization": authorization})
    assert resp.status_code == 401
    assert resp.json()["error"] == "unauthorized"


def test_tokens_are_random_stored_hashed_shown_once_and_revocable(client, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.auth.models import ApiToken

    make_user(db_session, "maker", password="a long enough password")
    browser = TestClient(client.app)  # tokens are made by a signed-in person, never by a token
    sign_in(browser, "maker", "a long enough password")
    csrf = {"X-CSRF-Token": csrf_of(browser.get("/jobs").text)}
    created = browser.post("/api/v1/tokens", json={"name": "laptop"}, headers=csrf)
    assert created.status_code == 201, created.text
    token = created.json()["token"]
    assert token.startswith("rtk_") and len(token) >= 4 + 43  # 32 random bytes, urlsafe base64
    row = db_session.get(ApiToken, uuid.UUID(created.json()["id"]))
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in {t.token_hash for t in db_session.scalars(select(ApiToken))}
    listed = browser.get("/api/v1/tokens").json()
    assert all("token" not in t for t in listed) and "laptop" in [t["name"] for t in listed]

    with TestClient(client.app, headers={"Authorization": f"Bearer {token}"}) as laptop:
        assert row.last_used_at is None
        assert laptop.get("/api/v1/me").json()["username"] == "maker"
        db_session.refresh(row)
        assert row.last_used_at is not None
        assert client.delete(f"/api/v1/tokens/{row.id}").status_code == 404  # not the admin's own token
        assert browser.delete(f"/api/v1/tokens/{row.id}", headers=csrf).status_code == 204
        assert laptop.get("/api/v1/me").status_code == 401
    assert client.delete(f"/api/v1/tokens/{uuid.uuid4()}").status_code == 404
    browser.close()


def test_a_deactivated_users_tokens_stop_working(client, db_session) -> None:  # type: ignore[no-untyped-def]
    token = make_user(db_session, "leaver", role="account_manager")
    with TestClient(client.app, headers={"Authorization": f"Bearer {token}"}) as leaver:
        me = leaver.get("/api/v1/me")
        assert me.status_code == 200
        assert client.patch(f"/api/v1/users/{me.json()['id']}", json={"is_active": False}).status_code == 200
        assert leaver.get("/api/v1/me").status_code == 401


def test_passwords_are_argon2_hashes(client, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.auth import service
    from app.auth.models import User

    resp = client.post("/api/v1/users", json={"username": "jane", "password": "correct horse battery"})
    assert resp.status_code == 201, resp.text
    assert resp.json()["role"] == "account_manager" and "password" not in resp.json()
    user = db_session.get(User, uuid.UUID(resp.json()["id"]))
    assert user.password_hash.startswith("$argon2id$") and "horse" not in user.password_hash
    assert service.authenticate(session=db_session, username="jane", password="correct horse battery") is not None
    assert service.authenticate(session=db_session, username="jane", password="wrong horse battery") is None
    assert service.authenticate(session=db_session, username="nobody", password="correct horse battery") is None
    short = client.post("/api/v1/users", json={"username": "joe", "password": "short"})
    assert short.status_code == 422 and short.json()["field"] == "password"
    again = client.post("/api/v1/users", json={"username": "jane"})
    assert again.status_code == 409


def test_the_last_admin_stays_an_admin(client, db_session) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import update

    from app.auth.models import User

    # Admins committed by other tests (the stacks' admins) are set aside inside this rolled-back transaction.
    db_session.execute(update(User).where(User.username != "tester").values(is_active=False))
    me = client.get("/api/v1/me").json()
    for change in ({"role": "account_manager"}, {"is_active": False}):
        resp = client.patch(f"/api/v1/users/{me['id']}", json=change)
        assert resp.status_code == 409 and "last active admin" in resp.json()["detail"]
    assert client.get("/api/v1/me").json()["role"] == "admin"
    created = client.post("/api/v1/users", json={"username": "second-admin", "role": "admin"}).json()
    assert created["role"] == "admin"
    assert client.patch(f"/api/v1/users/{me['id']}", json={"role": "account_manager"}).status_code == 200
    assert client.get("/api/v1/users").status_code == 403  # no longer an admin


def test_only_admins_manage_partners_and_users(client, account_manager_client) -> None:  # type: ignore[no-untyped-def]
    acme = make_partner(client, "acme")
    jane = account_manager_client("jane", ["acme"])
    for method, path, body in [
        ("POST", "/api/v1/partners", {"code": "new", "name": "New"}),
        ("PATCH", f"/api/v1/partners/{acme['id']}", {"name": "Renamed"}),
        ("DELETE", f"/api/v1/partners/{acme['id']}", None),
        ("PUT", f"/api/v1/partners/{acme['id']}/managers", {"usernames": ["jane"]}),
        ("GET", "/api/v1/users", None),
        ("POST", "/api/v1/users", {"username": "eve"}),
    ]:
        resp = jane.request(method, path, json=body)
        assert resp.status_code == 403, (method, path, resp.text)
        assert resp.json()["error"] == "forbidden"
    assert client.get(f"/api/v1/partners/{acme['id']}").json()["name"] == "ACME"


def test_admins_assign_account_managers_to_partners(client, account_manager_client) -> None:  # type: ignore[no-untyped-def]
    acme = make_partner(client, "acme")
    jane = account_manager_client("jane")
    assert jane.get("/api/v1/partners").json() == []
    assert jane.get("/api/v1/me").json()["partner_codes"] == []
    resp = client.put(f"/api/v1/partners/{acme['id']}/managers", json={"usernames": ["jane"]})
    assert resp.status_code == 200 and resp.json() == {"usernames": ["jane"]}
    assert [p["code"] for p in jane.get("/api/v1/partners").json()] == ["acme"]
    assert jane.get("/api/v1/me").json()["partner_codes"] == ["acme"]
    assert client.get(f"/api/v1/partners/{acme['id']}/managers").json() == {"usernames": ["jane"]}
    unknown = client.put(f"/api/v1/partners/{acme['id']}/managers", json={"usernames": ["ghost"]})
    assert unknown.status_code == 422 and "ghost" in unknown.json()["detail"]
    assert client.put(f"/api/v1/partners/{acme['id']}/managers", json={"usernames": []}).status_code == 200
    assert jane.get("/api/v1/partners").json() == []


def test_an_account_manager_never_sees_another_partners_jobs(client, account_manager_client, db_session) -> None:  # type: ignore[no-untyped-def]
    make_partner(client, "acme")
    globex = make_partner(client, "globex")
    mine = client.post("/api/v1/retro-tests", json=request()).json()
    theirs = client.post("/api/v1/retro-tests", json=request(partner_code="globex")).json()
    done = succeeded_job(db_session, "globex", {"scores.parquet": b"globex secret"})
    jane = account_manager_client("jane", ["acme"])

    page = jane.get("/api/v1/retro-tests").json()
    assert [j["id"] for j in page["items"]] == [mine["id"]] and page["total"] == 1
    assert jane.get("/api/v1/retro-tests", params={"partner": "globex"}).json()["total"] == 0
    assert [p["code"] for p in jane.get("/api/v1/partners").json()] == ["acme"]
    assert jane.get(f"/api/v1/partners/{globex['id']}").status_code == 404

    for job_id in (theirs["id"], str(done.id)):
        unknown = f"no retro test with id {job_id}"
        for method, path in [
            ("GET", f"/api/v1/retro-tests/{job_id}"),
            ("POST", f"/api/v1/retro-tests/{job_id}/cancel"),
            ("GET", f"/api/v1/retro-tests/{job_id}/files/scores.parquet"),
            ("POST", f"/api/v1/retro-tests/{job_id}/links"),
            ("GET", f"/api/v1/retro-tests/{job_id}/links"),
            ("GET", f"/api/v1/retro-tests/{job_id}/downloads"),
        ]:
            resp = jane.request(method, path, json={} if method == "POST" else None)
            assert resp.status_code == 404, (method, path, resp.text)
            assert resp.json() == {"error": "not_found", "detail": unknown}
    assert client.get(f"/api/v1/retro-tests/{theirs['id']}").json()["state"] == "queued"  # not cancelled

    refused = jane.post("/api/v1/retro-tests", json=request(partner_code="globex"))
    nobody = jane.post("/api/v1/retro-tests", json=request(partner_code="nobody"))
    assert refused.status_code == nobody.status_code == 422
    assert refused.json()["error"] == "partner_not_found" and refused.json()["field"] == "partner_code"
    assert (
        refused.json()["detail"]
        == "no partner with code 'globex' is assigned to you (an admin can add it or assign it to you)"
    )
    assert nobody.json()["detail"] == refused.json()["detail"].replace("globex", "nobody")

    own = jane.post("/api/v1/retro-tests", json=request(period_start=request()["period_end"]))
    assert own.status_code == 202 and own.json()["requested_by"] == "jane"
    assert jane.post(f"/api/v1/retro-tests/{own.json()['id']}/cancel").status_code == 202


def test_a_signed_in_browser_session_works_for_the_api_with_its_csrf_header(client, db_session) -> None:  # type: ignore[no-untyped-def]
    make_user(db_session, "webby", role="admin", password="a long enough password")
    with TestClient(client.app) as browser:
        sign_in(browser, "webby", "a long enough password")
        assert browser.get("/api/v1/me").json()["username"] == "webby"
        csrf = csrf_of(browser.get("/jobs").text)
        body = {"code": "viaweb", "name": "Via Web"}
        missing = browser.post("/api/v1/partners", json=body)
        wrong = browser.post("/api/v1/partners", json=body, headers={"X-CSRF-Token": "x" * 43})
        assert missing.status_code == wrong.status_code == 403
        assert missing.json()["error"] == "forbidden" and "X-CSRF-Token" in missing.json()["detail"]
        assert browser.post("/api/v1/partners", json=body, headers={"X-CSRF-Token": csrf}).status_code == 201


def test_cli_creates_the_first_admin_and_prints_a_token_once(client, database_url) -> None:  # type: ignore[no-untyped-def]
    from app.auth.models import ApiToken, User
    from app.db import get_session_factory
    from app.main import create_app

    name = f"root-{uuid.uuid4().hex[:6]}"
    cli = [sys.executable, "-m", "app.cli"]
    env = dict(os.environ)
    made = subprocess.run(
        [*cli, "create-admin", "--username", name, "--password-stdin"],
        input="a very long passphrase\n",
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    again = subprocess.run(
        [*cli, "create-admin", "--username", name, "--password-stdin"],
        input="a very long passphrase\n",
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1 and "already exists" in again.stderr
    short = subprocess.run(
        [*cli, "create-admin", "--username", "x", "--password-stdin"], input="short\n", env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert short.returncode == 2 and "password" in short.stderr
    token_run = subprocess.run(
        [*cli, "create-token", "--username", name], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert token_run.returncode == 0, token_run.stderr
    token = token_run.stdout.strip()
    assert token.startswith("rtk_") and "shown only now" in token_run.stderr
    with TestClient(create_app(), headers={"Authorization": f"Bearer {token}"}) as api:  # the real database
        me = api.get("/api/v1/me").json()
        assert me["username"] == name and me["role"] == "admin" and me["partner_codes"] is None
    with get_session_factory()() as s:
        user = s.scalars(select(User).where(User.username == name)).one()
        assert user.password_hash is not None and user.password_hash.startswith("$argon2id$")
        assert s.scalars(select(ApiToken).where(ApiToken.user_id == user.id)).one().token_hash != token
        s.delete(user)
        s.commit()
    missing = subprocess.run(
        [*cli, "create-token", "--username", "nobody-here"], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1 and missing.stdout == ""
