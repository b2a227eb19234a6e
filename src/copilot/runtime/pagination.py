"""Page tokens of every List method: opaque to callers, URL-safe base64 of JSON holding the method they belong
to and the position after the page's last item (a keyset, so an item added or removed meanwhile neither
repeats nor skips an unrelated one). A token from another method or a damaged one decodes to None, which the
servicer reports as an INVALID_ARGUMENT on `page_token`."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from copilot.domain import FieldViolation


def encode_page_token(method: str, *position: Any) -> str:
    """The token for the page after `position` (JSON values: str, int, float)."""
    return base64.urlsafe_b64encode(json.dumps([method, *position]).encode()).decode()


def decode_page_token(token: str, method: str, arity: int) -> list[Any] | None:
    """The position a token of `method` carries (`arity` values), or None when it is not such a token."""
    try:
        values = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(values, list) or len(values) != arity + 1 or values[0] != method:
        return None
    return values[1:]


def invalid_page_token(method: str) -> FieldViolation:
    return FieldViolation("page_token", f"is not a token from a previous {method} response")
