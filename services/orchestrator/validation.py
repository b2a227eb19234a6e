"""What the protovalidate rules cannot say about a DiagnoseRequest: the image's real format (sniffed), its
size and its pixel count (read from the header, before any decoding). The seed's text rules (plant id,
equipment id, description length and forbidden characters) are protovalidate rules in copilot.proto."""

from __future__ import annotations

from copilot.domain import FieldViolation
from copilot.images import ImageLimits, ImageRejected, inspect_image
from copilot.runtime.validation import rule_violations
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


def diagnosis_violations(
    request: copilot_pb2.DiagnoseRequest, limits: ImageLimits, prefix: str = ""
) -> list[FieldViolation]:
    """Every rule the request breaks (protovalidate + image), field paths under `prefix` (e.g. "requests[3].")."""
    return [
        *(FieldViolation(prefix + v.field, v.description) for v in rule_violations(request)),
        *image_violations(request, limits, prefix),
    ]
