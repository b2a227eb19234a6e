"""Vision agent core: image checks and a texture-statistics defect analyser. No gRPC here.

What it really does (the learned, reference-based model comes with the vision issue): the photo is
decoded, reduced to at most 384 px, and each pixel's brightness is compared with its neighbourhood
(a Gaussian background). Pixels far outside the image's own robust spread (median/MAD z-score) are
anomalous. Connected anomalous regions are classified by shape and colour:

* dark and elongated or slender -> crack
* bright and elongated/slender  -> scratch
* dark, compact                 -> contamination (spots, spatter, pits)
* orange-brown and saturated    -> corrosion (rust, from HSV colour)
* fine-grained texture energy well above a machined surface -> surface-roughness (no box)

Every answer is computed from the pixels it is given: a different photo gives a different answer.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from copilot.domain import BoundingBox, Defect, FieldViolation, VisionFindings
from copilot.images import sniff_mime_type

MODEL_NAME = "texture-statistics/1"

class ImageRejected(ValueError):
    """The image cannot be analysed; carries the field violation to report to the caller."""

    def __init__(self, violation: FieldViolation) -> None:
        super().__init__(f"{violation.field}: {violation.description}")
        self.violation = violation


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000


def decode_image(data: bytes, limits: ImageLimits, field: str = "image.data") -> Image.Image:
    if not data:
        raise ImageRejected(FieldViolation(field, "image is empty"))
    if len(data) > limits.max_bytes:
        raise ImageRejected(FieldViolation(field, f"image is {len(data)} bytes; the limit is {limits.max_bytes}"))
    mime = sniff_mime_type(data)
    if mime is None:
        raise ImageRejected(FieldViolation(field, "not a JPEG, PNG or WebP image"))
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # read from the header, before any pixel is decoded
        if width * height > limits.max_pixels:
            raise ImageRejected(
                FieldViolation(field, f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
            )
        image.draft("RGB", (768, 768))  # JPEG: decode at reduced scale when possible
        return image.convert("RGB")
    except ImageRejected:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageRejected(FieldViolation(field, f"cannot decode {mime} image: {exc}")) from exc


@dataclass(frozen=True)
class AnalyserTuning:
    working_side: int = 384
    background_sigma: float = 6.0
    z_threshold: float = 4.5
    min_region_fraction: float = 0.0008
    elongation_for_line: float = 3.5
    slenderness_for_line: float = 8.0
    roughness_threshold: float = 0.045
    rust_min_fraction: float = 0.004


_EIGHT = np.ones((3, 3), dtype=bool)


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    delta = mx - mn
    safe = np.where(delta == 0, 1.0, delta)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    hue = np.where(delta == 0, 0.0, hue)
    sat = np.where(mx == 0, 0.0, delta / np.where(mx == 0, 1.0, mx))
    return hue, sat, mx


def _confidence(strength: float) -> float:
    """Map a strength >= 1 (1 = just over threshold) to a confidence in [0.5, 0.97]."""
    return float(min(0.97, 0.5 + 0.47 * (1.0 - np.exp(-(max(strength, 1.0) - 1.0) * 1.2))))


class TextureInspector:
    """The offline vision analyser. Stateless and thread-safe; `analyze` is CPU-bound."""

    model = MODEL_NAME

    def __init__(self, limits: ImageLimits | None = None, tuning: AnalyserTuning | None = None) -> None:
        self.limits = limits or ImageLimits()
        self.tuning = tuning or AnalyserTuning()

    def analyze(self, data: bytes) -> VisionFindings:
        image = decode_image(data, self.limits)
        width, height = image.size
        image.thumbnail((self.tuning.working_side, self.tuning.working_side))
        rgb = np.asarray(image, dtype=np.float32) / 255.0
        defects, anomaly = self._find_defects(rgb)
        defects.sort(key=lambda x: x.confidence, reverse=True)
        if defects:
            confidence = float(np.mean([x.confidence for x in defects[:3]]))
            names = ", ".join(f"{x.label} ({x.confidence:.0%})" for x in defects)
            description = f"{len(defects)} visual defect(s) found: {names}."
        else:
            # No region stands out; the less texture variation, the surer the "clean" verdict.
            confidence = float(max(0.5, 0.85 - anomaly))
            description = "No visual defect stands out from the surface texture."
        return VisionFindings(
            defects=tuple(defects),
            confidence=round(confidence, 4),
            anomaly_score=round(anomaly, 4),
            description=description,
            model=self.model,
            width=width,
            height=height,
        )

    def _find_defects(self, rgb: np.ndarray) -> tuple[list[Defect], float]:
        t = self.tuning
        gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        h, w = gray.shape
        residual = gray - ndimage.gaussian_filter(gray, t.background_sigma)
        med = float(np.median(residual))
        mad = float(np.median(np.abs(residual - med))) * 1.4826 + 1e-4
        z = (residual - med) / mad
        min_area = max(6, int(t.min_region_fraction * h * w))

        hue, sat, val = _rgb_to_hsv(rgb)
        rust = (hue >= 5) & (hue <= 40) & (sat >= 0.35) & (val >= 0.12) & (val <= 0.9)
        rust = ndimage.binary_opening(rust, iterations=1)

        defects: list[Defect] = []
        anomalous = np.zeros_like(rust)
        for polarity, mask in (("dark", z < -t.z_threshold), ("bright", z > t.z_threshold)):
            mask = ndimage.binary_closing(mask & ~rust, iterations=1)
            labels, _ = ndimage.label(mask, structure=_EIGHT)  # 8-connected: diagonal lines stay whole
            for index, region in enumerate(ndimage.find_objects(labels), start=1):
                if region is None:
                    continue
                component = labels[region] == index
                area = int(component.sum())
                if area < min_area:
                    continue
                anomalous[region] |= component
                elongation = _elongation(component)
                slenderness = max(component.shape) ** 2 / area  # ~1.3 for a disc, length/width for a line
                strength = float(np.abs(z[region][component]).mean()) / t.z_threshold
                line = elongation >= t.elongation_for_line or slenderness >= t.slenderness_for_line
                if polarity == "dark":
                    kind = "crack" if line else "contamination"
                elif line:
                    kind = "scratch"
                else:
                    continue  # compact bright regions are glare far more often than defects
                box = _box(region, h, w)
                defects.append(
                    Defect(
                        type=kind,
                        confidence=_confidence(strength + (0.3 if line else 0.0)),
                        description=_describe(kind, box, elongation, area / (h * w)),
                        box=box,
                    )
                )

        rust_labels, _ = ndimage.label(rust, structure=_EIGHT)
        for index, region in enumerate(ndimage.find_objects(rust_labels), start=1):
            if region is None:
                continue
            component = rust_labels[region] == index
            fraction = component.sum() / (h * w)
            if fraction < t.rust_min_fraction:
                continue
            anomalous[region] |= component
            saturation = float(sat[region][component].mean())
            box = _box(region, h, w)
            defects.append(
                Defect(
                    type="corrosion",
                    confidence=_confidence(1.0 + saturation * 2 + fraction * 20),
                    description=_describe("corrosion", box, 1.0, fraction),
                    box=box,
                )
            )

        fine = gray - ndimage.gaussian_filter(gray, 1.0)
        clean = ~ndimage.binary_dilation(anomalous, iterations=2)
        roughness = float(fine[clean].std()) if clean.any() else 0.0
        if roughness > t.roughness_threshold:
            defects.append(
                Defect(
                    type="surface-roughness",
                    confidence=_confidence(roughness / t.roughness_threshold),
                    description=f"Fine-grained texture energy {roughness:.3f} exceeds {t.roughness_threshold:.3f}.",
                )
            )
        area_fraction = float(anomalous.mean())
        anomaly = float(min(1.0, 1.0 - np.exp(-area_fraction * 40) + max(0.0, roughness - t.roughness_threshold) * 4))
        return _merge_overlaps(defects), anomaly


def _elongation(component: np.ndarray) -> float:
    ys, xs = np.nonzero(component)
    if len(xs) < 3:
        return 1.0
    cov = np.cov(np.vstack([xs, ys]).astype(np.float64))
    eig = np.sort(np.linalg.eigvalsh(cov))
    return float(np.sqrt(max(eig[1], 1e-6) / max(eig[0], 0.25)))


def _box(region: tuple[slice, slice], h: int, w: int) -> BoundingBox:
    ys, xs = region
    return BoundingBox(
        x_min=round(xs.start / w, 4), y_min=round(ys.start / h, 4),
        x_max=round(xs.stop / w, 4), y_max=round(ys.stop / h, 4),
    )


def _describe(kind: str, box: BoundingBox, elongation: float, fraction: float) -> str:
    where = f"at x {box.x_min:.2f}-{box.x_max:.2f}, y {box.y_min:.2f}-{box.y_max:.2f}"
    shape = f"elongation {elongation:.1f}, " if elongation > 1 else ""
    return f"{kind.replace('-', ' ').capitalize()} {where} ({shape}{fraction:.2%} of the image)."


def _merge_overlaps(defects: list[Defect]) -> list[Defect]:
    """Keep one defect per type when boxes of the same type overlap heavily (e.g. a crack split in two)."""
    kept: list[Defect] = []
    for candidate in sorted(defects, key=lambda x: x.confidence, reverse=True):
        if candidate.box is not None and any(
            k.type == candidate.type and k.box is not None and _iou(k.box, candidate.box) > 0.3 for k in kept
        ):
            continue
        kept.append(candidate)
    return kept


def _iou(a: BoundingBox, b: BoundingBox) -> float:
    ix = max(0.0, min(a.x_max, b.x_max) - max(a.x_min, b.x_min))
    iy = max(0.0, min(a.y_max, b.y_max) - max(a.y_min, b.y_min))
    inter = ix * iy
    union = (a.x_max - a.x_min) * (a.y_max - a.y_min) + (b.x_max - b.x_min) * (b.y_max - b.y_min) - inter
    return inter / union if union > 0 else 0.0
