"""Partner download links: scoped to one job, expiring, revocable, indistinguishable when dead, audited."""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.conftest import make_partner
from tests.test_retro_tests_api import request
from tests.web_helpers import succeeded_job

BLOB_A = os.urandom(5000)
BLOB_B = os.urandom(3000)


@pytest.fixture()
def partner_client(client):  # type: ignore[no-untyped-def]
    """A browser with no session and no token: the partner."""
    with TestClient(client.app, headers={"User-Agent": "partner-browser/1.0"}) as anonymous:
        yield anonymous


@pytest.fixture()
def job_a(client, db_session):  # type: ignore[no-untyped-def]
    make_partner(client, "acme")
    return succeeded_job(db_session, "acme", {"scores.parquet": BLOB_A, "manifest.json": b'{"a": 1}'})


@pytest.fixture()
def job_b(client, db_session):  # type: ignore[no-untyped-def]
    make_partner(client, "globex")
    return succeeded_job(db_session, "globex", {"scores.parquet": BLOB_B, "only-b.csv": b"b,secret\n"})


def make_link(client, job, days: int | None = 7) -> dict:  # type: ignore[no-untyped-def,type-arg]
    resp = client.post(f"/api/v1/retro-tests/{job.id}/links", json={} if days is None else {"expires_in_days": days})
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def path_of(link: dict) -> str:  # type: ignore[type-arg]
    return "/d/" + link["url"].rsplit("/d/", 1)[1]


def test_links_are_only_for_succeeded_jobs(client) -> None:  # type: ignore[no-untyped-def]
    make_partner(client, "acme")
    queued = client.post("/api/v1/retro-tests", json=request()).json()
    resp = client.post(f"/api/v1/retro-tests/{queued['id']}/links", json={"expires_in_days": 7})
    assert resp.status_code == 409 and "succeeded" in resp.json()["detail"]


def test_links_are_made_listed_and_revoked_through_the_api(client, job_a, job_b) -> None:  # type: ignore[no-untyped-def]
    from app.config import get_settings

    settings = get_settings()
    link = make_link(client, job_a, days=None)
    assert link["url"].startswith(settings.public_base_url.rstrip("/") + "/d/")
    assert len(link["url"].rsplit("/", 1)[1]) >= 43 and link["state"] == "active"
    lifetime = datetime.fromisoformat(link["expires_at"]) - datetime.fromisoformat(link["created_at"])
    assert abs(lifetime - timedelta(days=settings.download_link_default_days)) < timedelta(minutes=1)

    too_long = client.post(
        f"/api/v1/retro-tests/{job_a.id}/links", json={"expires_in_days": settings.download_link_max_days + 1}
    )
    assert too_long.status_code == 422 and too_long.json()["field"] == "expires_in_days"
    assert client.post(f"/api/v1/retro-tests/{job_a.id}/links", json={"expires_in_days": 0}).status_code == 422

    listed = client.get(f"/api/v1/retro-tests/{job_a.id}/links").json()
    assert [item["id"] for item in listed] == [link["id"]]
    assert "url" not in listed[0] and link["url"].rsplit("/", 1)[1] not in str(listed)
    assert client.delete(f"/api/v1/retro-tests/{job_b.id}/links/{link['id']}").status_code == 404  # other job
    assert client.delete(f"/api/v1/retro-tests/{job_a.id}/links/{uuid.uuid4()}").status_code == 404
    assert client.delete(f"/api/v1/retro-tests/{job_a.id}/links/{link['id']}").status_code == 204
    revoked = client.get(f"/api/v1/retro-tests/{job_a.id}/links").json()[0]
    assert revoked["state"] == "revoked" and revoked["revoked_by"] == "tester"


