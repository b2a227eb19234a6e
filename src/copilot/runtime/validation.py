"""The protovalidate rules written in the protos, as domain FieldViolations ("image.data",
"requests[2].plant_id"): one function used by the shared ValidationInterceptor and by DiagnoseBatch for its
items."""

from __future__ import annotations

import protovalidate
from google.protobuf.message import Message

from copilot.domain import FieldViolation

_validator = protovalidate.Validator()


def _path(violation: protovalidate.Violation) -> str:
    """Dotted field path; a message-level (CEL) rule has no field and is named by its rule id."""
    rule_id: str = violation.proto.rule_id
    if violation.proto.field is None:
        return rule_id
    parts: list[str] = []
    for element in violation.proto.field.elements:
        name = element.field_name
        subscript = getattr(element, "subscript", None)
        if subscript is not None and getattr(subscript, "value", None) is not None:
            name += f"[{subscript.value}]"
        parts.append(name)
    return ".".join(parts) or rule_id


def rule_violations(message: Message) -> list[FieldViolation]:
    """Every rule the message breaks (empty when valid)."""
    return [
        FieldViolation(_path(v), v.proto.message or v.proto.rule_id) for v in _validator.collect_violations(message)
    ]
