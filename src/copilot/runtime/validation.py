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


#: What a value of each format the protos ask for looks like, said instead of the regular expression (the
#: patterns as the protos write them, without the optional-value wrapper `^(...)?$`).
_FORMATS = {
    "^[A-Z]{3,4}-[A-Za-z0-9_]{2,3}$": "must be a plant code such as PUNE-IN: 3 or 4 capital letters, a hyphen, then 2 "
    "or 3 letters or digits",
    "^[a-z][a-z0-9-]{1,39}$": "must be a lower-case name such as centrifugal-pump: a letter, then letters, digits or "
    "hyphens, 2 to 40 characters in all",
    "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$": "must be an id such as cmms-4711: a letter or digit, then letters, digits "
    "and . _ : - (64 characters at most)",
    "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$": "must be a document id such as SOP-123: a letter or digit, then letters, "
    "digits and . _ - (64 characters at most)",
}


def _described(violation: protovalidate.Violation) -> str:
    """The rule's message; a pattern's says what the value should look like rather than quoting the regex."""
    text: str = violation.proto.message or violation.proto.rule_id
    if violation.proto.rule_id == "string.pattern" and isinstance(violation.rule_value, str):
        pattern = violation.rule_value
        if pattern.startswith("^(") and pattern.endswith(")?$"):
            pattern = "^" + pattern[2:-3] + "$"
        return _FORMATS.get(pattern, text)
    return text


def rule_violations(message: Message) -> list[FieldViolation]:
    """Every rule the message breaks (empty when valid)."""
    return [FieldViolation(_path(v), _described(v)) for v in _validator.collect_violations(message)]
