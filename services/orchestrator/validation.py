"""What the protovalidate rules cannot say about a DiagnoseRequest: the image's real format (sniffed), its
size and its pixel count (read from the header, before any decoding). The text rules (plant id,
equipment id, description length and forbidden characters) are protovalidate rules in copilot.proto."""

from __future__ import annotations

import unicodedata

from copilot.domain import FieldViolation
from copilot.images import ImageLimits, ImageRejected, inspect_image
from copilot.runtime.validation import rule_violations
from copilot.text import is_layout_char
from copilot.v1 import copilot_pb2


def image_violations(
    request: copilot_pb2.DiagnoseRequest, limits: ImageLimits, prefix: str = ""
) -> list[FieldViolation]:
    """The image's real format, size and pixel count (nothing to say when there is no image)."""
    if not request.HasField("image"):
        return []
    try:
        inspect_image(request.image.data, limits, f"{prefix}image.data")
    except ImageRejected as exc:
        return [exc.violation]
    return []


def identifier_violations(request: copilot_pb2.DiagnoseRequest, prefix: str = "") -> list[FieldViolation]:
    """An equipment id names one machine's history: no character that is invisible or changes how the id reads
    (C1 controls, U+2028, zero-width, bidi overrides: "PUMP-\u202eA7" shows as another pump), and one Unicode form
    only (full-width "ＰＵＭＰ-A-7" would be a second history for the same pump)."""
    value = request.equipment_id
    if any(is_layout_char(ch) for ch in value):
        return [
            FieldViolation(
                f"{prefix}equipment_id", "must not contain control, bidi, zero-width or line-separator characters"
            )
        ]
    if unicodedata.normalize("NFKC", value) != value:
        return [
            FieldViolation(
                f"{prefix}equipment_id",
                f"must be in Unicode NFKC form (send {unicodedata.normalize('NFKC', value)!r})"[:200],
            )
        ]
    return []


def request_violations(
    request: copilot_pb2.DiagnoseRequest, limits: ImageLimits, prefix: str = ""
) -> list[FieldViolation]:
    """What the servers check besides the protovalidate rules: the equipment id's characters and the image."""
    return [*identifier_violations(request, prefix), *image_violations(request, limits, prefix)]


def diagnosis_violations(
    request: copilot_pb2.DiagnoseRequest, limits: ImageLimits, prefix: str = ""
) -> list[FieldViolation]:
    """Every rule the request breaks (protovalidate + image), field paths under `prefix` (e.g. "requests[3].")."""
    return [
        *(FieldViolation(prefix + v.field, v.description) for v in rule_violations(request)),
        *request_violations(request, limits, prefix),
    ]
