"""The holes of the outside review (issue 18), each kept closed by a test that failed before the fix."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from tests.conftest import make_user
from tests.test_oidc import issuer, sso_app, sso_sign_in  # noqa: F401  (fixtures)
from tests.web_helpers import csrf_of, sign_in

PASSWORD = "a long enough password"


def _browser(client, db_session, username: str, *, role: str = "account_manager") -> TestClient:  # type: ignore[no-untyped-def]
    make_user(db_session, username, role=role, password=PASSWORD)
    browser = TestClient(client.app)
    sign_in(browser, username, PASSWORD)
    return browser


# --- SSO never takes a local account by its name ---------------------------------------------------------------


def test_an_sso_identity_named_like_the_local_admin_does_not_become_it(sso_app, issuer, db_session) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from app.auth.models import User

    make_user(db_session, "Admin", role="admin", password=PASSWORD)
    db_session.commit()
    issuer.username = "admin"  # anyone may pick this name at some identity providers
    browser, resp = sso_sign_in(sso_app[0])
    assert resp.status_code == 403 and "may not sign in here" in resp.text
    assert browser.get("/api/v1/me").status_code == 401
    admin = db_session.scalars(select(User).where(User.username == "Admin")).one()
    db_session.refresh(admin)
    assert admin.oidc_subject is None
    browser.close()


# --- sessions end on sign-out, a new password, a new role, deactivation, and after their lifetimes -----------


def test_a_cookie_replayed_after_sign_out_is_refused(client, db_session) -> None:  # type: ignore[no-untyped-def]
    browser = _browser(client, db_session, "replayer")
    stolen = dict(browser.cookies)
    csrf = csrf_of(browser.get("/jobs").text)
    assert browser.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    with TestClient(client.app, cookies=stolen) as thief:
        assert thief.get("/api/v1/me").status_code == 401
        assert thief.get("/jobs", follow_redirects=False).status_code == 303  # to the sign-in page
    browser.close()


@pytest.mark.parametrize("change", [{"password": "another long password"}, {"role": "admin"}, {"is_active": False}])
def test_a_cookie_replayed_after_a_password_role_or_activation_change_is_refused(client, db_session, change) -> None:  # type: ignore[no-untyped-def]
    browser = _browser(client, db_session, "changer")
    me = browser.get("/api/v1/me").json()
    stolen = dict(browser.cookies)
    assert client.patch(f"/api/v1/users/{me['id']}", json=change).status_code == 200
    if "is_active" in change:
        assert client.patch(f"/api/v1/users/{me['id']}", json={"is_active": True}).status_code == 200
    with TestClient(client.app, cookies=stolen) as replay:
        assert replay.get("/api/v1/me").status_code == 401
    browser.close()


def test_sessions_end_after_their_idle_and_absolute_lifetimes(client, db_session, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import time

    from app.config import get_settings

    settings = get_settings()
    browser = _browser(client, db_session, "idler")
    start = int(time.time())
    assert browser.get("/api/v1/me").status_code == 200
    monkeypatch.setattr("app.auth.deps._now", lambda: start + settings.session_idle_s - 60)
    assert browser.get("/api/v1/me").status_code == 200  # in use: the idle clock starts again
    monkeypatch.setattr("app.auth.deps._now", lambda: start + 2 * settings.session_idle_s - 60)
    assert browser.get("/api/v1/me").status_code == 200
    monkeypatch.setattr("app.auth.deps._now", lambda: start + 3 * settings.session_idle_s + 60)
    assert browser.get("/api/v1/me").status_code == 401  # idle too long
    monkeypatch.undo()
    sign_in(browser, "idler", PASSWORD)
    monkeypatch.setattr("app.auth.deps._now", lambda: int(time.time()) + settings.session_max_age_s + 1)
    assert browser.get("/api/v1/me").status_code == 401  # past the absolute lifetime
    browser.close()


# --- sign-in throttling ------------------------------------------------------------------------------------


def _try_password(browser: TestClient, username: str, password: str) -> int:
    page = browser.get("/login")
    data = {"username": username, "password": password, "csrf_token": csrf_of(page.text)}
    return browser.post("/login", data=data, follow_redirects=False).status_code


def test_fifty_wrong_passwords_lock_the_account_for_a_while_not_for_ever(client, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.auth.models import SignInFailure

    make_user(db_session, "target", role="admin", password=PASSWORD)
    with TestClient(client.app) as attacker:
        answers = [_try_password(attacker, "TARGET", f"guess number {i}") for i in range(50)]
        assert answers[:5] == [401] * 5 and set(answers[5:]) == {429}
        assert _try_password(attacker, "target", PASSWORD) == 429  # the right one does not get through either
        page = attacker.post(
            "/login",
            data={"username": "target", "password": PASSWORD, "csrf_token": csrf_of(attacker.get("/login").text)},
        )
        assert "too many failed sign-ins" in page.text and int(page.headers["retry-after"]) <= 15 * 60
    # Locks run out: once they have, the right password works.
    db_session.execute(update(SignInFailure).values(locked_until=SignInFailure.locked_until - timedelta(hours=1)))
    with TestClient(client.app) as owner:
        assert _try_password(owner, "target", PASSWORD) == 303


# --- tokens ------------------------------------------------------------------------------------------------


def test_a_token_cannot_mint_a_token(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/tokens", json={"name": "child"})
    assert resp.status_code == 403 and "API token cannot" in resp.json()["detail"]


def test_tokens_expire_by_default_and_at_most_after_the_maximum(client, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.auth.models import ApiToken
    from app.clock import utcnow
    from app.config import get_settings

    settings = get_settings()
    browser = _browser(client, db_session, "tokenowner")
    csrf = {"X-CSRF-Token": csrf_of(browser.get("/jobs").text)}
    made = browser.post("/api/v1/tokens", json={"name": "default"}, headers=csrf).json()
    lives = made["expires_at"]
    assert lives is not None
    too_long = browser.post(
        "/api/v1/tokens", json={"name": "x", "expires_in_days": settings.api_token_max_days + 1}, headers=csrf
    )
    assert too_long.status_code == 422 and too_long.json()["field"] == "expires_in_days"
    as_text = browser.post("/api/v1/tokens", json={"name": "x", "expires_in_days": "7"}, headers=csrf)
    assert as_text.status_code == 422
    token = made["token"]
    with TestClient(client.app, headers={"Authorization": f"Bearer {token}"}) as holder:
        assert holder.get("/api/v1/me").status_code == 200
        db_session.execute(update(ApiToken).where(ApiToken.prefix == token[:12]).values(expires_at=utcnow()))
        expired = holder.get("/api/v1/me")
        assert expired.status_code == 401 and "expired" in expired.json()["detail"]
    browser.close()


def test_usernames_are_one_name_whatever_their_case(client, db_session) -> None:  # type: ignore[no-untyped-def]
    assert client.post("/api/v1/users", json={"username": "am2"}).status_code == 201
    twin = client.post("/api/v1/users", json={"username": "AM2"})
    assert twin.status_code == 409
    make_user(db_session, "Mixed", password=PASSWORD)
    with TestClient(client.app) as browser:
        assert _try_password(browser, "mIXED", PASSWORD) == 303
