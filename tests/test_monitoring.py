"""deploy/prometheus/alerts.yml and deploy/grafana/retrotest.json: the rules pass `promtool check rules`, every panel's
query parses in promtool too, and every metric they name is in the service's real /metrics output (issue 32)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from fastapi.testclient import TestClient

from tests.conftest import ROOT

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "retrotest.json"
# What a family of each type is scraped as (prometheus_client's exposition names a counter's family with _total).
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count", "_created")}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/system-packages.sh installs it (Debian's prometheus package)"
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)


def _exposed_names(client: TestClient) -> set[str]:
    """Every series name the API's /metrics exposes, the worker's families included (one registry, app/metrics.py)."""
    text = client.get("/metrics").text
    names = set()
    for line in text.splitlines():
        if m := re.match(r"# TYPE (\S+) (\S+)", line):
            names.update(m.group(1) + suffix for suffix in SUFFIXES.get(m.group(2), ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bretrotest_[a-z_]+\b", expr))


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_alert_rules_pass_promtool_and_name_only_metrics_the_service_exposes(client: TestClient) -> None:
    checked = _promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert {"RetrotestJobsStuck", "RetrotestDeploymentsOrphaned", "RetrotestScoringErrors"} <= {
        r["alert"] for r in rules
    }
    assert {"RetrotestQueueTooOld", "RetrotestDiskAlmostFull", "RetrotestJobsFailing"} <= {r["alert"] for r in rules}
    exposed = _exposed_names(client)
    docs = (ROOT / "docs" / "operations.md").read_text()
    for rule in rules:
        names = _metric_names(rule["expr"])
        assert names, rule
        assert names <= exposed, (rule["alert"], names - exposed)
        assert f"### {rule['alert']}" in docs, f"docs/operations.md says nothing about {rule['alert']}"


def test_every_dashboard_query_parses_and_names_only_metrics_the_service_exposes(
    client: TestClient, tmp_path: Path
) -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    queries = _panel_queries()
    # promtool parses PromQL only inside rules: each query becomes a recording rule of a throwaway file.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{i}", "expr": e} for i, (_, e) in enumerate(queries)],
            }
        ]
    }
    as_rules = tmp_path / "dashboard-queries.yml"
    as_rules.write_text(yaml.safe_dump(rules))
    checked = _promtool("check", "rules", str(as_rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(queries)} rules found" in checked.stdout
    exposed = _exposed_names(client)
    for where, expr in queries:
        assert _metric_names(expr) and _metric_names(expr) <= exposed, (where, _metric_names(expr) - exposed)


def test_promtool_refuses_a_query_that_does_not_parse(tmp_path: Path) -> None:
    """The check above can fail: a broken expression is refused."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(x[5m])"}]}]})
    )
    assert _promtool("check", "rules", str(broken)).returncode != 0
