"""OIDC sign-in against a fake issuer on loopback: discovery, JWKS, the code flow with PKCE, and every refusal."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from tests.conftest import make_user
from tests.oidc_issuer import FakeIssuer


@pytest.fixture()
def issuer() -> Iterator[FakeIssuer]:
    fake = FakeIssuer().start()
    yield fake
    fake.stop()


@pytest.fixture()
def sso_app(client, issuer):  # type: ignore[no-untyped-def]
    """The test app with OIDC pointed at the fake issuer."""
    from app.config import Settings, get_settings

    settings = Settings(
        oidc_issuer=issuer.url,
        oidc_client_id=issuer.client_id,
        oidc_client_secret=SecretStr(issuer.client_secret),
        public_base_url="http://testserver",
    )
    client.app.dependency_overrides[get_settings] = lambda: settings
    yield client.app, settings
    client.app.dependency_overrides.pop(get_settings, None)


def sso_sign_in(app: Any, *, tamper_state: bool = False) -> tuple[TestClient, httpx.Response]:
    """Start sign-in, let the fake issuer answer over HTTP, come back to the callback; returns the browser."""
    browser = TestClient(app)
    start = browser.get("/auth/oidc/start", params={"next": "/partners"}, follow_redirects=False)
    assert start.status_code == 303, start.text
    authorize = start.headers["location"]
    query = parse_qs(urlparse(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and query["redirect_uri"] == [
        "http://testserver/auth/oidc/callback"
    ]
    back = httpx.get(authorize, follow_redirects=False)  # real HTTP to the fake issuer
    assert back.status_code == 302, back.text
    callback = urlparse(back.headers["location"])
    assert callback.path == "/auth/oidc/callback"
    params = {k: v[0] for k, v in parse_qs(callback.query).items()}
    if tamper_state:
        params["state"] = params["state"][:-2] + "xx"
    return browser, browser.get(callback.path, params=params, follow_redirects=False)


def test_sso_signs_in_and_creates_an_account_manager(sso_app, issuer, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.auth.models import Role, User

    app, _ = sso_app
    with TestClient(app) as anonymous:
        assert "Sign in with single sign-on" in anonymous.get("/login").text
    browser, resp = sso_sign_in(app)
    assert resp.status_code == 303 and resp.headers["location"] == "/partners"
    assert "sso-user" in browser.get("/partners").text
    user = db_session.scalars(select(User).where(User.username == "sso-user")).one()
    assert user.role == Role.account_manager and user.password_hash is None
    assert user.oidc_subject == f"{issuer.url} {issuer.subject}"
    browser2, again = sso_sign_in(app)  # the same identity signs in as the same user
    assert again.status_code == 303
    assert len(db_session.scalars(select(User).where(User.username == "sso-user")).all()) == 1
    browser.close()
    browser2.close()


def test_sso_signs_in_a_local_user_only_once_an_admin_linked_the_identity(sso_app, issuer, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.auth import service
    from app.auth.models import User

    make_user(db_session, "sso-user", role="admin", password="a long enough password")
    db_session.commit()  # the refused sign-in rolls its own work back, not the test's
    user = db_session.scalars(select(User).where(User.username == "sso-user")).one()
    browser0, unlinked = sso_sign_in(sso_app[0])  # the name alone proves nothing
    assert unlinked.status_code == 403 and user.oidc_subject is None
    browser0.close()
    service.link_oidc_identity(session=db_session, user=user, subject=f"{issuer.url} {issuer.subject}", actor="t")
    browser, resp = sso_sign_in(sso_app[0])
    assert resp.status_code == 303
    assert user.is_admin and user.oidc_subject is not None
    issuer.subject = "someone-else"  # another identity claiming the same username is refused
    browser2, refused = sso_sign_in(sso_app[0])
    assert refused.status_code == 403 and "may not sign in here" in refused.text
    browser.close()
    browser2.close()


@pytest.mark.parametrize(
    ("misbehave", "words"),
    [
        ({"sign_with_other_key": True}, "Signature verification failed"),
        ({"hs256_with_client_secret": True}, "not valid"),
        ({"claims_override": {"aud": "another-client"}}, "Audience doesn't match"),
        ({"claims_override": {"iss": "http://127.0.0.1:1/evil"}}, "Invalid issuer"),
        ({"claims_override": {"exp": int(time.time()) - 3600}}, "Signature has expired"),
        ({"claims_override": {"nonce": "replayed"}}, "nonce mismatch"),
        ({"username": "bad name!"}, "no usable 'preferred_username'"),
    ],
)
def test_sso_refuses_tokens_that_do_not_verify(sso_app, issuer, db_session, misbehave, words) -> None:  # type: ignore[no-untyped-def]
    from app.auth.models import User

    for key, value in misbehave.items():
        setattr(issuer, key, value)
    browser, resp = sso_sign_in(sso_app[0])
    assert resp.status_code in (401, 403), resp.text
    assert words in resp.text.replace("&#39;", "'")
    assert browser.get("/jobs", follow_redirects=False).status_code == 303  # not signed in
    # Nobody was linked to this issuer (other tests' users may carry other issuers' subjects).
    assert db_session.scalars(select(User).where(User.oidc_subject.startswith(f"{issuer.url} "))).all() == []
    browser.close()


def test_sso_refuses_an_answer_to_a_sign_in_it_did_not_start(sso_app, issuer) -> None:  # type: ignore[no-untyped-def]
    browser, resp = sso_sign_in(sso_app[0], tamper_state=True)
    assert resp.status_code == 401 and "does not belong to a sign-in started here" in resp.text
    assert issuer.token_requests == 0  # the code was never even traded
    browser.close()
    with TestClient(sso_app[0]) as stranger:
        forged = stranger.get("/auth/oidc/callback", params={"code": "x", "state": "y"}, follow_redirects=False)
        assert forged.status_code == 401


def test_sso_can_be_limited_to_existing_users(sso_app, db_session) -> None:  # type: ignore[no-untyped-def]
    app, settings = sso_app
    settings.oidc_create_users = False
    browser, resp = sso_sign_in(app)
    assert resp.status_code == 403 and "may not sign in here" in resp.text
    browser.close()


def test_sso_is_off_unless_configured(client) -> None:  # type: ignore[no-untyped-def]
    with TestClient(client.app) as anonymous:
        assert "single sign-on" not in anonymous.get("/login").text
        assert anonymous.get("/auth/oidc/start", follow_redirects=False).status_code == 404
