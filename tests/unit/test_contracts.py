"""The protos: lint-clean, breaking changes detected, generated stubs identical to the protos."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).with_name("buf")


def test_generated_stubs_match_the_protos(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    for package in (Path("copilot") / "v1", Path("copilot") / "agents" / "v1"):
        fresh, installed = tmp_path / package, ROOT / "src" / package
        names = sorted(p.name for p in fresh.iterdir())
        assert names == sorted(p.name for p in installed.iterdir() if p.is_file())
        _, mismatch, errors = filecmp.cmpfiles(fresh, installed, names, shallow=False)
        assert mismatch == [] and errors == [], f"stubs drifted from protos/: run `make protos` ({mismatch or errors})"


def test_buf_lint_standard_passes():
    result = subprocess.run([str(BUF), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_renumbered_field(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    for target in (before, after):
        shutil.copytree(ROOT / "protos", target / "protos")
        shutil.copy(ROOT / "buf.yaml", target / "buf.yaml")
    proto = after / "protos" / "copilot" / "v1" / "copilot.proto"
    proto.write_text(proto.read_text().replace("string plant_id = 1 [", "string plant_id = 9 ["))
    same = subprocess.run([str(BUF), "breaking", str(before), "--against", str(before)], capture_output=True, text=True)
    assert same.returncode == 0, same.stdout + same.stderr
    broken = subprocess.run(
        [str(BUF), "breaking", str(after), "--against", str(before)], capture_output=True, text=True
    )
    assert broken.returncode != 0 and "plant_id" in broken.stdout + broken.stderr


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        ("DiagnoseRequest", {"plant_id", "equipment_id", "problem_description", "image", "image_id"}),
        (
            "DiagnoseResponse",
            {"request_id", "report", "confidence_score", "requires_manual_review", "stages", "safety_disclaimer"},
        ),
    ],
)
def test_public_contract_names_are_kept(message, fields):
    from copilot.v1 import copilot_pb2

    descriptor = copilot_pb2.DESCRIPTOR.message_types_by_name[message]
    assert fields <= set(descriptor.fields_by_name)
    assert (
        copilot_pb2.DESCRIPTOR.services_by_name["CopilotService"].methods_by_name["Diagnose"].input_type
        is copilot_pb2.DESCRIPTOR.message_types_by_name["DiagnoseRequest"]
    )
