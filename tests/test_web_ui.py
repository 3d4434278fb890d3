"""The server-rendered web UI, driven like a browser: sign-in, CSRF, the form's inline errors, scoping."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from tests.conftest import HISTORY_DAYS, HISTORY_START, make_partner, make_user
from tests.web_helpers import csrf_of, sign_in, succeeded_job

PASSWORD = "a long enough password"
START = HISTORY_START.isoformat()
END = (HISTORY_START + timedelta(days=HISTORY_DAYS - 1)).isoformat()


@pytest.fixture()
def browser(client, db_session) -> Iterator[Callable[..., TestClient]]:  # type: ignore[no-untyped-def]
    """browser("jane", role="account_manager", partners=["acme"]): a signed-in TestClient with cookies."""
    opened: list[TestClient] = []

    def make(username: str, *, role: str = "admin", partners: tuple[str, ...] = ()) -> TestClient:
        make_user(db_session, username, role=role, partners=partners, password=PASSWORD)
        c = TestClient(client.app)
        opened.append(c)
        sign_in(c, username, PASSWORD)
        return c

    yield make
    for c in opened:
        c.close()


def field_error(html: str, field: str) -> str:
    match = re.search(rf'<p class="field-error" id="{field}-error">(.*?)</p>', html, re.S)
    assert match, f"no error shown next to {field}"
    return re.sub(r"<[^>]+>", "", match.group(1)).replace("Error: ", "").replace("&#39;", "'").strip()


def form_data(csrf: str, **overrides: str) -> dict[str, str]:
    data = {
        "csrf_token": csrf,
        "partner_code": "acme",
        "model_name": "churn",
        "model_ref": "alias:champion",
        "period_start": START,
        "period_end": END,
        "output_format": "",
        "note": "asked by ACME risk",
    }
    data.update(overrides)
    return data


def test_pages_send_people_to_sign_in_first(client) -> None:  # type: ignore[no-untyped-def]
    with TestClient(client.app) as anonymous:
        for path in ("/", "/jobs", "/jobs/new", "/partners", "/account/tokens", f"/jobs/{uuid.uuid4()}"):
            resp = anonymous.get(path, follow_redirects=False)
            assert resp.status_code == 303, path
            assert resp.headers["location"].startswith("/login?next=")
        login = anonymous.get("/login")
        assert login.status_code == 200 and 'name="password"' in login.text


def test_sign_in_sets_an_httponly_samesite_cookie_and_refuses_wrong_passwords(client, db_session) -> None:  # type: ignore[no-untyped-def]
    make_user(db_session, "jane", role="account_manager", password=PASSWORD)
    with TestClient(client.app) as c:
        page = c.get("/login?next=/partners")
        wrong = c.post(
            "/login",
            data={"username": "jane", "password": "nope", "csrf_token": csrf_of(page.text)},
            follow_redirects=False,
        )
        assert wrong.status_code == 401 and "Wrong username or password" in wrong.text
        assert c.get("/jobs", follow_redirects=False).status_code == 303  # still signed out
        ok = c.post(
            "/login",
            data={"username": "jane", "password": PASSWORD, "csrf_token": csrf_of(page.text), "next": "/partners"},
            follow_redirects=False,
        )
        assert ok.status_code == 303 and ok.headers["location"] == "/partners"
        cookie = ok.headers["set-cookie"].lower()
        assert "retrotest_session=" in cookie and "httponly" in cookie and "samesite=lax" in cookie
        assert "secure" not in cookie  # plain-http public URL by default
        assert c.get("/jobs").status_code == 200
        out = c.post("/logout", data={"csrf_token": csrf_of(c.get("/jobs").text)}, follow_redirects=False)
        assert out.status_code == 303 and c.get("/jobs", follow_redirects=False).status_code == 303


def test_the_session_cookie_is_secure_when_configured(db_session, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app.config import get_settings
    from app.db import get_session
    from app.main import create_app

    monkeypatch.setenv("RETRO_SESSION_COOKIE_SECURE", "true")
    get_settings.cache_clear()
    try:
        api = create_app()
    finally:
        monkeypatch.delenv("RETRO_SESSION_COOKIE_SECURE")
        get_settings.cache_clear()
    api.dependency_overrides[get_session] = lambda: db_session
    with TestClient(api, base_url="https://testserver") as c:
        assert "; secure" in c.get("/login").headers["set-cookie"].lower()


def test_next_never_leads_off_site(client, db_session) -> None:  # type: ignore[no-untyped-def]
    make_user(db_session, "jane", role="account_manager", password=PASSWORD)
    for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"):
        with TestClient(client.app) as c:
            page = c.get("/login")
            resp = c.post(
                "/login",
                data={"username": "jane", "password": PASSWORD, "csrf_token": csrf_of(page.text), "next": evil},
                follow_redirects=False,
            )
            assert resp.headers["location"] == "/jobs", evil


def test_every_state_changing_form_needs_the_csrf_token(client, browser, db_session) -> None:  # type: ignore[no-untyped-def]
    make_partner(client, "acme")
    job = succeeded_job(db_session, "acme", {"scores.parquet": b"x" * 10})
    admin = browser("root")
    good = csrf_of(admin.get("/jobs").text)
    posts = [
        ("/jobs/new", form_data("")),
        (f"/jobs/{job.id}/cancel", {}),
        (f"/jobs/{job.id}/links", {"expires_in_days": "7"}),
        ("/partners/new", {"code": "new", "name": "New"}),
        ("/account/tokens", {"name": "laptop"}),
        ("/admin/users", {"username": "eve", "role": "admin"}),
        ("/logout", {}),
    ]
    for path, data in posts:
        for token in (None, "", "wrong-" + good[6:], good[:-1]):
            body = {k: v for k, v in data.items() if k != "csrf_token"}
            if token is not None:
                body["csrf_token"] = token
            resp = admin.post(path, data=body, follow_redirects=False)
            assert resp.status_code == 403, (path, token, resp.status_code)
            assert "security token" in resp.text
    assert admin.get("/jobs").status_code == 200  # still signed in: the refused logout did nothing
    with TestClient(client.app) as anonymous:
        anonymous.get("/login")
        resp = anonymous.post("/login", data={"username": "root", "password": PASSWORD}, follow_redirects=False)
        assert resp.status_code == 403


def test_the_form_shows_the_apis_refusals_next_to_their_fields_and_keeps_the_input(client, browser) -> None:  # type: ignore[no-untyped-def]
    make_partner(client, "acme")
    make_partner(client, "globex")
    jane = browser("jane", role="account_manager", partners=("acme",))
    page = jane.get("/jobs/new")
    assert page.status_code == 200
    assert '<option value="acme"' in page.text and "globex" not in page.text  # only her partners
    assert '<option value="churn"' in page.text
    csrf = csrf_of(page.text)

    reversed_period = jane.post("/jobs/new", data=form_data(csrf, period_start=END, period_end=START))
    assert reversed_period.status_code == 422
    html = reversed_period.text
    assert field_error(html, "period_start") == f"the first day ({END}) is after the last day ({START})"
    assert 'aria-invalid="true" aria-describedby="period_start-error"' in html
    assert f'value="{END}"' in html and f'value="{START}"' in html and "asked by ACME risk" in html
    assert '<option value="alias:champion" selected>' in html and '<option value="acme" selected>' in html
    assert "There is a problem" in html

    early = (HISTORY_START - timedelta(days=10)).isoformat()
    no_history = jane.post("/jobs/new", data=form_data(csrf, period_start=early, period_end=early))
    assert no_history.status_code == 422
    assert f"it has history from {START} to {END}" in field_error(no_history.text, "period_start")
    assert (
        f'<p class="hint" id="history-hint" aria-live="polite">features.customer_daily has history from {START} to {END}.</p>'
        in no_history.text
    )

    not_hers = jane.post("/jobs/new", data=form_data(csrf, partner_code="globex"))
    assert not_hers.status_code == 422
    assert field_error(not_hers.text, "partner_code") == (
        "no partner with code 'globex' is assigned to you (an admin can add it or assign it to you)"
    )
    too_long = jane.post("/jobs/new", data=form_data(csrf, period_start="2020-01-01"))
    assert "at most 366 are allowed" in field_error(too_long.text, "period_end")
    no_ref = jane.post("/jobs/new", data=form_data(csrf, model_ref=""))
    assert field_error(no_ref.text, "model_ref") == "give exactly one of model_version or model_alias"
    bad_version = jane.post("/jobs/new", data=form_data(csrf, model_ref="version:99"))
    assert "has no version 99" in field_error(bad_version.text, "model_ref")
    no_model = jane.post("/jobs/new", data=form_data(csrf, model_name="nope"))
    assert field_error(no_model.text, "model_name") == "no model named 'nope' in the registry"
    bad_date = jane.post("/jobs/new", data=form_data(csrf, period_start="2026-02-30"))
    assert "date" in field_error(bad_date.text, "period_start")
    bad_format = jane.post("/jobs/new", data=form_data(csrf, output_format="xlsx"))
    assert "parquet" in field_error(bad_format.text, "output_format")
    # Comparing models (issue 30): each line of "Compare with" is checked as the API checks `models`.
    no_first = jane.post("/jobs/new", data=form_data(csrf, model_name="", model_ref="", compare_with="churn/1"))
    assert field_error(no_first.text, "model_name") == "Choose a model" and "churn/1</textarea>" in no_first.text
    bad_line = jane.post("/jobs/new", data=form_data(csrf, compare_with="churn"))
    assert "model 2 ('churn'): write it as NAME/VERSION" in field_error(bad_line.text, "compare_with")
    twice = jane.post("/jobs/new", data=form_data(csrf, compare_with="churn/1"))
    assert "is asked for twice" in field_error(twice.text, "compare_with")
    assert jane.get("/api/v1/retro-tests").json()["total"] == 0  # nothing was queued

    ok = jane.post("/jobs/new", data=form_data(csrf, output_format="parquet"), follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"].startswith("/jobs/")
    job_id = ok.headers["location"].rsplit("/", 1)[1]
    job = jane.get(f"/api/v1/retro-tests/{job_id}").json()
    assert job["requested_by"] == "jane" and job["output_formats"] == ["parquet"] and job["model_version"] == "1"
    assert job["note"] == "asked by ACME risk"
    again = jane.post("/jobs/new", data=form_data(csrf, output_format="parquet"), follow_redirects=False)
    assert again.headers["location"] == f"/jobs/{job_id}?existing=1"
    assert "already running" in jane.get(again.headers["location"]).text


def test_model_options_for_the_version_field(browser) -> None:  # type: ignore[no-untyped-def]
    admin = browser("root")
    body = admin.get("/jobs/model-options", params={"model": "churn"}).json()
    options = {o["value"]: o["label"] for g in body["groups"] for o in g["options"]}
    assert options["alias:champion"] == "champion (now version 1)" and options["version:1"] == "version 1"
    # Which days the model's history table holds, so the form can say it before a period is refused.
    assert body["history"] == f"features.customer_daily has history from {START} to {END}."
    assert admin.get("/jobs/model-options", params={"model": "nope"}).json() == {"groups": [], "history": ""}


def test_the_job_list_filters_and_pages(client, browser, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.core.jobs import State

    make_partner(client, "acme")
    make_partner(client, "globex")
    for _ in range(27):
        succeeded_job(db_session, "acme", {})
    failed = succeeded_job(db_session, "globex", {})
    failed.state, failed.error_code, failed.error_message = State.failed, "model_failed", "the model server exited"
    db_session.flush()
    # An account manager of exactly these partners: jobs other tests committed stay out of the counts.
    viewer = browser("lister", role="account_manager", partners=("acme", "globex"))
    first = viewer.get("/jobs").text
    assert "28 retro tests, showing 1–25" in first and first.count('<tr>\n      <td data-label="Retro test">') == 25
    assert "Page 1 of 2" in first and 'rel="next"' in first
    second = viewer.get("/jobs", params={"page": 2}).text
    assert second.count('<td data-label="Retro test">') == 3 and 'rel="prev"' in second
    only_failed = viewer.get("/jobs", params={"state": "failed"}).text
    assert str(failed.id) in only_failed and only_failed.count('<td data-label="Retro test">') == 1
    # The job opens from its id, and a failed one says why right in the list.
    assert f'<a href="/jobs/{failed.id}" class="mono">{str(failed.id)[:8]}</a>' in only_failed
    assert "the model server exited (model_failed)" in only_failed
    globex = viewer.get("/jobs", params={"partner": "globex", "model": "churn"}).text
    assert str(failed.id) in globex and "1 retro test" in globex
    assert "No retro tests match" in viewer.get("/jobs", params={"model": "other"}).text


def test_an_account_manager_cannot_see_another_partners_jobs_in_the_ui(client, browser, db_session) -> None:  # type: ignore[no-untyped-def]
    make_partner(client, "acme")
    make_partner(client, "globex")
    mine = succeeded_job(db_session, "acme", {"scores.parquet": b"acme"})
    theirs = succeeded_job(db_session, "globex", {"scores.parquet": b"globex"})
    jane = browser("jane", role="account_manager", partners=("acme",))
    listing = jane.get("/jobs").text
    assert str(mine.id) in listing and str(theirs.id) not in listing
    assert "globex" not in listing and "globex" not in jane.get("/jobs", params={"partner": "globex"}).text
    assert "globex" not in jane.get("/partners").text
    csrf = csrf_of(listing)
    for method, path, data in [
        ("GET", f"/jobs/{theirs.id}", None),
        ("POST", f"/jobs/{theirs.id}/cancel", {"csrf_token": csrf}),
        ("POST", f"/jobs/{theirs.id}/links", {"csrf_token": csrf, "expires_in_days": "7"}),
    ]:
        resp = jane.request(method, path, data=data)
        assert resp.status_code == 404, (method, path)
        assert f"no retro test with id {theirs.id}" in resp.text and "globex" not in resp.text
    assert jane.get(f"/jobs/{mine.id}").status_code == 200
    assert jane.get("/partners/new").status_code == 403 and jane.get("/admin/users").status_code == 403


def test_the_job_page_makes_and_revokes_links_and_shows_downloads(client, browser, db_session) -> None:  # type: ignore[no-untyped-def]
    make_partner(client, "acme")
    job = succeeded_job(db_session, "acme", {"scores.parquet": b"s" * 2048})
    admin = browser("root")
    page = admin.get(f"/jobs/{job.id}")
    assert page.status_code == 200
    sha256 = hashlib.sha256(b"s" * 2048).hexdigest()  # as succeeded_job records it
    assert "scores.parquet" in page.text and "2.0 KiB" in page.text and sha256 in page.text
    assert "Cancel retro test" not in page.text and "Nobody has downloaded" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    posted = admin.post(
        f"/jobs/{job.id}/links", data={"csrf_token": csrf_of(page.text), "expires_in_days": "3"}, follow_redirects=False
    )
    # Post, redirect, get: the link is shown on the page the browser is sent to, at the top, once.
    assert posted.status_code == 303 and posted.headers["location"] == f"/jobs/{job.id}#new-link"
    made = admin.get(f"/jobs/{job.id}")
    assert made.headers["cache-control"] == "no-store"
    url = re.search(r'id="new-link-url" type="text" readonly value="([^"]+)"', made.text).group(1)  # type: ignore[union-attr]
    assert made.text.index('id="new-link"') < made.text.index("<h2>Stages</h2>") and 'id="copy-link"' in made.text
    reloaded = admin.get(f"/jobs/{job.id}")
    assert url not in reloaded.text and len(admin.get(f"/api/v1/retro-tests/{job.id}/links").json()) == 1
    # The form's address typed or reloaded as a GET leads back to the job page, not to a 405.
    revisit = admin.get(f"/jobs/{job.id}/links", follow_redirects=False)
    assert revisit.status_code == 303 and revisit.headers["location"] == f"/jobs/{job.id}#links-heading"
    path = "/d/" + url.rsplit("/d/", 1)[1]
    with TestClient(client.app, headers={"User-Agent": "acme-downloader"}) as partner:
        assert partner.get(path + "/scores.parquet").content == b"s" * 2048
    later = admin.get(f"/jobs/{job.id}").text
    assert url not in later  # shown once
    assert "acme-downloader" in later and "2,048" in later
    link_id = admin.get(f"/api/v1/retro-tests/{job.id}/links").json()[0]["id"]
    revoke = admin.post(
        f"/jobs/{job.id}/links/{link_id}/revoke", data={"csrf_token": csrf_of(later)}, follow_redirects=False
    )
    assert revoke.status_code == 303
    assert 'state-revoked">revoked' in admin.get(f"/jobs/{job.id}").text
    with TestClient(client.app) as partner:
        assert partner.get(path + "/scores.parquet").status_code == 404
    too_long = admin.post(f"/jobs/{job.id}/links", data={"csrf_token": csrf_of(later), "expires_in_days": "400"})
    assert too_long.status_code == 422 and "a link may last 1 to 30 days, not 400" in too_long.text


def test_the_job_page_leads_with_a_summary_in_words(client, browser, db_session) -> None:  # type: ignore[no-untyped-def]
    make_partner(client, "acme")
    report = {
        "outcome_column": "churned",
        "rows": {"requested": 1200, "matched": 1150, "scored": 1140, "rejected": 10, "unmatched": 50},
        "quality": {"overall": {"rows": 1140, "positives": 300, "auc": 0.81234, "gini": 0.62468, "ks": 0.4}},
    }
    files = {"scores.parquet": b"s" * 64, "report.json": json.dumps(report).encode(), "report.html": b"<html></html>"}
    job = succeeded_job(db_session, "acme", files)
    job.days_without_history = ["2026-11-28", "2026-11-29"]
    db_session.flush()
    page = browser("root").get(f"/jobs/{job.id}").text
    summary = page[page.index('id="result-summary"') : page.index("</section>", page.index('id="result-summary"'))]
    assert "This retro test finished." in summary
    assert "1,140" in summary and ">10<" in summary and "50" in summary
    assert "AUC 0.812, Gini 0.625" in summary and "1,140 rows with an outcome, 300 positive" in summary
    assert (
        "2 day(s) of the period have no history</strong> and are not in the results: 2026-11-28 to 2026-11-29"
        in summary
    )
    # The report opens in the browser from the summary; the technical facts are folded away below.
    assert re.search(r'id="view-report" href="[^"]+/files/report\.html"', summary)
    assert re.search(r'href="[^"]+/files/report\.html">report\.html', page)  # no download attribute
    assert page.index('id="result-summary"') < page.index('<details id="technical">')
    assert "features.customer_daily" not in summary and "features.customer_daily" in page


def test_cancel_from_the_job_page(client, browser) -> None:  # type: ignore[no-untyped-def]
    make_partner(client, "acme")
    admin = browser("root")
    job = client.post("/api/v1/retro-tests", json={**form_body(), "partner_code": "acme"}).json()
    page = admin.get(f"/jobs/{job['id']}")
    assert "Cancel retro test" in page.text and 'data-terminal="false"' in page.text
    resp = admin.post(f"/jobs/{job['id']}/cancel", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert resp.status_code == 303
    after = admin.get(f"/jobs/{job['id']}").text
    assert 'id="job-state" class="state state-cancelled">cancelled' in after and "cancelled by root" in after
    again = admin.post(f"/jobs/{job['id']}/cancel", data={"csrf_token": csrf_of(after)})
    assert again.status_code == 409 and "already cancelled" in again.text


def form_body() -> dict[str, str]:
    return {"model_name": "churn", "model_version": "1", "period_start": START, "period_end": END}


def test_partner_admin_pages(client, browser, db_session) -> None:  # type: ignore[no-untyped-def]
    make_user(db_session, "jane", role="account_manager", password=PASSWORD)
    admin = browser("root")
    csrf = csrf_of(admin.get("/partners/new").text)
    bad = admin.post("/partners/new", data={"csrf_token": csrf, "code": "Has Spaces", "name": "", "contact_email": "x"})
    assert bad.status_code == 422
    assert "should match pattern" in field_error(bad.text, "code") and field_error(bad.text, "name")
    assert 'value="Has Spaces"' in bad.text
    made = admin.post(
        "/partners/new", data={"csrf_token": csrf, "code": "acme", "name": "ACME"}, follow_redirects=False
    )
    assert made.status_code == 303
    dup = admin.post("/partners/new", data={"csrf_token": csrf, "code": "acme", "name": "Again"})
    assert dup.status_code == 409 and "already exists" in field_error(dup.text, "code")
    edit_url = made.headers["location"].split("?")[0]
    edit = admin.get(edit_url)
    assert "Saved." in admin.get(made.headers["location"]).text and 'value="jane"' in edit.text
    saved = admin.post(
        edit_url,
        data={"csrf_token": csrf, "name": "ACME Corp", "contact_email": "risk@acme.example", "managers": ["jane"]},
        follow_redirects=False,
    )
    assert saved.status_code == 303
    with TestClient(client.app) as jane:
        sign_in(jane, "jane", PASSWORD)
        assert "ACME Corp" in jane.get("/partners").text
        assert "/partners/new" not in jane.get("/partners").text
    listing = admin.get("/partners").text
    assert "ACME Corp" in listing and "jane" in listing
    deleted = admin.post(edit_url + "/delete", data={"csrf_token": csrf}, follow_redirects=False)
    assert deleted.status_code == 303 and "acme was deleted" in admin.get(deleted.headers["location"]).text


def test_tokens_and_users_pages(client, browser) -> None:  # type: ignore[no-untyped-def]
    admin = browser("root")
    csrf = csrf_of(admin.get("/account/tokens").text)
    assert field_error(admin.post("/account/tokens", data={"csrf_token": csrf, "name": ""}).text, "name")
    made = admin.post("/account/tokens", data={"csrf_token": csrf, "name": "laptop"})
    assert made.status_code == 201
    token = re.search(r'id="new-token" type="text" readonly value="([^"]+)"', made.text).group(1)  # type: ignore[union-attr]
    with TestClient(client.app, headers={"Authorization": f"Bearer {token}"}) as api:
        assert api.get("/api/v1/me").json()["username"] == "root"
        page = admin.get("/account/tokens").text
        assert token not in page and token[:12] in page
        token_id = next(t["id"] for t in admin.get("/api/v1/tokens").json() if t["name"] == "laptop")
        admin.post(f"/account/tokens/{token_id}/revoke", data={"csrf_token": csrf})
        assert api.get("/api/v1/me").status_code == 401

    bad = admin.post("/admin/users", data={"csrf_token": csrf, "username": "bad name", "password": "short"})
    assert bad.status_code == 422 and field_error(bad.text, "username") and field_error(bad.text, "password")
    ok = admin.post(
        "/admin/users",
        data={"csrf_token": csrf, "username": "newbie", "role": "account_manager", "password": PASSWORD},
        follow_redirects=False,
    )
    assert ok.status_code == 303 and "Saved newbie" in admin.get(ok.headers["location"]).text
    newbie = next(u for u in admin.get("/api/v1/users").json() if u["username"] == "newbie")
    admin.post(f"/admin/users/{newbie['id']}", data={"csrf_token": csrf, "role": "account_manager"})
    assert not next(u for u in admin.get("/api/v1/users").json() if u["username"] == "newbie")["is_active"]


def test_unknown_pages_and_bad_ids_render_html_not_json(browser) -> None:  # type: ignore[no-untyped-def]
    admin = browser("root")
    missing = admin.get(f"/jobs/{uuid.uuid4()}")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert admin.get("/jobs/not-a-uuid").status_code == 422
    assert admin.get("/partners/not-a-uuid").headers["content-type"].startswith("text/html")


def test_a_failed_job_page_shows_the_error_plainly(client, browser, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.core.jobs import State

    make_partner(client, "acme")
    job = succeeded_job(db_session, "acme", {})
    job.state = State.failed
    job.error_code = "schema_mismatch"
    job.error_message = "the history table lacks column plan"
    db_session.flush()
    page = browser("root").get(f"/jobs/{job.id}").text
    error = re.search(r'<div id="job-error" class="alert" role="alert">(.*?)</div>', page, re.S)
    assert error is not None
    assert "the history table lacks column plan" in error.group(1) and "schema_mismatch" in error.group(1)
    assert "Download links for the partner" not in page  # links are only for succeeded jobs


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"customer_id,outcome\n1,0\n", "lacks column(s) as_of"),
        (b"customer_id,as_of\n1,31/12/2026\n", "not dates (YYYY-MM-DD) at line 2"),
        (b"customer_id,as_of\n1,{d}\n1,{d}\n", "duplicate"),
        (b"customer_id,as_of\n1,2001-01-01\n", "outside the period"),
        (b"customer_id,as_of\n\xff,{d}\n", "not UTF-8"),
        (b"", "empty"),
    ],
)
def test_the_form_refuses_a_bad_population_next_to_its_field_and_queues_nothing(  # type: ignore[no-untyped-def]
    client, browser, body: bytes, says: str
) -> None:
    make_partner(client, "acme")
    jane = browser("jane", role="account_manager", partners=("acme",))
    page = jane.get("/jobs/new")
    assert 'type="file" id="population" name="population"' in page.text
    resp = jane.post(
        "/jobs/new",
        data=form_data(csrf_of(page.text), lookback_days="1"),
        files={"population": ("p.csv", body.replace(b"{d}", START.encode()), "text/csv")},
    )
    assert resp.status_code in (413, 422)
    assert says in field_error(resp.text, "population")
    assert 'value="1"' in resp.text  # the lookback stays as typed
    assert client.get("/api/v1/retro-tests", params={"partner": "acme"}).json()["total"] == 0
