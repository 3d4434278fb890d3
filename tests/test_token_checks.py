"""Recent API token checks (app/auth/token_checks.py): reads reuse a check for RETRO_API_TOKEN_CACHE_S, changes
never do, and a change made through this process takes effect at once."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.auth import token_checks
from app.auth.models import User
from app.auth.token_checks import RecentTokenChecks, TokenCheck
from app.clock import utcnow
from app.core.scope import ALL_PARTNERS
from tests.conftest import make_partner, make_user


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(token_checks.time, "monotonic", fake)
    return fake


def check(name: str) -> TokenCheck:
    return TokenCheck(user=User(username=name), scope=ALL_PARTNERS)


def test_a_check_holds_for_its_lifetime_and_never_past_the_tokens_expiry(clock: Clock) -> None:
    checks = RecentTokenChecks(ttl_s=10)
    checks.put("a", check("a"), token_expires_at=utcnow() + timedelta(days=30))
    checks.put("b", check("b"), token_expires_at=utcnow() + timedelta(seconds=3))
    clock.now += 2.9
    assert checks.get("a") is not None and checks.get("b") is not None
    clock.now += 0.2
    assert checks.get("a") is not None and checks.get("b") is None  # the token itself expired
    clock.now += 7.0
    assert checks.get("a") is None
    assert checks.get("unknown") is None


def test_the_least_recently_used_check_goes_first_and_a_lifetime_of_0_keeps_none(clock: Clock) -> None:
    later = utcnow() + timedelta(days=1)
    checks = RecentTokenChecks(ttl_s=10, size=2)
    checks.put("a", check("a"), token_expires_at=later)
    checks.put("b", check("b"), token_expires_at=later)
    assert checks.get("a") is not None  # a used: b is now the oldest
    checks.put("c", check("c"), token_expires_at=later)
    assert checks.get("b") is None and checks.get("a") is not None and checks.get("c") is not None
    checks.forget()
    assert checks.get("a") is None
    off = RecentTokenChecks(ttl_s=0)
    off.put("a", check("a"), token_expires_at=later)
    assert off.get("a") is None


def test_a_revocation_elsewhere_reaches_reads_after_the_lifetime_and_changes_at_once(  # type: ignore[no-untyped-def]
    client, db_session, clock: Clock
) -> None:
    """Another API process revokes the token (a statement this process's sessions do not see): reads go on for
    up to RETRO_API_TOKEN_CACHE_S, anything that changes things is refused at once."""
    token = make_user(db_session, "scripted", role="admin")
    with TestClient(client.app, headers={"Authorization": f"Bearer {token}"}) as script:
        assert script.get("/api/v1/me").status_code == 200
        revoke = (
            "UPDATE api_tokens SET revoked_at = now() FROM users WHERE users.id = user_id AND username = 'scripted'"
        )
        db_session.connection().execute(text(revoke))  # Core: no flush of this process's ORM sees it
        assert script.get("/api/v1/me").status_code == 200  # the check of a moment ago
        assert script.patch("/api/v1/me", json={"language": "ru"}).status_code == 401  # a change: checked now
        clock.now += 9.9
        assert script.get("/api/v1/retro-tests").status_code == 200
        clock.now += 0.2
        refused = script.get("/api/v1/me")
        assert refused.status_code == 401 and "revoked" in refused.json()["detail"]


def test_a_change_through_this_process_takes_effect_at_once(  # type: ignore[no-untyped-def]
    client, db_session, account_manager_client, clock: Clock
) -> None:
    make_partner(client, "acme")
    globex = make_partner(client, "globex")
    manager = account_manager_client("ann", ["acme"])
    assert [p["code"] for p in manager.get("/api/v1/partners").json()] == ["acme"]
    assigned = client.put(f"/api/v1/partners/{globex['id']}/managers", json={"usernames": ["ann"]})
    assert assigned.status_code == 200, assigned.text
    assert [p["code"] for p in manager.get("/api/v1/partners").json()] == ["acme", "globex"]  # the scope, now
    me = manager.get("/api/v1/me").json()
    tokens = manager.get("/api/v1/tokens").json()
    assert manager.delete(f"/api/v1/tokens/{tokens[0]['id']}").status_code == 204
    assert manager.get("/api/v1/me").status_code == 401  # revoked through this process: at once
    assert me["username"] == "ann"
