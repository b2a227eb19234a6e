"""Image type sniffing shared by the orchestrator's validation and the vision agent."""
from __future__ import annotations

ALLOWED_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")


def sniff_mime_type(data: bytes) -> str | None:
    """The image type from its magic bytes; the declared mime_type is never trusted."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None
