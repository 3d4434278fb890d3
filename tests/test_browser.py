"""End to end in real headless Chromium: sign in, the form's inline error, a real job to the end, a partner link,
the API docs offline. Every page a test opens must log no console error and throw no uncaught exception (a content
security policy violation is a console error).

Screenshots of the pages land in test-output/screenshots/ for people to look at.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HISTORY_DAYS, HISTORY_START, ROOT, Stack, make_user
from tests.web_helpers import succeeded_job

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = ROOT / "test-output" / "screenshots"
PASSWORD = "browser test password"
START = HISTORY_START.isoformat()
END = (HISTORY_START + timedelta(days=HISTORY_DAYS - 1)).isoformat()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's Chromium, driven by Playwright (its own browser downloads are never used)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/system-packages.sh (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def browser_errors() -> Iterator[list[str]]:
    """What the pages of one test logged as errors (console errors, CSP violations, uncaught exceptions): none."""
    errors: list[str] = []
    yield errors
    assert not errors, "the browser reported errors:\n" + "\n".join(errors)


def watched(context: Any, errors: list[str]) -> Any:
    """The context, with every console error and uncaught exception of its pages recorded in errors.

    A page answered with a 4xx on purpose (the form's 422, a 404 page) logs "Failed to load resource" for the
    document itself: that one is the test's to check; a failed script, stylesheet, icon or API call is an error.
    """
    documents: set[str] = set()

    def on_response(response: Any) -> None:
        if response.request.resource_type == "document":
            documents.add(response.url)

    def on_console(message: Any) -> None:
        url = message.location.get("url")
        if message.type != "error" or (message.text.startswith("Failed to load resource") and url in documents):
            return
        errors.append(f"console: {message.text} ({url})")

    context.on("response", on_response)
    context.on("console", on_console)
    context.on("weberror", lambda failure: errors.append(f"uncaught: {failure.error}"))
    return context


@pytest.fixture(scope="module")
def account_manager(stack: Stack) -> str:
    """An account manager with a password, assigned to partner web-e2e, in the stack's database."""
    from app.db import get_session_factory

    with stack.client() as c:
        c.post("/api/v1/partners", json={"code": "web-e2e", "name": "Web E2E Telecom"})
        c.post("/api/v1/partners", json={"code": "web-other", "name": "Someone Else"})
    with get_session_factory()() as session:
        make_user(session, "am-browser", role="account_manager", partners=["web-e2e"], password=PASSWORD)
        session.commit()
    return "am-browser"


def test_account_manager_runs_a_retro_test_and_a_partner_downloads_it(  # type: ignore[no-untyped-def]
    stack: Stack, chromium, account_manager: str, tmp_path: Path, browser_errors: list[str]
) -> None:
    context = watched(
        chromium.new_context(viewport={"width": 1280, "height": 900}, base_url=stack.base_url), browser_errors
    )
    page = context.new_page()
    page.set_default_timeout(30_000)

    # Sign in with the keyboard only.
    page.goto("/jobs/new")
    assert "/login?next=" in page.url
    page.focus("#username")
    page.keyboard.type(account_manager)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/jobs/new$"))

    # Only her partner is offered; the version field fills in for the chosen model.
    partners = page.eval_on_selector_all("#partner_code option", "os => os.map(o => o.value)")
    assert partners == ["", "web-e2e"]
    page.select_option("#partner_code", "web-e2e")
    page.select_option("#model_name", "churn")
    page.wait_for_selector('#model_ref option[value="alias:champion"]', state="attached")
    page.select_option("#model_ref", "alias:champion")
    page.fill("#period_start", END)
    page.fill("#period_end", START)  # reversed: refused by the same check as the API
    page.fill("#note", "browser end-to-end")
    page.click("button[type=submit]:has-text('Submit retro test')")
    error = page.locator("#period_start-error")
    error.wait_for()
    assert f"the first day ({END}) is after the last day ({START})" in error.inner_text()
    assert page.get_attribute("#period_start", "aria-invalid") == "true"
    assert page.input_value("#period_start") == END and page.input_value("#note") == "browser end-to-end"
    assert page.input_value("#model_ref") == "alias:champion"
    page.screenshot(path=str(SHOTS / "new-job-form-error.png"), full_page=True)

    page.fill("#period_start", START)
    page.fill("#period_end", END)
    page.click("button[type=submit]:has-text('Submit retro test')")
    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]

    # Progress moves on the page without a reload, then the finished job shows its files.
    page.evaluate("window.__notReloaded = true")
    page.wait_for_function(
        "() => document.getElementById('job-state').textContent !== 'queued' && window.__notReloaded === true",
        timeout=60_000,
    )
    page.wait_for_function("() => document.getElementById('job-state').textContent === 'succeeded'", timeout=240_000)
    page.locator("#files").wait_for()
    with stack.client() as c:
        job = c.get(f"/api/v1/retro-tests/{job_id}").json()
    assert job["state"] == "succeeded" and job["requested_by"] == account_manager
    expected = {f["name"]: f["sha256"] for f in job["files"]}
    for sha in expected.values():
        assert sha in page.inner_text("#files")
    stages = page.inner_text("#stages")
    assert "Scoring the rows" in stages and "Writing the results and the report" in stages
    # The summary leads: the state in words, the rows, the report one click away (it opens, not downloads).
    summary = page.inner_text("#result-summary")
    assert "This retro test finished." in summary and "Rows scored" in summary
    assert page.get_attribute("#view-report", "download") is None

    page.select_option("#expires_in_days", "7")
    page.click("button:has-text('Create download link')")
    url = page.input_value("#new-link-url")
    assert url.startswith(stack.base_url + "/d/")
    # The new link is at the top, in view, and its button copies it.
    assert page.is_visible("#new-link") and page.evaluate(
        "document.getElementById('new-link').getBoundingClientRect().top < window.innerHeight"
    )
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click("#copy-link")
    page.wait_for_selector("#copy-link-status:has-text('Copied.')")
    assert page.evaluate("navigator.clipboard.readText()") == url
    page.screenshot(path=str(SHOTS / "job-page-new-link.png"))
    # A reload shows the page without the link and makes no second one.
    page.reload()
    assert page.locator("#new-link").count() == 0
    with stack.client() as c:
        assert len(c.get(f"/api/v1/retro-tests/{job_id}/links").json()) == 1
    page.screenshot(path=str(SHOTS / "job-page.png"), full_page=True)

    # The partner: a fresh browser with no cookies opens the link and downloads a file.
    partner = watched(
        chromium.new_context(accept_downloads=True, viewport={"width": 1024, "height": 768}), browser_errors
    )
    landing = partner.new_page()
    response = landing.goto(url)
    assert response is not None and response.status == 200
    assert response.headers["referrer-policy"] == "no-referrer" and response.headers["cache-control"] == "no-store"
    assert "Web E2E Telecom" in landing.inner_text("h1")
    landing.screenshot(path=str(SHOTS / "partner-page.png"), full_page=True)
    # The report opens in the browser from the partner's page, not as a download.
    landing.click("#view-report")
    landing.wait_for_url(re.compile(r".*/report\.html$"))
    assert landing.locator("h1").count() == 1 and landing.locator("svg").count() > 0
    landing.go_back()
    with landing.expect_download() as download_info:
        landing.click("a:has-text('scores.parquet')")
    download = download_info.value
    assert download.suggested_filename == "scores.parquet"
    saved = tmp_path / "scores.parquet"
    download.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == expected["scores.parquet"]
    partner.close()

    # The account manager sees the download in the job's history; a revoked link stops working.
    page.goto(f"/jobs/{job_id}")
    history = page.inner_text("#downloads")
    assert "scores.parquet" in history and "HeadlessChrome" in history
    page.click("#links button:has-text('Revoke')")
    page.wait_for_selector("#links .state-revoked")
    gone = chromium.new_context()  # not watched: the browser logs the expected 404 of a revoked link
    dead = gone.new_page().goto(url)
    assert dead is not None and dead.status == 404
    gone.close()

    # A narrow screen: one column, nothing cut off sideways.
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"/jobs/{job_id}")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    page.screenshot(path=str(SHOTS / "job-page-narrow.png"), full_page=True)
    page.goto("/jobs")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    page.screenshot(path=str(SHOTS / "job-list-narrow.png"), full_page=True)
    context.close()


