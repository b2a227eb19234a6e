"""The policy gate: the rendered overlays through checkov's Kubernetes checks (a well-kept scanner, from PyPI, in
its own virtualenv .venv-policy made by `make install`, as kube-score and kube-linter cannot be installed here).
Every default check must pass; the only ones left out are left out for dev alone, each with its reason."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .test_kubernetes import render

CHECKOV = ROOT / ".venv-policy" / "bin" / "checkov"
# dev runs images built on the laptop and loaded into kind / k3d: they have no registry digest and must not be
# pulled (IfNotPresent). Prod holds both (registry digests, Always).
DEV_ONLY_SKIPS = {"CKV_K8S_43": "image by digest", "CKV_K8S_15": "imagePullPolicy Always"}

pytestmark = pytest.mark.skipif(
    not CHECKOV.exists(), reason="checkov is not installed (`make install` puts it in .venv-policy); NOT a pass"
)


def checkov(docs: list[dict], tmp_path: Path, skips: dict[str, str]) -> dict:
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    command = [str(CHECKOV), "--framework", "kubernetes", "--quiet", "--compact", "-o", "json", "-f", str(manifest)]
    if skips:
        command += ["--skip-check", ",".join(skips)]
    # offline: checkov's optional download of its guideline links fails fast and is only a warning
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    )
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    return report


@pytest.mark.parametrize("overlay", ["dev", "prod", "prod-gpu"])
def test_every_checkov_kubernetes_check_passes(overlay, tmp_path):
    report = checkov(render(overlay), tmp_path, DEV_ONLY_SKIPS if overlay == "dev" else {})
    failed = [
        f"{check['check_id']} {check['check_name']}: {check['resource']}"
        for check in report.get("results", {}).get("failed_checks", [])
    ]
    assert failed == []
    assert report["summary"]["passed"] > 500 and report["summary"]["parsing_errors"] == 0


def test_the_gate_fails_a_privileged_root_container(tmp_path):
    docs = render("prod")
    vision = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "vision")
    container = vision["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = {"privileged": True, "runAsUser": 0}
    del container["resources"]["limits"]
    report = checkov(docs, tmp_path, {})
    failed = {check["check_id"] for check in report["results"]["failed_checks"]}
    assert {"CKV_K8S_16", "CKV_K8S_11", "CKV_K8S_13"} <= failed  # privileged; CPU and memory limits