def test_the_partner_page_lists_files_and_a_download_streams_with_safe_headers(client, partner_client, job_a) -> None:  # type: ignore[no-untyped-def]
    link = make_link(client, job_a)
    page = partner_client.get(path_of(link))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store" and page.headers["referrer-policy"] == "no-referrer"
    for name, blob in (("scores.parquet", BLOB_A), ("manifest.json", b'{"a": 1}')):
        assert name in page.text and hashlib.sha256(blob).hexdigest() in page.text
    assert "tester" not in page.text  # who asked inside the company is not the partner's business

    resp = partner_client.get(path_of(link) + "/scores.parquet")
    assert resp.status_code == 200 and resp.content == BLOB_A
    assert resp.headers["content-length"] == str(len(BLOB_A))
    assert resp.headers["content-disposition"] == 'attachment; filename="scores.parquet"'
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["referrer-policy"] == "no-referrer"
    assert resp.headers["accept-ranges"] == "bytes"
    assert resp.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    ("range_header", "status", "start", "end"),
    [
        ("bytes=0-9", 206, 0, 9),
        ("bytes=10-", 206, 10, 4999),
        ("bytes=-5", 206, 4995, 4999),
        ("bytes=4990-999999", 206, 4990, 4999),
        ("bytes=4999-4999", 206, 4999, 4999),
        ("bytes=abc", 200, 0, 4999),  # malformed: ignored
        ("bytes=0-1,3-4", 200, 0, 4999),  # several ranges: the whole file, as the RFC allows
        ("bytes=9-3", 200, 0, 4999),  # last before first: invalid, ignored
        ("items=0-9", 200, 0, 4999),
    ],
)
def test_range_requests(client, partner_client, job_a, range_header, status, start, end) -> None:  # type: ignore[no-untyped-def]
    link = make_link(client, job_a)
    resp = partner_client.get(path_of(link) + "/scores.parquet", headers={"Range": range_header})
    assert resp.status_code == status, resp.text
    assert resp.content == BLOB_A[start : end + 1]
    assert resp.headers["content-length"] == str(end - start + 1)
    if status == 206:
        assert resp.headers["content-range"] == f"bytes {start}-{end}/{len(BLOB_A)}"
    else:
        assert "content-range" not in resp.headers


@pytest.mark.parametrize("range_header", ["bytes=5000-", "bytes=6000-7000", "bytes=-0"])
def test_unsatisfiable_ranges_are_416(client, partner_client, job_a, range_header) -> None:  # type: ignore[no-untyped-def]
    link = make_link(client, job_a)
    resp = partner_client.get(path_of(link) + "/scores.parquet", headers={"Range": range_header})
    assert resp.status_code == 416
    assert resp.headers["content-range"] == f"bytes */{len(BLOB_A)}"
    assert resp.content == b""


def test_if_range_that_no_longer_matches_gets_the_whole_file(client, partner_client, job_a) -> None:  # type: ignore[no-untyped-def]
    link = make_link(client, job_a)
    url = path_of(link) + "/scores.parquet"
    etag = partner_client.get(url).headers["etag"]
    same = partner_client.get(url, headers={"Range": "bytes=0-3", "If-Range": etag})
    other = partner_client.get(url, headers={"Range": "bytes=0-3", "If-Range": '"something-else"'})
    assert same.status_code == 206 and same.content == BLOB_A[:4]
    assert other.status_code == 200 and other.content == BLOB_A


def test_the_api_download_serves_ranges_too(client, job_a) -> None:  # type: ignore[no-untyped-def]
    url = f"/api/v1/retro-tests/{job_a.id}/files/scores.parquet"
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == BLOB_A[100:200]
    assert client.get(url, headers={"Range": "bytes=9000-"}).status_code == 416


def test_a_token_for_one_job_never_serves_another(client, partner_client, job_a, job_b) -> None:  # type: ignore[no-untyped-def]
    link_a = make_link(client, job_a)
    link_b = make_link(client, job_b)
    assert partner_client.get(path_of(link_a) + "/scores.parquet").content == BLOB_A
    assert partner_client.get(path_of(link_b) + "/scores.parquet").content == BLOB_B
    assert partner_client.get(path_of(link_a) + "/only-b.csv").status_code == 404
    page_a = partner_client.get(path_of(link_a)).text
    assert "only-b.csv" not in page_a and hashlib.sha256(BLOB_B).hexdigest() not in page_a
    for sneaky in (f"/{job_b.id}/scores.parquet", f"/..%2f{job_b.id}%2fscores.parquet", f"/{job_b.id}"):
        resp = partner_client.get(path_of(link_a) + sneaky)
        assert resp.status_code == 404 and BLOB_B not in resp.content


def _dead(resp) -> tuple[int, bytes, tuple[tuple[str, str], ...]]:  # type: ignore[no-untyped-def]
    keep = ("content-type", "content-length", "cache-control", "referrer-policy", "x-robots-tag")
    return resp.status_code, resp.content, tuple((k, resp.headers.get(k, "")) for k in keep)


