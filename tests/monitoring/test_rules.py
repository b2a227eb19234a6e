"""The SRE signals generated from deploy/monitoring/slos.yaml: current, valid for promtool, unit-tested per alert,
linked to runbook sections that exist."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from copilot import monitoring
from copilot.monitoring import Source
from tests.conftest import ROOT

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`; `make install` installs it)"
)


def test_the_committed_files_are_what_the_source_renders():
    for path, text in monitoring.rendered().items():
        assert path.exists(), f"{path} is missing: run `copilot monitoring render`"
        assert path.read_text() == text, (
            f"{path.relative_to(ROOT)} differs from its source: `copilot monitoring render`"
        )


@needs_promtool
def test_promtool_checks_the_rules_and_runs_a_unit_test_per_alert():
    generated = ROOT / "deploy" / "monitoring" / "generated"
    checked = subprocess.run([PROMTOOL, "check", "rules", "rules.yaml"], cwd=generated, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", "rules.test.yaml"], cwd=generated, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases = yaml.safe_load((generated / "rules.test.yaml").read_text())["tests"]
    names = {case["name"] for case in cases}
    for alert in Source.load().alerts:  # every alert: one series it fires on, one it stays silent on
        assert {f"{alert['name']} firing", f"{alert['name']} healthy"} <= names


@needs_promtool
def test_a_typo_in_the_source_fails_the_check_not_the_cluster(tmp_path):
    source = Source.load()
    broken = dict(source.data)
    broken["alerts"] = [dict(source.alerts[0], expr='up{job=~"copilot-.*"} == ')]  # an unfinished expression
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(monitoring.rules_file(Source(broken))))
    checked = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode != 0 and "CopilotServiceDown" in checked.stdout + checked.stderr


def test_every_alert_says_how_bad_where_and_what_to_do():
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.removeprefix("## ").strip().lower()).replace(" ", "-")
        for line in runbook.splitlines()
        if line.startswith("## ")
    }
    groups = monitoring.rules_file(Source.load())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert len({a["alert"] for a in alerts}) >= 9
    for alert in alerts:
        assert alert["labels"]["severity"] in {"page", "ticket", "warning"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        path, _, anchor = alert["annotations"]["runbook_url"].partition("#")
        assert path == "docs/runbook.md" and anchor in anchors, (alert["alert"], anchor)
    # the symptom alerts name the pod, stage or method they are about
    for alert in Source.load().alerts:
        assert "{{ $labels." in alert["summary"] or alert["name"] == "CopilotEscalationShareJump", alert["name"]


def test_burn_rate_alerts_follow_the_workbook_for_every_slo():
    source = Source.load()
    rules = monitoring.slo_alerts(source)["rules"]
    assert len(rules) == 3 * len(source.slos)
    fast = next(
        r for r in rules if r["labels"] == {"severity": "page", "slo": "diagnosis-availability", "burn": "fast"}
    )
    assert fast["expr"] == (
        'copilot:slo_errors:ratio_rate1h{slo="diagnosis-availability"} > 0.072 and '
        'copilot:slo_errors:ratio_rate5m{slo="diagnosis-availability"} > 0.072'
    )  # 14.4 x (1 - 0.995)
    records = {(r["record"], r["labels"]["slo"]) for r in monitoring.recording_rules(source)["rules"]}
    for slo in source.slos:
        for window in ("5m", "30m", "1h", "6h", "3d"):
            assert (f"copilot:slo_errors:ratio_rate{window}", slo["name"]) in records


def test_one_time_scale_shortens_every_window_and_wait_of_the_same_rules():
    source = Source.load()
    fast = monitoring.rules_file(source, time_scale=1 / 60)
    slow = monitoring.rules_file(source)
    for quick, real in zip(
        (r for g in fast["groups"] for r in g["rules"]), (r for g in slow["groups"] for r in g["rules"]), strict=True
    ):
        assert quick.get("alert") == real.get("alert") and quick.get("record") == real.get("record")
        if "for" in real:
            assert monitoring.seconds(quick["for"]) == max(1, monitoring.seconds(real["for"]) // 60)
    down = next(r for g in fast["groups"] for r in g["rules"] if r.get("alert") == "CopilotEscalationShareJump")
    assert "[30s]" in down["expr"] and "offset 30s" in down["expr"] and "[24m]" in down["expr"]


def test_the_kubernetes_component_ships_the_same_rules_and_the_dashboard():
    component = ROOT / "deploy" / "k8s" / "components" / "monitoring"
    rule = yaml.safe_load((component / "prometheus-rule.yaml").read_text())
    plain = yaml.safe_load((ROOT / "deploy" / "monitoring" / "generated" / "rules.yaml").read_text())
    assert rule["kind"] == "PrometheusRule" and rule["spec"]["groups"] == plain["groups"]
    board = yaml.safe_load((component / "dashboard-configmap.yaml").read_text())
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = {p["title"] for p in yaml.safe_load(board["data"]["copilot-overview.json"])["panels"]}
    assert {"Diagnoses per second", "SLO error budget left (28 d)", "RPCs in flight per pod"} <= panels