def test_the_job_list_and_partner_pages_in_the_browser(  # type: ignore[no-untyped-def]
    stack: Stack, chromium, account_manager: str, browser_errors: list[str]
) -> None:
    from app.db import get_session_factory

    with get_session_factory()() as session:
        make_user(session, "admin-browser", role="admin", password=PASSWORD)
        session.commit()
    context = watched(
        chromium.new_context(viewport={"width": 1280, "height": 900}, base_url=stack.base_url), browser_errors
    )
    page = context.new_page()
    page.goto("/login")
    # The sign-in card keeps its width (an inline style the CSP refused used to stretch it across the page).
    assert page.eval_on_selector("form.card", "f => f.getBoundingClientRect().width") <= 26 * 16 + 1
    page.fill("#username", "admin-browser")
    page.fill("#password", PASSWORD)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(re.compile(r".*/jobs$"))
    page.screenshot(path=str(SHOTS / "job-list.png"), full_page=True)
    page.goto("/partners")
    page.click("a:has-text('web-e2e')")
    page.wait_for_selector("input[name=managers][value=am-browser]:checked")
    page.screenshot(path=str(SHOTS / "partner-edit.png"), full_page=True)
    # The delete button is usable exactly when the page does not say the partner is kept.
    kept = page.locator("#delete-note").count() == 1
    assert page.is_disabled("button:has-text('Delete partner web-e2e')") == kept

    # A page that is not there keeps the navigation of the signed-in user.
    missing = page.goto(f"/jobs/{uuid.uuid4()}")
    assert missing is not None and missing.status == 404
    assert page.locator("nav[aria-label=Main] a:has-text('Retro tests')").count() == 1
    page.screenshot(path=str(SHOTS / "not-found.png"), full_page=True)
    # A partner link that does not work is a styled page too (the app's stylesheet, under the partner CSP).
    bad_link = page.goto("/d/not-a-token")
    assert bad_link is not None and bad_link.status == 404
    assert page.eval_on_selector("header.top", "h => getComputedStyle(h).display") != "inline"
    page.screenshot(path=str(SHOTS / "partner-link-not-found.png"), full_page=True)
    context.close()


