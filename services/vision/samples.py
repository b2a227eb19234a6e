"""Synthetic equipment photos: brushed-metal surfaces with drawn cracks, scratches, rust and spatter.

`python -m services.vision.samples` regenerates the CLI's sample photos in src/copilot_cli/samples/ (deterministic
seeds).
Tests use the same functions to make held-out images in memory.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from copilot.domain import DefectType


def brushed_metal(size: int = 512, seed: int = 0, tint: tuple[float, float, float] = (0.62, 0.64, 0.67)) -> Image.Image:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    # brushing: strong horizontal smoothing, weak vertical
    from scipy import ndimage

    streaks = ndimage.gaussian_filter(noise, sigma=(0.6, 12.0))
    streaks /= streaks.std() + 1e-6
    shade = np.linspace(-0.05, 0.05, size, dtype=np.float32)[None, :]  # soft light gradient
    base = 0.03 * streaks + shade
    rgb = np.stack([np.clip(t + base, 0, 1) for t in tint], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8), "RGB")


def draw_crack(
    image: Image.Image, seed: int = 1, start: tuple[float, float] = (0.2, 0.3), length: float = 0.55
) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = image.size
    draw = ImageDraw.Draw(image)
    x, y = start[0] * w, start[1] * h
    angle = rng.uniform(0.2, 0.6)
    points = [(x, y)]
    steps = 40
    for _ in range(steps):
        angle += rng.normal(0, 0.25)
        x += np.cos(angle) * length * w / steps
        y += np.sin(angle) * length * h / steps
        points.append((x, y))
    draw.line(points, fill=(28, 26, 25), width=max(2, w // 170))
    return image


def draw_scratch(image: Image.Image, seed: int = 2) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = image.size
    draw = ImageDraw.Draw(image)
    x0, y0 = rng.uniform(0.1, 0.4) * w, rng.uniform(0.55, 0.9) * h
    x1, y1 = x0 + rng.uniform(0.3, 0.5) * w, y0 - rng.uniform(0.05, 0.2) * h
    draw.line([(x0, y0), (x1, y1)], fill=(238, 240, 242), width=max(2, w // 200))
    return image


def draw_rust(
    image: Image.Image, seed: int = 3, centre: tuple[float, float] = (0.72, 0.7), radius: float = 0.1
) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = image.size
    layer = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(layer)
    cx, cy = centre[0] * w, centre[1] * h
    for _ in range(25):
        r = radius * w * rng.uniform(0.3, 0.8)
        ox, oy = rng.normal(0, radius * w * 0.5, 2)
        draw.ellipse([cx + ox - r, cy + oy - r, cx + ox + r, cy + oy + r], fill=255)
    layer = layer.filter(ImageFilter.GaussianBlur(3))
    rust = Image.new("RGB", image.size, (150, 70, 25))
    return Image.composite(rust, image, layer.point(lambda v: 255 if v > 128 else 0))


def draw_spatter(image: Image.Image, seed: int = 4, count: int = 6) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = image.size
    draw = ImageDraw.Draw(image)
    for _ in range(count):
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        r = rng.uniform(0.008, 0.02) * w
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(35, 33, 30))
    return image


def painted_panel(size: int = 512, seed: int = 0, colour: tuple[int, int, int] = (46, 92, 150)) -> Image.Image:
    """A powder-coated panel: flat colour with fine orange-peel texture."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    peel = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma=2.0)
    peel /= peel.std() + 1e-6
    base = np.array(colour, dtype=np.float32)[None, None, :] / 255.0
    rgb = np.clip(base * (1 + 0.035 * peel[..., None]), 0, 1)
    return Image.fromarray((rgb * 255).astype(np.uint8), "RGB")


def draw_dent(
    image: Image.Image, seed: int = 5, centre: tuple[float, float] | None = None, radius: float = 0.09
) -> Image.Image:
    """A dent: a shallow bowl lit from the top left, dark on one side and bright on the other."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    cx, cy = centre or (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = (xx - cx * w) / (radius * w), (yy - cy * h) / (radius * h)
    r2 = dx**2 + dy**2
    bowl = np.where(r2 < 1, (1 - r2), 0.0)
    shade = -(dx + dy) * bowl * 0.35  # slope facing the light is brighter
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    out = np.clip(rgb * (1 + shade[..., None]), 0, 1)
    return Image.fromarray((out * 255).astype(np.uint8), "RGB")


def draw_coating_defect(image: Image.Image, seed: int = 6, centre: tuple[float, float] | None = None) -> Image.Image:
    """Peeled coating: an irregular patch of bare grey metal with a dark rim."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    cx, cy = centre or (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
    layer = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(layer)
    points = []
    for k in range(14):
        angle = 2 * np.pi * k / 14
        r = w * rng.uniform(0.05, 0.11)
        points.append((cx * w + r * np.cos(angle), cy * h + r * np.sin(angle)))
    draw.polygon(points, fill=255)
    rim = layer.filter(ImageFilter.MaxFilter(5))
    out = Image.composite(Image.new("RGB", image.size, (40, 40, 44)), image, rim)
    return Image.composite(Image.new("RGB", image.size, (168, 170, 172)), out, layer)


def draw_porosity(image: Image.Image, seed: int = 7, centre: tuple[float, float] | None = None) -> Image.Image:
    """Weld porosity: a cluster of small round pores."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    cx, cy = centre or (rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(10, 18))):
        px, py = cx * w + rng.normal(0, 0.04 * w), cy * h + rng.normal(0, 0.04 * h)
        r = rng.uniform(0.004, 0.009) * w
        draw.ellipse([px - r, py - r, px + r, py + r], fill=(20, 18, 16))
    return image


SURFACES = {"brushed-steel": brushed_metal, "painted-panel": painted_panel}
DEFECTS = {
    DefectType.CRACK.value: lambda img, seed: draw_crack(
        img, seed=seed, start=(0.15 + 0.3 * (seed % 3) / 3, 0.2 + 0.1 * (seed % 4))
    ),
    DefectType.SCRATCH.value: lambda img, seed: draw_scratch(img, seed=seed),
    DefectType.CORROSION.value: lambda img, seed: draw_rust(
        img, seed=seed, centre=(0.3 + 0.1 * (seed % 5), 0.3 + 0.08 * (seed % 6))
    ),
    DefectType.DENT.value: lambda img, seed: draw_dent(img, seed=seed),
    DefectType.CONTAMINATION.value: lambda img, seed: draw_spatter(img, seed=seed),
    DefectType.COATING_DEFECT.value: lambda img, seed: draw_coating_defect(img, seed=seed),
    DefectType.WELD_POROSITY.value: lambda img, seed: draw_porosity(img, seed=seed),
}


def make_surface(surface: str, seed: int, size: int = 256) -> Image.Image:
    return SURFACES[surface](size, seed=seed)


def make_defect(surface: str, defect: str, seed: int, size: int = 256) -> Image.Image:
    return DEFECTS[defect](make_surface(surface, seed, size), seed)


def to_bytes(image: Image.Image, fmt: str = "JPEG", quality: int = 92) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


SAMPLES = {
    "pump-housing-crack.jpg": lambda: draw_rust(draw_crack(brushed_metal(512, seed=11), seed=5), seed=6),
    "pump-housing-clean.jpg": lambda: brushed_metal(512, seed=12),
}


def main(out_dir: str = "src/copilot_cli/samples") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in SAMPLES.items():
        (out / name).write_bytes(to_bytes(make()))
        print(f"wrote {out / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
