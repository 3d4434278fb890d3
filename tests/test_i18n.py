"""Russian and English (issue 29 item 6): the catalogues are complete and current, the API answers in the caller's
language, and every page, rendered in Russian in real Chromium, shows no English word outside an allow-list of
product names, codes, units and the test's own data.

Screenshots of the Russian pages land in test-output/screenshots/ru-*.png.
"""

from __future__ import annotations

import re
import string
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from babel.messages.pofile import read_po

from tests.conftest import HISTORY_START, ROOT, Stack, make_user
from tests.test_browser import SHOTS, browser_errors, chromium, watched  # noqa: F401  (fixtures)
from tests.web_helpers import succeeded_job

LOCALE = ROOT / "app" / "locale"
PASSWORD = "i18n test password"

# Words a Russian page may show in Latin letters: product and protocol names, file formats, metric names, units,
# header and setting names a person types as they are, and what a user typed (the allow-list of the issue).
ALLOWED = {
    "retrotest", "API", "REST", "MLflow", "MLServer", "Python", "Parquet", "CSV", "gzip", "UTF", "AUC", "Gini",
    "KS", "PSI", "ROC", "TPR", "FPR", "SSO", "sha", "sha256sum", "FILE", "Ctrl", "IP", "e-mail", "Accept-Language",
    "Authorization", "Bearer", "token", "laptop", "nightly-report", "English", "YYYY-MM-DD", "as_of", "outcome",
    "Hive", "JSON", "URL", "DeLong", "UTC", "UTF-8", "sha256",
}  # fmt: skip
# The test's own data: names of users, partners, the model, its table and columns.
DATA = {
    "churn", "features.customer_daily", "customer_daily", "snapshot_date", "customer_id", "parquet", "i18n-admin", "i18n-am", "tester",
}  # fmt: skip


def _placeholders(text: str) -> set[str]:
    """The %(name)s and {name} fields of a message: a translation must keep every one."""
    named = set(re.findall(r"%\(\w+\)[sd]", text))
    fields = {f for _, f, _, _ in string.Formatter().parse(text.replace("%", "")) if f is not None}
    return named | fields


def test_every_message_has_a_russian_translation_with_the_same_placeholders() -> None:
    with (LOCALE / "ru" / "LC_MESSAGES" / "messages.po").open("rb") as fh:
        catalog = read_po(fh, locale="ru")
    with (LOCALE / "messages.pot").open("rb") as fh:
        template = read_po(fh)
    untranslated, broken = [], []
    for message in template:
        if not message.id:
            continue
        translated = catalog.get(message.id, context=message.context)
        forms = translated.string if translated is not None else None
        forms = list(forms) if isinstance(forms, tuple) else [forms]
        if not all(forms):
            untranslated.append(message.id)
            continue
        original = message.id if isinstance(message.id, str) else message.id[0]
        broken += [(original, f) for f in forms if f and _placeholders(f) != _placeholders(original)]
    assert not untranslated, f"{len(untranslated)} message(s) have no Russian translation: {untranslated[:10]}"
    assert not broken, f"translations that lose or add a placeholder: {broken[:5]}"


