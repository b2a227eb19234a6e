"""Image checks shared by the orchestrator's edge and the vision agent: the format is sniffed from the bytes
(the declared mime_type is never trusted), then size and pixel limits are checked from the header, before any
pixel is decoded (decompression bombs)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from copilot.domain import FieldViolation

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


def sniff_mime_type(data: bytes) -> str | None:
    """The image type from its magic bytes."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


class ImageRejected(ValueError):
    """The image cannot be used; carries the field violation to report to the caller."""

    def __init__(self, violation: FieldViolation) -> None:
        super().__init__(f"{violation.field}: {violation.description}")
        self.violation = violation


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class ImageInfo:
    mime_type: str
    width: int
    height: int


def open_checked(data: bytes, limits: ImageLimits, field: str = "image.data") -> PILImage:
    """A lazily decoded PIL image whose bytes passed every check; raises ImageRejected."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageRejected(FieldViolation(field, "image is empty"))
    if len(data) > limits.max_bytes:
        raise ImageRejected(FieldViolation(field, f"image is {len(data)} bytes; the limit is {limits.max_bytes}"))
    mime = sniff_mime_type(data)
    if mime is None:
        raise ImageRejected(
            FieldViolation(field, "not a JPEG, PNG or WebP image (bytes sniffed; mime_type is not trusted)")
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[mime.split("/")[1].upper()])
        width, height = image.size  # from the header
    except Image.DecompressionBombError:
        raise ImageRejected(
            FieldViolation(field, f"image has more than {limits.max_pixels} pixels (decompression bomb guard)")
        ) from None
    except UnidentifiedImageError as exc:  # its message names the in-memory file object: not for the caller
        raise ImageRejected(FieldViolation(field, f"cannot read the {mime} image header")) from exc
    except (OSError, ValueError) as exc:
        raise ImageRejected(FieldViolation(field, f"cannot read the {mime} image header: {exc}")) from exc
    if width <= 0 or height <= 0 or width * height > limits.max_pixels:
        raise ImageRejected(
            FieldViolation(field, f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
        )
    return image


def inspect_image(data: bytes, limits: ImageLimits, field: str = "image.data") -> ImageInfo:
    """Check an image without decoding its pixels; raises ImageRejected."""
    image = open_checked(data, limits, field)
    return ImageInfo(sniff_mime_type(data) or "", *image.size)
