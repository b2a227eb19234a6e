"""Synthetic equipment photos: brushed-metal surfaces with drawn cracks, scratches, rust and spatter.

`python -m copilot.samples` regenerates the shipped sample photos in samples/ (deterministic seeds).
Tests use the same functions to make held-out images in memory.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


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


def draw_crack(image: Image.Image, seed: int = 1, start: tuple[float, float] = (0.2, 0.3), length: float = 0.55) -> Image.Image:
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


def draw_rust(image: Image.Image, seed: int = 3, centre: tuple[float, float] = (0.72, 0.7), radius: float = 0.1) -> Image.Image:
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


def to_bytes(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=92)
    return buf.getvalue()


SAMPLES = {
    "pump-housing-crack.jpg": lambda: draw_rust(draw_crack(brushed_metal(512, seed=11), seed=5), seed=6),
    "pump-housing-clean.jpg": lambda: brushed_metal(512, seed=12),
}


def main(out_dir: str = "samples") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in SAMPLES.items():
        (out / name).write_bytes(to_bytes(make()))
        print(f"wrote {out / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