def test_the_api_docs_render_offline_under_their_csp(stack: Stack, chromium, browser_errors: list[str]) -> None:  # type: ignore[no-untyped-def]
    """/docs with every request to another host refused, as on a machine without internet: Swagger UI still renders."""
    context = watched(chromium.new_context(viewport={"width": 1280, "height": 900}), browser_errors)
    elsewhere: list[str] = []

    def offline(route: Any) -> None:
        if route.request.url.startswith(stack.base_url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort("internetdisconnected")

    context.route("**/*", offline)
    page = context.new_page()
    response = page.goto(f"{stack.base_url}/docs")
    assert response is not None and "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "retrotest" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_selector('.opblock-summary-path[data-path="/api/v1/retro-tests"]')
    assert page.locator(".opblock").count() > 20
    page.screenshot(path=str(SHOTS / "api-docs.png"), full_page=False)
    assert elsewhere == [], f"/docs asked for other hosts: {elsewhere}"
    context.close()


def test_raw_path_traversal_against_the_real_server(stack: Stack) -> None:
    """Literal ../ segments (which HTTP clients normally tidy away) sent byte for byte to the running server."""
    from app.db import get_session_factory
    from app.downloads.service import create_link

    with get_session_factory()() as session:
        code = f"raw-{uuid.uuid4().hex[:6]}"
        with stack.client() as c:
            c.post("/api/v1/partners", json={"code": code, "name": code})
        job = succeeded_job(session, code, {"scores.parquet": b"inside the job folder"})
        _, token = create_link(session=session, job=job, expires_in_days=1, max_days=30, actor="test")
        session.commit()
    host, port = stack.base_url.removeprefix("http://").split(":")
    attempts = [
        f"/d/{token}/../../../../../../etc/passwd",
        f"/d/{token}/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        f"/d/{token}/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"/d/{token}/../{job.id}/scores.parquet",
        f"/d/{token}/scores.parquet/../../manifest.json",
        f"/d/../d/{token}/..%5c..%5cetc%5cpasswd",
        "/static/../../../../etc/passwd",
        "/static/..%2f..%2fconfig.py",
    ]
    for path in attempts:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status in (400, 404), (path, resp.status)
        assert b"root:" not in body and b"get_settings" not in body, path
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", f"/d/{token}/scores.parquet")
    assert conn.getresponse().read() == b"inside the job folder"
    conn.close()
