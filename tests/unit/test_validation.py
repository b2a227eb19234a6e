"""The seed's request rules, every violation reported with its field."""
from __future__ import annotations

import pytest

from copilot.domain import DiagnosisInput
from services.orchestrator.validation import validate_diagnosis

GOOD = dict(plant_id="PUNE-IN", equipment_id="CNC-A-102", problem_description="Machine overheating during operation")


def _check(has_image=False, max_image_bytes=1000, **fields):
    return validate_diagnosis(DiagnosisInput(**{**GOOD, **fields}), has_image=has_image, max_image_bytes=max_image_bytes)


def test_good_request_passes(crack_photo):
    assert _check() == []
    assert _check(has_image=True, image_data=crack_photo, max_image_bytes=10**7) == []


@pytest.mark.parametrize("plant", ["PUNE-IN", "ABC-12", "ABCD-X_Y"])
def test_plant_ids_that_match(plant):
    assert _check(plant_id=plant) == []


@pytest.mark.parametrize("plant", ["pune-in", "PU-IN", "PUNEX-IN", "PUNE-I", "PUNE-INDI", "PUNE IN", "", "PUNE-IN\n"])
def test_plant_ids_that_do_not(plant):
    assert [v.field for v in _check(plant_id=plant)] == ["plant_id"]


@pytest.mark.parametrize(("equipment", "fragment"), [("CNC", "at least 4"), ("   A  ", "at least 4"),
                                                     ("X" * 65, "at most 64"), ("CNC\x00-1", "control")])
def test_equipment_id(equipment, fragment):
    (violation,) = _check(equipment_id=equipment)
    assert violation.field == "equipment_id" and fragment in violation.description


@pytest.mark.parametrize("text", ["too short", "x" * 501])
def test_description_length(text):
    (violation,) = _check(problem_description=text)
    assert violation.field == "problem_description" and "10 to 500" in violation.description


def test_description_forbidden_characters_are_all_named():
    (violation,) = _check(problem_description="Overheating <script>{x}; again")
    assert violation.description.endswith("; < > { }")


def test_every_violation_is_reported_at_once():
    violations = _check(plant_id="bad", equipment_id="ab", problem_description="<>", image_id="i" * 200)
    assert {v.field for v in violations} == {"plant_id", "equipment_id", "problem_description", "image_id"}
    assert len([v for v in violations if v.field == "problem_description"]) == 2


@pytest.mark.parametrize(("data", "fragment"), [(b"", "empty"), (b"x" * 2000, "limit is 1000"),
                                                (b"%PDF-1.7 not an image", "bytes sniffed")])
def test_image_checks(data, fragment):
    (violation,) = _check(has_image=True, image_data=data)
    assert violation.field == "image.data" and fragment in violation.description
