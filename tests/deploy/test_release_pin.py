"""scripts/pin_images.py, what `make release` writes into the prod overlay after each push: the one entry named,
its comments and neighbours kept, and kustomize then renders exactly that reference."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest
import yaml

from .conftest import DEPLOY, ROOT
from .test_kubernetes import KUBECTL

spec = importlib.util.spec_from_file_location("pin_images", ROOT / "scripts" / "pin_images.py")
assert spec is not None and spec.loader is not None
pin_images = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pin_images)
DIGEST = "sha256:" + "ab" * 32


def test_a_pinned_image_renders_as_registry_at_digest_and_nothing_else_changes(tmp_path):
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    kustomization = copy / "k8s" / "overlays" / "prod" / "kustomization.yaml"
    before = kustomization.read_text()
    after = pin_images.pin(
        before, "manufacturing-copilot/vision", "registry.copilot.internal/manufacturing-copilot/vision", DIGEST
    )
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert changed == [("    digest: sha256:" + "0" * 64, f"    digest: {DIGEST}")]
    kustomization.write_text(after)
    rendered = subprocess.run(
        [str(KUBECTL), "kustomize", str(kustomization.parent)], capture_output=True, text=True, check=True
    ).stdout
    images = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["image"]
        for d in yaml.safe_load_all(rendered)
        if d and d["kind"] == "Deployment"
    }
    assert images["vision"] == f"registry.copilot.internal/manufacturing-copilot/vision@{DIGEST}"
    assert images["report"].endswith("@sha256:" + "0" * 64)  # not released yet


def test_an_unknown_image_or_a_malformed_digest_is_refused():
    text = (DEPLOY / "k8s" / "overlays" / "prod" / "kustomization.yaml").read_text()
    with pytest.raises(LookupError):
        pin_images.pin(text, "manufacturing-copilot/unknown", "r/x", DIGEST)
    with pytest.raises(ValueError, match="not a sha256 digest"):
        pin_images.pin(text, "manufacturing-copilot/vision", "r/x", "latest")