def test_expired_revoked_unknown_and_tampered_tokens_are_refused_identically(  # type: ignore[no-untyped-def]
    client, partner_client, db_session, job_a
) -> None:
    from app.downloads.models import DownloadLink

    expired = make_link(client, job_a)
    revoked = make_link(client, job_a)
    live = make_link(client, job_a)
    row = db_session.get(DownloadLink, uuid.UUID(expired["id"]))
    row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    db_session.flush()
    assert client.delete(f"/api/v1/retro-tests/{job_a.id}/links/{revoked['id']}").status_code == 204
    token = live["url"].rsplit("/", 1)[1]
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    dead_tokens = [
        expired["url"].rsplit("/", 1)[1],
        revoked["url"].rsplit("/", 1)[1],
        "x" * len(token),
        flipped,
        token[:-1],
        token + "A",
        token.upper() if token.upper() != token else token.lower(),
        "%00" + token,
        "a" * 5000,
        str(job_a.id),
    ]
    answers = set()
    for dead in dead_tokens:
        for suffix in ("", "/scores.parquet", "/manifest.json"):
            answers.add(_dead(partner_client.get(f"/d/{dead}{suffix}")))
    assert len(answers) == 1, answers
    status, body, header_pairs = answers.pop()
    headers = dict(header_pairs)
    assert status == 404 and b"This link does not work" in body
    assert headers["cache-control"] == "no-store" and headers["referrer-policy"] == "no-referrer"
    assert partner_client.get(f"/d/{token}/scores.parquet").content == BLOB_A  # the live one still works


def test_a_link_of_a_job_that_is_not_succeeded_is_dead(client, partner_client, db_session, job_a) -> None:  # type: ignore[no-untyped-def]
    from app.core.jobs import State

    link = make_link(client, job_a)
    job_a.state = State.failed  # e.g. a job re-run or corrected afterwards
    db_session.flush()
    resp = partner_client.get(path_of(link) + "/scores.parquet")
    assert resp.status_code == 404 and BLOB_A not in resp.content


@pytest.mark.parametrize(
    "name",
    [
        "..%2f..%2fetc%2fpasswd",
        "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "..%252f..%252fetc%252fpasswd",
        "%2fetc%2fpasswd",
        "..%5c..%5cetc%5cpasswd",
        "....//....//etc/passwd",
        "scores.parquet%00.txt",
        "scores.parquet%2f",
        ".%2fscores.parquet",
        "SCORES.PARQUET",
        "scores.parquet%2f..",
        "%2e",
        "",
        "manifest.json%23",
    ],
)
def test_path_traversal_attempts_are_never_served(client, partner_client, job_a, name) -> None:  # type: ignore[no-untyped-def]
    link = make_link(client, job_a)
    resp = partner_client.get(f"{path_of(link)}/{name}")
    assert resp.status_code == 404, resp.content[:200]
    assert b"This link does not work" in resp.content and b"root:" not in resp.content


def test_a_recorded_name_that_is_a_path_is_never_opened(client, partner_client, db_session, job_a) -> None:  # type: ignore[no-untyped-def]
    from app.core.jobs import ResultFile

    # Even a poisoned row cannot make the server read outside the job's folder.
    db_session.add(
        ResultFile(retro_test_id=job_a.id, name="../../../../etc/passwd", kind="x", format="csv", bytes=10, sha256="0")
    )
    db_session.flush()
    link = make_link(client, job_a)
    resp = partner_client.get(f"{path_of(link)}/..%2f..%2f..%2f..%2fetc%2fpasswd")
    assert resp.status_code == 404 and b"root:" not in resp.content
    assert "passwd" not in partner_client.get(path_of(link)).text
    api = client.get(f"/api/v1/retro-tests/{job_a.id}/files/..%2f..%2f..%2f..%2fetc%2fpasswd")
    assert api.status_code == 404


def test_every_partner_download_is_in_the_audit_trail(client, partner_client, db_session, job_a) -> None:  # type: ignore[no-untyped-def]
    from app.audit.models import AuditEvent

    link = make_link(client, job_a)
    partner_client.get(path_of(link) + "/scores.parquet")
    partner_client.get(path_of(link) + "/scores.parquet", headers={"Range": "bytes=0-99"})
    partner_client.get(path_of(link) + "/nothing.csv")  # not a download
    history = client.get(f"/api/v1/retro-tests/{job_a.id}/downloads").json()
    assert [(h["file"], h["bytes"], h["status"]) for h in history] == [
        ("scores.parquet", 100, 206),
        ("scores.parquet", len(BLOB_A), 200),
    ]
    assert {h["user_agent"] for h in history} == {"partner-browser/1.0"}
    assert {h["ip"] for h in history} == {"testclient"} and {h["link_id"] for h in history} == {link["id"]}
    events = db_session.scalars(
        select(AuditEvent).where(AuditEvent.action == "download_link.download", AuditEvent.subject_id == str(job_a.id))
    ).all()
    assert len(events) == 2 and all(e.at is not None for e in events)


def test_attachment_names_are_safe() -> None:
    from app.downloads.files import attachment_header

    assert attachment_header("scores.parquet") == 'attachment; filename="scores.parquet"'
    assert attachment_header('a"b\r\nX-Evil: 1.csv') == 'attachment; filename="a_b__X-Evil__1.csv"'
    assert attachment_header("../..") == 'attachment; filename="_.."'
