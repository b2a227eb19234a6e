"""The seed's request rules, reported field by field (every violation at once, not just the first)."""
from __future__ import annotations

import re

from copilot.domain import DiagnosisInput, FieldViolation
from copilot.images import ALLOWED_IMAGE_TYPES, sniff_mime_type

PLANT_ID = re.compile(r"[A-Z]{3,4}-\w{2,3}", re.ASCII)
FORBIDDEN_CHARS = "<>{};"
EQUIPMENT_ID_MIN, EQUIPMENT_ID_MAX = 4, 64
DESCRIPTION_MIN, DESCRIPTION_MAX = 10, 500
IMAGE_ID_MAX = 128
EQUIPMENT_TYPE = re.compile(r"[a-z][a-z0-9-]{1,39}")


def validate_diagnosis(request: DiagnosisInput, *, has_image: bool, max_image_bytes: int) -> list[FieldViolation]:
    v: list[FieldViolation] = []
    if not PLANT_ID.fullmatch(request.plant_id):
        v.append(FieldViolation("plant_id", f"must match ^[A-Z]{{3,4}}-\\w{{2,3}}$ (e.g. PUNE-IN); got {request.plant_id!r}"))

    equipment = request.equipment_id
    if len(equipment.strip()) < EQUIPMENT_ID_MIN:
        v.append(FieldViolation("equipment_id", f"must be at least {EQUIPMENT_ID_MIN} characters"))
    elif len(equipment) > EQUIPMENT_ID_MAX:
        v.append(FieldViolation("equipment_id", f"must be at most {EQUIPMENT_ID_MAX} characters"))
    elif not equipment.isprintable():
        v.append(FieldViolation("equipment_id", "must not contain control characters"))

    text = request.problem_description
    if not DESCRIPTION_MIN <= len(text) <= DESCRIPTION_MAX:
        v.append(FieldViolation("problem_description",
                                f"must be {DESCRIPTION_MIN} to {DESCRIPTION_MAX} characters (got {len(text)})"))
    bad = sorted({c for c in text if c in FORBIDDEN_CHARS})
    if bad:
        v.append(FieldViolation("problem_description", f"contains forbidden character(s): {' '.join(bad)}"))

    if has_image:
        data = request.image_data
        if not data:
            v.append(FieldViolation("image.data", "image is present but empty"))
        elif len(data) > max_image_bytes:
            v.append(FieldViolation("image.data", f"image is {len(data)} bytes; the limit is {max_image_bytes}"))
        elif sniff_mime_type(data) is None:
            v.append(FieldViolation("image.data", f"not a {', '.join(ALLOWED_IMAGE_TYPES)} image (bytes sniffed)"))
    if request.equipment_type and not EQUIPMENT_TYPE.fullmatch(request.equipment_type):
        v.append(FieldViolation("equipment_type", "must be kebab-case, 2-40 characters (e.g. brushed-steel)"))
    if len(request.image_id) > IMAGE_ID_MAX:
        v.append(FieldViolation("image_id", f"must be at most {IMAGE_ID_MAX} characters"))
    return v
