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
    """What an image may cost before a pixel is decoded. A JPEG is decoded at a reduced scale (1/2 to 1/8, PIL's
    draft mode) close to the working size, so its pixel limit is a header check; PNG and WebP cannot be decoded
    reduced and are held whole while decoding, so they have a lower limit (`max_decoded_pixels`: 8 MP). Measured
    peaks per photo (`python -m benchmarks.image_memory`): the largest WebP ~125 MB, PNG ~65 MB, JPEG ~70 MB.
    Width, height and aspect are bounded too: a 1 x 40,000,000 greyscale PNG passed the pixel limit and cost the
    vision agent 1.5 GB."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 12_000
    max_aspect: float = 16.0
    max_decoded_pixels: int = 8_000_000


@dataclass(frozen=True)
class ImageInfo:
    """What an accepted image is: its type and size."""

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
    if max(width, height) > limits.max_side:
        raise ImageRejected(
            FieldViolation(field, f"image is {width}x{height} pixels; no side may exceed {limits.max_side}")
        )
    if max(width, height) / min(width, height) > limits.max_aspect:
        raise ImageRejected(
            FieldViolation(
                field,
                f"image is {width}x{height} pixels; the longer side may be at most {limits.max_aspect:g}x the shorter",
            )
        )
    if mime != "image/jpeg" and width * height > limits.max_decoded_pixels:
        raise ImageRejected(
            FieldViolation(
                field,
                f"{mime} image is {width}x{height} pixels; PNG and WebP are decoded whole, so the limit is "
                f"{limits.max_decoded_pixels} pixels (send a JPEG, or a smaller image)",
            )
        )
    return image


def image_end(data: bytes) -> int:
    """Where the image's own bytes end: after a PNG's IEND chunk, a WebP's RIFF length, a JPEG's end-of-image
    marker (found by walking its segments and entropy-coded scans, so an embedded thumbnail's marker does not end
    it). `len(data)` when it cannot tell (the decoder then judges the bytes as they are)."""
    mime = sniff_mime_type(data)
    if mime == "image/png":
        position = 8
        while position + 12 <= len(data):
            length = int.from_bytes(data[position : position + 4], "big")
            kind = data[position + 4 : position + 8]
            position += 12 + length
            if kind == b"IEND":
                return min(position, len(data))
        return len(data)
    if mime == "image/webp":
        return min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    if mime == "image/jpeg":
        return _jpeg_end(data)
    return len(data)


_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length


def _jpeg_end(data: bytes) -> int:
    position = 2  # after SOI
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return len(data)  # not where a marker should be: leave the bytes as they are
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xD9:
            return position + 2
        if marker in _STANDALONE:
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        position += 2 + length
        if marker != 0xDA:
            continue
        # entropy-coded data: up to the next marker that is not stuffing (FF 00) nor a restart (FF D0-D7)
        while True:
            position = data.find(b"\xff", position)
            if position < 0 or position + 1 >= len(data):
                return len(data)
            following = data[position + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                position += 1 if following == 0xFF else 2
                continue
            break
    return len(data)


def without_trailing_bytes(data: bytes) -> bytes:
    """The image's own bytes: whatever follows its end (another file, padding, a payload) is not stored, not sent
    on to the vision agent and not part of its content hash."""
    return data[: image_end(data)]


def inspect_image(data: bytes, limits: ImageLimits, field: str = "image.data") -> ImageInfo:
    """Check an image without decoding its pixels; raises ImageRejected."""
    image = open_checked(data, limits, field)
    return ImageInfo(sniff_mime_type(data) or "", *image.size)
