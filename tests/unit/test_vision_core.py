"""The vision core looks at the pixels: different photos, different answers."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from copilot import samples
from services.vision.core import ImageLimits, ImageRejected, TextureInspector


@pytest.fixture(scope="module")
def inspector() -> TextureInspector:
    return TextureInspector()


def _types(findings) -> set[str]:
    return {d.type for d in findings.defects}


def test_shipped_crack_photo_finds_crack_and_corrosion_with_boxes(inspector, crack_photo):
    findings = inspector.analyze(crack_photo)
    assert {"crack", "corrosion"} <= _types(findings)
    crack = next(d for d in findings.defects if d.type == "crack")
    # the crack is drawn from (0.2, 0.3) rightwards and downwards; the rust blob is centred at (0.72, 0.7)
    assert crack.box.x_min == pytest.approx(0.2, abs=0.05) and crack.box.y_min < 0.45
    rust = next(d for d in findings.defects if d.type == "corrosion")
    assert rust.box.x_min < 0.72 < rust.box.x_max and rust.box.y_min < 0.7 < rust.box.y_max
    assert findings.confidence > 0.5 and findings.anomaly_score > 0.3
    assert findings.model == "texture-statistics/1" and (findings.width, findings.height) == (512, 512)


def test_clean_surface_has_no_defects(inspector, clean_photo):
    findings = inspector.analyze(clean_photo)
    assert findings.defects == ()
    assert findings.anomaly_score < 0.1
    assert "No visual defect" in findings.description


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: samples.draw_scratch(samples.brushed_metal(400, 31), seed=8), "scratch"),
        (lambda: samples.draw_spatter(samples.brushed_metal(400, 32), seed=9), "contamination"),
        (lambda: samples.draw_crack(samples.brushed_metal(300, 33), seed=10, start=(0.5, 0.1)), "crack"),
        (lambda: samples.draw_rust(samples.brushed_metal(256, 34), seed=11, centre=(0.3, 0.3)), "corrosion"),
    ],
)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_held_out_generated_defects_are_named(inspector, make, expected, fmt):
    findings = inspector.analyze(samples.to_bytes(make(), fmt))
    assert expected in _types(findings), findings


def test_held_out_clean_surfaces_stay_clean(inspector):
    for seed in range(40, 45):
        findings = inspector.analyze(samples.to_bytes(samples.brushed_metal(320, seed), "PNG"))
        assert findings.defects == (), (seed, findings)


def test_rough_surface_is_reported_without_a_box(inspector):
    import numpy as np

    rng = np.random.default_rng(5)
    rough = (0.5 + 0.12 * rng.normal(size=(256, 256, 1))).clip(0, 1).repeat(3, axis=2)
    findings = inspector.analyze(samples.to_bytes(Image.fromarray((rough * 255).astype("uint8")), "PNG"))
    rough_defects = [d for d in findings.defects if d.type == "surface-roughness"]
    assert rough_defects and rough_defects[0].box is None


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"GIF89a" + b"\0" * 100, "not a JPEG, PNG or WebP"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "cannot decode"),
    ],
)
def test_bad_images_are_rejected_with_the_field(inspector, data, fragment):
    with pytest.raises(ImageRejected) as err:
        inspector.analyze(data)
    assert err.value.violation.field == "image.data"
    assert fragment in err.value.violation.description


def test_size_and_pixel_limits(clean_photo):
    with pytest.raises(ImageRejected, match="bytes; the limit is 1000"):
        TextureInspector(ImageLimits(max_bytes=1000)).analyze(clean_photo)
    # a decompression bomb is refused from its header, before its pixels are decoded
    bomb = io.BytesIO()
    Image.new("L", (6000, 6000)).save(bomb, "PNG")
    with pytest.raises(ImageRejected, match="6000x6000 pixels"):
        TextureInspector(ImageLimits(max_pixels=10_000_000)).analyze(bomb.getvalue())
