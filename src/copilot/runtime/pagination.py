"""Paging of every List method (AIP-158). A page size of 0 means the method's default and one above its maximum is
served at the maximum (`page_size`), never refused. Page tokens are opaque to callers: URL-safe base64 of JSON
holding the method, a digest of the request's filters and the position after the page's last item (a keyset, so an
item added or removed meanwhile neither repeats nor skips an unrelated one), sealed with an HMAC. A token from
another method, for other filters (a changed filter does not silently continue the old listing), damaged or
crafted decodes to None, which the servicer reports as INVALID_ARGUMENT on `page_token`. An empty
`next_page_token` means the last page.

The HMAC key is derived from the mesh's HS256 secret, so every replica of a service accepts the tokens of the
others; without one (RS256 keys only) it is random per process, and a token is good on the replica that made it."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from copilot.domain import FieldViolation

log = logging.getLogger(__name__)
_MAC_BYTES = 16


@lru_cache(maxsize=1)
def _key() -> bytes:
    from copilot.runtime.auth import AuthSettings

    try:
        secret = AuthSettings().secret()
    except OSError:
        secret = ""
    if not secret:
        log.info("page tokens sealed with a per-process key (no HS256 secret): valid on this replica only")
        return os.urandom(32)
    return hashlib.sha256(b"copilot page token\x00" + secret.encode()).digest()


def page_size(requested: int, default: int, maximum: int) -> int:
    """0 -> the default; above the maximum -> the maximum (AIP-158: coerce, do not refuse)."""
    return default if requested <= 0 else min(requested, maximum)


def _filters_digest(filters: Mapping[str, Any] | None) -> str:
    canonical = json.dumps(dict(filters or {}), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_page_token(method: str, *position: Any, filters: Mapping[str, Any] | None = None) -> str:
    """The token for the page after `position` (JSON values: str, int, float) of `method` with `filters`."""
    payload = json.dumps([method, _filters_digest(filters), *position], separators=(",", ":")).encode()
    mac = hmac.new(_key(), payload, hashlib.sha256).digest()[:_MAC_BYTES]
    return base64.urlsafe_b64encode(mac + payload).decode().rstrip("=")


def decode_page_token(
    token: str, method: str, arity: int, *, filters: Mapping[str, Any] | None = None
) -> list[Any] | None:
    """The position a token of `method` for the same `filters` carries (`arity` values), or None when it is not
    such a token."""
    try:
        raw = base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    mac, payload = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(_key(), payload, hashlib.sha256).digest()[:_MAC_BYTES]):
        return None
    try:
        values = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(values, list) or len(values) != arity + 2 or values[0] != method:
        return None
    if values[1] != _filters_digest(filters):
        return None
    return values[2:]


def invalid_page_token(method: str) -> FieldViolation:
    return FieldViolation(
        "page_token",
        f"is not a token from a previous {method} response with these filters (a changed filter starts a new "
        "listing: send no page_token)",
    )