def test_the_message_template_is_current() -> None:
    """A string marked for translation since the last scripts/i18n.sh is not in the catalogues: run it."""
    result = subprocess.run(["bash", "scripts/i18n.sh", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout


def test_accept_language_picks_the_supported_language_it_prefers() -> None:
    from app.i18n import negotiate

    assert negotiate("ru-RU,ru;q=0.9,en-US;q=0.8", default="en") == "ru"
    assert negotiate("de-DE,en;q=0.5,ru;q=0.7", default="en") == "ru"
    assert negotiate("de-DE", default="ru") == "ru"
    assert negotiate("en;q=0, ru;q=0.1", default="en") == "ru"
    assert negotiate("", default="en") == "en"


def test_the_api_answers_in_russian_for_accept_language_ru_and_the_codes_stay_english(stack: Stack) -> None:
    import httpx

    missing = uuid.uuid4()
    with stack.client() as c:
        ru = c.get(f"/api/v1/retro-tests/{missing}", headers={"Accept-Language": "ru-RU,ru;q=0.9"})
        en = c.get(f"/api/v1/retro-tests/{missing}", headers={"Accept-Language": "en-US"})
        period = c.post(
            "/api/v1/retro-tests",
            headers={"Accept-Language": "ru"},
            json={"partner_code": "nobody-i18n", "model_name": "churn", "model_version": "1",
                  "period_start": "2026-01-02", "period_end": "2026-01-01"},
        )  # fmt: skip
    assert ru.status_code == en.status_code == 404
    assert ru.json() == {"error": "not_found", "detail": f"нет ретротеста с идентификатором {missing}"}
    assert en.json()["detail"] == f"no retro test with id {missing}"
    assert period.status_code == 422 and period.json()["error"] in {"invalid_period", "partner_not_found"}
    assert re.search("[а-я]", period.json()["detail"]), period.json()
    anonymous = httpx.get(f"{stack.base_url}/api/v1/me", headers={"Accept-Language": "ru"})
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"
    assert anonymous.json()["detail"].startswith("войдите"), anonymous.json()


def test_a_users_profile_language_wins_over_the_browser_and_is_saved_on_the_account_page(stack: Stack) -> None:
    import httpx

    from app.db import get_session_factory
    from tests.web_helpers import csrf_of, sign_in

    with get_session_factory()() as session:
        make_user(session, "i18n-profile", role="account_manager", password=PASSWORD)
        session.commit()
    with httpx.Client(base_url=stack.base_url, headers={"Accept-Language": "en-US"}, follow_redirects=True) as browser:
        sign_in(browser, "i18n-profile", PASSWORD)
        assert "<h1>API tokens</h1>" in browser.get("/account/tokens").text
        saved = browser.post(
            "/account/language", data={"language": "ru", "csrf_token": csrf_of(browser.get("/account/tokens").text)}
        )
        assert saved.status_code == 200 and "Язык сохранён." in saved.text, saved.text[:500]
        assert '<html lang="ru">' in browser.get("/jobs").text
        refused = browser.post("/account/language", data={"language": "de", "csrf_token": csrf_of(saved.text)})
        assert refused.status_code == 422 and "неизвестный язык" in refused.text
        browser.post("/account/language", data={"language": "", "csrf_token": csrf_of(saved.text)})
        assert "<h1>API tokens</h1>" in browser.get("/account/tokens").text  # back to the browser's language


def english_words(text: str, allowed: set[str]) -> list[str]:
    """Latin-letter words of a page's visible text that are not allowed: ids, hashes, URLs and dates left out."""
    text = re.sub(r"https?://\S+", " ", text)
    text = re.sub(r"\b[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}\b", " ", text)  # ids
    text = re.sub(r"\b[0-9a-f]{8,64}\b", " ", text)  # short ids and sha256
    text = re.sub(r"\brtk_[\w-]+", " ", text)  # the start of an API token
    words = re.findall(r"[A-Za-z][A-Za-z0-9_.@+-]*[A-Za-z0-9]|[A-Za-z]{2,}", text)
    allowed_lower = {w.lower() for w in allowed}
    return sorted({w for w in words if w.lower() not in allowed_lower and not re.fullmatch(r"[A-Za-z]", w)})


# The page's visible text but for what is marked translate="no" (HTML's mark for content not to be translated:
# partner codes and names, usernames, model names, a job's error message stored in the language of its moment).
# The marked elements are taken out of the page while it is read: a hidden <option> still counts in innerText.
_TEXT_TO_TRANSLATE = """() => {
    const data = [...document.querySelectorAll('[translate=no]')];
    const marks = data.map(e => { const mark = document.createComment('data'); e.replaceWith(mark); return mark; });
    const text = document.body.innerText;
    marks.forEach((mark, i) => mark.replaceWith(data[i]));
    return text;
}"""


def check_russian(page: Any, name: str, allowed: set[str], found: dict[str, list[str]] | None = None) -> None:
    """The page's visible text and title have no English word outside the allow-list; a screenshot is kept.

    With `found`, what is left over is collected there (one assertion for a whole walk) instead of failing now."""
    page.evaluate("document.querySelectorAll('details').forEach(d => { d.open = true; })")  # technical details too
    page.screenshot(path=str(SHOTS / f"ru-{name}.png"), full_page=True)
    options = page.eval_on_selector_all("select option[value]", "os => os.map(o => o.value)")  # data: models, codes
    data = allowed | {part for value in options for part in re.split(r"[:\s]", value) if part}
    text = page.evaluate(_TEXT_TO_TRANSLATE) + "\n" + page.title()
    assert page.evaluate("document.documentElement.lang") == "ru", name
    leftovers = english_words(text, data)
    if found is not None and leftovers:
        found[name] = leftovers
        return
    assert not leftovers, f"English left on the Russian page {name}: {leftovers}"


@pytest.fixture()
def russian_world(stack: Stack) -> dict[str, Any]:
    """An admin and an account manager, a partner whose report is in Russian, a succeeded job with a link."""
    from app.core.jobs import RetroTest
    from app.core.partners import Partner
    from app.db import get_session_factory
    from app.downloads import service as links
    from tests.factories import make_retro_test

    with stack.client() as c:
        c.post("/api/v1/partners", json={"code": "i18n-ru", "name": "Рога и Копыта", "report_language": "ru"})
    with get_session_factory()() as session:
        make_user(session, "i18n-admin", role="admin", password=PASSWORD)
        make_user(session, "i18n-am", role="account_manager", partners=["i18n-ru"], password=PASSWORD)
        job = succeeded_job(session, "i18n-ru", {"scores.parquet": b"PAR1", "report.html": b"<p>report</p>"})
        _, token = links.create_link(session=session, job=job, expires_in_days=7, max_days=30, actor="i18n-admin")
        partner = session.query(Partner).filter_by(code="i18n-ru").one()
        assert partner.report_language == "ru"
        queued = make_retro_test(session, start=HISTORY_START, end=HISTORY_START, partner_prefix="i18n")
        queued_job = session.get(RetroTest, queued)
        assert queued_job is not None
        queued_partner = session.get(Partner, queued_job.partner_id).code  # type: ignore[union-attr]
        session.commit()
        return {
            "job": str(job.id),
            "partner": str(partner.id),
            "token": token,
            "queued": str(queued),
            "queued_partner": queued_partner,
        }


def _sign_in(page: Any, username: str) -> None:
    page.goto("/login")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/jobs$"))


def test_every_page_in_russian_shows_no_english(  # type: ignore[no-untyped-def]
    stack: Stack,
    chromium,  # noqa: F811
    russian_world: dict[str, Any],
    browser_errors: list[str],  # noqa: F811
) -> None:
    context = watched(
        chromium.new_context(viewport={"width": 1280, "height": 900}, base_url=stack.base_url, locale="ru-RU"),
        browser_errors,
    )
    page = context.new_page()
    page.set_default_timeout(30_000)
    allowed = ALLOWED | DATA | {"i18n-ru", "report.html", "scores.parquet"}
    allowed |= {russian_world["queued_partner"], "i18n", "test"}
    job, partner = russian_world["job"], russian_world["partner"]
    found: dict[str, list[str]] = {}

    page.goto("/login")
    check_russian(page, "login", allowed, found)
    _sign_in(page, "i18n-admin")
    for name, path in [
        ("jobs", "/jobs"),
        ("jobs-filtered", "/jobs?partner=i18n-ru&state=failed"),
        ("new-job", "/jobs/new"),
        ("job", f"/jobs/{job}"),
        ("partners", "/partners"),
        ("partner-new", "/partners/new"),
        ("partner-edit", f"/partners/{partner}"),
        ("users", "/admin/users"),
        ("tokens", "/account/tokens"),
        ("not-found", f"/jobs/{uuid.uuid4()}"),
    ]:
        page.goto(path)
        check_russian(page, name, allowed, found)

    # A job still queued: the page's live updates (job.js, from the API in the page's language) stay Russian.
    page.goto(f"/jobs/{russian_world['queued']}")
    page.wait_for_function("document.getElementById('job-progress-text').textContent.indexOf('строк') >= 0")
    page.wait_for_timeout(1500)  # a poll or two of the API
    check_russian(page, "job-queued-live", allowed, found)

    # A form refused: the error summary and the field errors in Russian.
    page.goto("/jobs/new")
    page.click("#new-job button[type=submit]")
    assert page.locator(".error-summary").count() == 1
    check_russian(page, "new-job-refused", allowed, found)

    # A link made: the once-only box in Russian.
    page.goto(f"/jobs/{job}")
    page.click("#link-form button[type=submit]")
    page.wait_for_selector("#new-link")
    check_russian(page, "job-new-link", allowed, found)

    # The partner's page speaks its report language even to an English browser.
    english = watched(chromium.new_context(base_url=stack.base_url, locale="en-US"), browser_errors).new_page()
    english.goto(f"/d/{russian_world['token']}")
    check_russian(english, "partner-landing", allowed, found)
    english.goto("/d/not-a-real-token")
    assert english.title() == "Not found"  # no partner known: the browser's language
    page.goto("/d/not-a-real-token")
    check_russian(page, "link-not-found", allowed, found)

    # The account manager's view, and the account page in Russian after saving the language.
    other = watched(chromium.new_context(base_url=stack.base_url, locale="ru-RU"), browser_errors).new_page()
    _sign_in(other, "i18n-am")
    for name, path in [("am-jobs", "/jobs"), ("am-partners", "/partners"), ("am-job", f"/jobs/{job}")]:
        other.goto(path)
        check_russian(other, name, allowed, found)
    assert not found, f"English left on Russian pages: {found}"


def test_the_report_in_russian_shows_no_english(chromium) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from app.i18n import use_language
    from tests.test_report_quality import _quality, _sample
    from worker import report

    s, y = _sample()
    figures = {
        "score_column": "p1",
        "outcome_column": "churned",
        "rows": {"requested": 2100, "matched": 2000, "scored": 2000, "rejected": 0, "unmatched": 100},
        "days_without_history": ["2026-11-28", "2026-11-29"],
        "null_rate": {"tenure_months": 0.01},
        "score": {"histogram": {"edges": [0.0, 0.5, 1.0], "counts": [1200, 800]}, "deciles": [0.1 * i for i in range(1, 10)]},
        "rows_per_day": [{"day": "2026-11-27", "rows": 1000}, {"day": "2026-11-30", "rows": 1000}],
        "psi": [{"from": "2026-10", "to": "2026-11", "psi": 0.02}],
        "quality": _quality(s, y),
    }  # fmt: skip
    with use_language("ru"):
        page_html = report.render_html(figures, title="churn, версия 3, клиенты Рога и Копыта")
    assert "Итоги" in page_html and "95%-й интервал" in page_html
    page = chromium.new_context(locale="ru-RU").new_page()
    page.set_content(page_html)
    check_russian(page, "report", ALLOWED | DATA | {"p1", "churned", "tenure_months"})
    with use_language("en"):
        assert "<h2>Summary</h2>" in report.render_html(figures, title="t")  # English stays English


@pytest.mark.parametrize("tag", ["ru_RU.UTF-8", "ru"])
def test_the_cli_speaks_russian_from_retro_lang_or_lang(tag: str, tmp_path: Path) -> None:
    import os
    import sys

    env = {**os.environ, "RETRO_API_URL": "http://127.0.0.1:9", "RETRO_API_TOKEN": "rtk_x"}
    for name in ("RETRO_LANG", "LC_ALL", "LC_MESSAGES", "LANG"):
        env.pop(name, None)
    env["LANG" if "_" in tag else "RETRO_LANG"] = tag
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "status"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert re.search("[а-я]{4}", result.stderr + result.stdout), result.stderr + result.stdout


def test_a_token_owners_language_answers_a_request_without_accept_language(stack: Stack) -> None:
    import httpx

    from app.db import get_session_factory

    with get_session_factory()() as session:
        token = make_user(session, "i18n-api", role="account_manager")
        session.commit()
    missing = uuid.uuid4()
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {token}"}) as api:
        assert api.patch("/api/v1/me", json={"language": "de"}).status_code == 422
        me = api.patch("/api/v1/me", json={"language": "ru"})
        assert me.status_code == 200 and me.json()["language"] == "ru", me.text
        assert api.get(f"/api/v1/retro-tests/{missing}").json()["detail"].startswith("нет ретротеста")
        english = api.get(f"/api/v1/retro-tests/{missing}", headers={"Accept-Language": "en"})
        assert english.json()["detail"].startswith("no retro test")  # the request's own header wins
        assert api.patch("/api/v1/me", json={"language": None}).json()["language"] is None
        assert api.get(f"/api/v1/retro-tests/{missing}").json()["detail"].startswith("no retro test")


def test_a_retro_test_in_russian_from_the_cli_to_the_partners_report(stack: Stack, tmp_path: Path) -> None:
    """RETRO_LANG=ru: the CLI and the API's answers to it in Russian; the worker writes the report in the partner's
    report language (ru), while the job's manifest and codes stay as they are."""
    import os
    import sys
    from datetime import timedelta

    with stack.client() as c:
        made = c.post("/api/v1/partners", json={"code": "i18n-cli", "name": "Ромашка", "report_language": "ru"})
        assert made.status_code in (201, 409), made.text
    env = {**os.environ, "RETRO_API_URL": stack.base_url, "RETRO_API_TOKEN": stack.token, "RETRO_LANG": "ru"}
    cli = [sys.executable, "-m", "app.cli"]

    def retrotest(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    day = HISTORY_START.isoformat()
    refused = retrotest(
        "submit", "--partner", "i18n-cli", "--model", "churn@champion", "--start", day, "--end", "2001-01-01"
    )
    assert refused.returncode == 2 and "отклонено: первый день" in refused.stderr, refused.stderr
    last = (HISTORY_START + timedelta(days=1)).isoformat()
    done = retrotest("submit", "--partner", "i18n-cli", "--model", "churn@champion", "--start", day, "--end", last)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "поставлен в очередь" in done.stdout or "уже выполняется" in done.stdout, done.stdout
    job_id = re.search(r"ретротест ([0-9a-f-]{36})", done.stdout).group(1)  # type: ignore[union-attr]
    status = retrotest("status", job_id)
    assert "страница:" in status.stdout and "прошло" in status.stdout, status.stdout
    with stack.client() as c:
        page = c.get(f"/api/v1/retro-tests/{job_id}/files/report.html")
    assert page.status_code == 200, page.text
    assert "<html lang='ru'>" in page.text and "Итоги" in page.text and "Ромашка" in page.text
    assert "Summary" not in page.text
