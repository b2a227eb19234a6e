"""Images bounded by what decoding them costs: width, height and aspect as well as pixels, PNG and WebP (decoded
whole) below JPEG (decoded reduced); and the bytes after an image's end are not part of it."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from copilot.images import ImageLimits, ImageRejected, image_end, inspect_image, without_trailing_bytes
from tests.conftest import SAMPLES


def encoded(fmt: str, size=(64, 48), mode="RGB", **options) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 120).save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size (what a 76 KB hostile PNG does); the pixels are never reached."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("width", "height", "says"),
    [
        (1, 40_000_000, "no side may exceed"),  # the 76 KB PNG that cost vision 1.5 GB
        (4000, 100, "at most 16x the shorter"),
        (4000, 3000, "PNG and WebP are decoded whole"),  # 12 MP PNG: over the whole-decode limit
    ],
)
def test_costly_shapes_are_refused_from_the_header(width, height, says):
    with pytest.raises(ImageRejected) as refused:
        inspect_image(png_header_only(width, height), ImageLimits())
    assert refused.value.violation.field == "image.data" and says in refused.value.violation.description


def test_a_large_jpeg_passes_where_a_png_of_the_same_size_does_not():
    limits = ImageLimits(max_decoded_pixels=1_000)
    assert inspect_image(encoded("JPEG", (64, 48)), limits).width == 64  # decoded reduced: the header check holds
    with pytest.raises(ImageRejected):
        inspect_image(encoded("PNG", (64, 48)), limits)


@pytest.mark.parametrize(
    "image",
    [
        encoded("JPEG"),
        encoded("JPEG", progressive=True),
        encoded("JPEG", (300, 200), restart_marker_blocks=1),
        encoded("PNG"),
        encoded("PNG", mode="L"),
        encoded("WEBP"),
        (SAMPLES / "pump-housing-crack.jpg").read_bytes(),
    ],
    ids=["jpeg", "progressive", "restart-markers", "png", "grey-png", "webp", "sample-photo"],
)
def test_trailing_bytes_after_an_image_are_cut_and_the_image_kept_whole(image):
    assert image_end(image) == len(image)
    for tail in (b"PK\x03\x04 a zip after the image", b"\xff\xd9\xff\xd9", bytes(range(256)) * 40):
        stripped = without_trailing_bytes(image + tail)
        assert stripped == image
        Image.open(io.BytesIO(stripped)).load()


def test_bytes_that_are_no_image_are_left_as_they_are():
    assert without_trailing_bytes(b"not an image") == b"not an image"
    truncated = encoded("PNG")[:30]
    assert without_trailing_bytes(truncated) == truncated
