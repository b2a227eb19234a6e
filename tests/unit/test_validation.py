"""The request rules as protovalidate rules in copilot.proto, plus the image checks the rules cannot
express: every violation reported with its field, all at once."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from copilot.images import ImageLimits
from copilot.runtime.validation import rule_violations
from copilot.v1 import common_pb2, copilot_pb2
from services.orchestrator.validation import diagnosis_violations

GOOD = dict(plant_id="PUNE-IN", equipment_id="CNC-A-102", problem_description="Machine overheating during operation")


SMALL = ImageLimits(1000, 10_000)


def _check(image: bytes | None = None, limits=SMALL, **fields):
    request = copilot_pb2.DiagnoseRequest(**{**GOOD, **fields})
    if image is not None:
        request.image.CopyFrom(common_pb2.Image(data=image))
    return diagnosis_violations(request, limits)


def test_good_request_passes(crack_photo):
    assert _check() == []
    assert _check(crack_photo, ImageLimits(10**7, 10**8)) == []


@pytest.mark.parametrize("plant", ["PUNE-IN", "ABC-12", "ABCD-X_Y"])
def test_plant_ids_that_match(plant):
    assert _check(plant_id=plant) == []


@pytest.mark.parametrize("plant", ["pune-in", "PU-IN", "PUNEX-IN", "PUNE-I", "PUNE-INDI", "PUNE IN", "", "PUNE-IN\n"])
def test_plant_ids_that_do_not(plant):
    assert [v.field for v in _check(plant_id=plant)] == ["plant_id"]


@pytest.mark.parametrize(
    ("equipment", "fragment"),
    [("CNC", "at least 4"), ("   A  ", "surrounding blanks"), ("X" * 65, "at most 64"), ("CNC\x00-1", "control")],
)
def test_equipment_id(equipment, fragment):
    violations = _check(equipment_id=equipment)
    assert {v.field for v in violations} == {"equipment_id"}
    assert any(fragment in v.description for v in violations)


@pytest.mark.parametrize(("text", "fragment"), [("too short", "at least 10"), ("x" * 501, "at most 500")])
def test_description_length(text, fragment):
    (violation,) = _check(problem_description=text)
    assert violation.field == "problem_description" and fragment in violation.description


def test_description_forbidden_characters():
    (violation,) = _check(problem_description="Overheating <script>{x}; again")
    assert violation.field == "problem_description" and "< > { } ;" in violation.description


def test_every_violation_is_reported_at_once():
    violations = _check(
        plant_id="bad",
        equipment_id="ab",
        problem_description="<>",
        image_id="i" * 200,
        equipment_type="Not Kebab",
        request_id="has space",
    )
    assert {v.field for v in violations} == {
        "plant_id",
        "equipment_id",
        "problem_description",
        "image_id",
        "equipment_type",
        "request_id",
    }
    assert len([v for v in violations if v.field == "problem_description"]) == 2


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"\xff\xd8\xff" + b"x" * 2000, "limit is 1000"),
        (b"%PDF-1.7 not an image", "bytes sniffed"),
        (b"\x89PNG\r\n\x1a\n truncated", "cannot read"),
    ],
)
def test_image_checks(data, fragment):
    (violation,) = _check(data)
    assert violation.field == "image.data" and fragment in violation.description
    assert "0x" not in violation.description and "BytesIO" not in violation.description  # no in-memory object named


@pytest.mark.parametrize(("side", "fragment"), [(8_000, "8000x8000 pixels"), (20_000, "more than 40000000 pixels")])
def test_pixel_bomb_is_refused_from_the_header(side, fragment):
    bomb = _png(side, side)  # 64 / 400 megapixels in well under a megabyte
    (violation,) = _check(bomb, ImageLimits(10**7, 40_000_000))
    assert len(bomb) < 10**6 and fragment in violation.description


def test_batch_items_are_not_validated_as_part_of_the_batch():
    batch = copilot_pb2.DiagnoseBatchRequest(requests=[copilot_pb2.DiagnoseRequest(plant_id="bad")])
    assert rule_violations(batch) == []
    assert [v.field for v in rule_violations(copilot_pb2.DiagnoseBatchRequest())] == ["requests"]


def test_nested_paths_and_message_rules():
    violations = rule_violations(
        copilot_pb2.SubmitFeedbackRequest(request_id="r-1", helpful_sop_ids=["SOP-1", "no id"])
    )
    assert [v.field for v in violations] == ["helpful_sop_ids[1]"]
    listing = copilot_pb2.ListIncidentsRequest(page_size=-1)  # above the maximum is coerced (AIP-158), below 0 not
    listing.start_time.FromSeconds(200)
    listing.end_time.FromSeconds(100)
    assert {v.field for v in rule_violations(listing)} == {"page_size", "list_incidents.time_range"}
