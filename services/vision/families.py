"""Vision judged on surface families it was never tuned on.

A *family* is one kind of surface (a material) from a source other than the project's own generator: texture
photographs that ship with scikit-image, and procedural textures of two noise libraries on PyPI (FastNoise Lite
through `pyfastnoiselite`, OpenSimplex through `opensimplex`). Each family is used as a plant would use the copilot:
12 good references registered under its own equipment type, then unseen good parts and parts with defects drawn by a
third party's generator (`defect-synthesis`, which also gives the ground-truth mask).

The families were split once, by family, into a *tuning* half (what any rule or constant of the engine may be chosen
on) and a *held-out* half (reported as the headline, never used to choose anything); the split is recorded in
`services/vision/eval/families.yaml`. `python -m services.vision.families` scores both halves, prints the tables with
95 % Wilson intervals and writes JSON (`copilot bench --suite vision` writes it too).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from services.vision import evaluation as ev
from services.vision import samples

SPLIT_FILE = Path(__file__).parent / "eval" / "families.yaml"
IMAGE_SIZE = ev.IMAGE_SIZE
REFERENCES = 12
#: Unseen parts per family: good ones, and defective ones per defect kind (5 kinds): 40 defective images a family, so
#: one image moves a family's rate by 2.5 points and a half's (6 families, 240 images) by 0.42.
GOODS = 20
PER_DEFECT = 8


# --- the surfaces ------------------------------------------------------------------------------------------------


def _ramp(field_01: np.ndarray, dark: tuple[int, int, int], light: tuple[int, int, int]) -> Image.Image:
    """A scalar field in [0, 1] as an RGB image between two colours."""
    t = np.clip(field_01, 0.0, 1.0)[..., None]
    rgb = np.asarray(dark, np.float32) * (1 - t) + np.asarray(light, np.float32) * t
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _normalised(values: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    lo, hi = np.percentile(values, [low, high])
    return (values - lo) / max(float(hi - lo), 1e-6)


def _grid(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of one part's photo: a random offset into the infinite texture, so two parts never share
    pixels."""
    rng = np.random.default_rng(seed)
    ox, oy = rng.uniform(0, 10_000, 2)
    ys, xs = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    return xs + np.float32(ox), ys + np.float32(oy)


def _fastnoise(seed: int, size: int, configure: Callable[[Any], None], stretch: float = 1.0) -> np.ndarray:
    from pyfastnoiselite.pyfastnoiselite import FastNoiseLite

    noise = FastNoiseLite(seed=seed % 2**31)
    configure(noise)
    xs, ys = _grid(size, seed)
    coords = np.stack([xs.ravel() / stretch, ys.ravel() * stretch]).astype(np.float32)
    return np.asarray(noise.gen_from_coords(coords), np.float32).reshape(size, size)


def _grain(seed: int, size: int) -> Image.Image:
    """Etched metal grains: cellular noise, the distance between the two nearest cell centres (grain boundaries)."""
    from pyfastnoiselite.pyfastnoiselite import CellularDistanceFunction, CellularReturnType, NoiseType

    def configure(noise: Any) -> None:
        noise.noise_type = NoiseType.NoiseType_Cellular
        noise.cellular_return_type = CellularReturnType.CellularReturnType_Distance2Sub
        noise.cellular_distance_function = CellularDistanceFunction.CellularDistanceFunction_Euclidean
        noise.frequency = 0.045

    return _ramp(_normalised(_fastnoise(seed, size, configure)), (70, 78, 88), (185, 190, 198))


def _fractal(
    noise: str,
    fractal: str,
    octaves: int,
    frequency: float,
    dark: tuple[int, int, int],
    light: tuple[int, int, int],
    stretch: float = 1.0,
) -> Callable[[int, int], Image.Image]:
    """A FastNoise Lite fractal texture (`noise`: NoiseType_*, `fractal`: FractalType_*), between two colours."""

    def make(seed: int, size: int) -> Image.Image:
        from pyfastnoiselite.pyfastnoiselite import FractalType, NoiseType

        def configure(generator: Any) -> None:
            generator.noise_type = getattr(NoiseType, f"NoiseType_{noise}")
            generator.fractal_type = getattr(FractalType, f"FractalType_{fractal}")
            generator.fractal_octaves = octaves
            generator.frequency = frequency

        return _ramp(_normalised(_fastnoise(seed, size, configure, stretch)), dark, light)

    return make


#: Cast concrete: fBm OpenSimplex2, five octaves.
_concrete = _fractal("OpenSimplex2", "FBm", 5, 0.03, (105, 102, 96), (175, 172, 165))
#: Polished stone with veins: ridged fractal noise.
_marble = _fractal("OpenSimplex2", "Ridged", 4, 0.012, (120, 118, 125), (232, 230, 226))
#: Wood-grain laminate: value-cubic fBm stretched along one axis.
_wood = _fractal("ValueCubic", "FBm", 3, 0.04, (96, 62, 34), (190, 140, 90), stretch=6.0)


def _spangle(seed: int, size: int) -> Image.Image:
    """Hot-dip galvanised zinc spangle: cellular noise, one flat value per cell, with a faint fractal sheen."""
    from pyfastnoiselite.pyfastnoiselite import CellularReturnType, FractalType, NoiseType

    def cells(noise: Any) -> None:
        noise.noise_type = NoiseType.NoiseType_Cellular
        noise.cellular_return_type = CellularReturnType.CellularReturnType_CellValue
        noise.frequency = 0.03

    def sheen(noise: Any) -> None:
        noise.noise_type = NoiseType.NoiseType_OpenSimplex2
        noise.fractal_type = FractalType.FractalType_FBm
        noise.frequency = 0.08

    value = _fastnoise(seed, size, cells) + 0.3 * _fastnoise(seed + 7, size, sheen)
    return _ramp(_normalised(value), (140, 146, 150), (215, 220, 222))


#: OpenSimplex fields are computed on a grid this many times coarser than the photo and resized (bicubic): the
#: library evaluates its noise point by point in Python (about 1 s per full-size photo).
OPENSIMPLEX_STEP = 2


def _upsized(values: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(values.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def _opensimplex(seed: int, size: int, fx: float, fy: float, octaves: int = 1, absolute: bool = False) -> np.ndarray:
    """Fractal OpenSimplex noise of frequencies `fx`, `fy` (cycles per photo pixel), computed coarse, then resized;
    `absolute`: each octave's absolute value (turbulence)."""
    import opensimplex

    generator = opensimplex.OpenSimplex(seed=seed)
    coarse = size // OPENSIMPLEX_STEP
    xs = np.arange(coarse, dtype=np.float64) * OPENSIMPLEX_STEP
    rng = np.random.default_rng(seed)
    ox, oy = rng.uniform(0, 10_000, 2)
    total = np.zeros((coarse, coarse))
    for octave in range(octaves):
        scale = 2.0**octave
        octave_noise = generator.noise2array((xs + ox) * fx * scale, (xs + oy) * fy * scale)
        total += (np.abs(octave_noise) if absolute else octave_noise) / scale
    return _upsized(total, size)


def _brushed(seed: int, size: int) -> Image.Image:
    """Brushed aluminium: OpenSimplex noise much finer across than along the brushing, plus fine grain."""
    streaks = _opensimplex(seed, size, 0.01, 0.3)  # noise2array(x, y) -> [len(y), len(x)]
    grain = _opensimplex(seed + 1, size, 0.2, 0.2)
    return _ramp(_normalised(streaks + 0.25 * grain), (130, 134, 140), (205, 208, 212))


def _leather(seed: int, size: int) -> Image.Image:
    """Embossed leather / textured polymer: OpenSimplex turbulence (sum of absolute octaves)."""
    return _ramp(
        _normalised(_opensimplex(seed, size, 0.06, 0.06, octaves=3, absolute=True)), (40, 32, 28), (120, 96, 80)
    )


def _sandblasted(seed: int, size: int) -> Image.Image:
    """Sand-blasted steel: fine isotropic OpenSimplex noise, two octaves."""
    return _ramp(_normalised(_opensimplex(seed, size, 0.22, 0.22, octaves=2)), (95, 98, 102), (160, 163, 167))


def _photo(name: str) -> Callable[[int, int, bool], Image.Image]:
    """Crops of a scikit-image photograph, as the localisation evaluation cuts them (its IMAGE_SIZE)."""

    def crop(seed: int, size: int, held_out: bool) -> Image.Image:
        if size != ev.IMAGE_SIZE:
            raise ValueError(f"photograph crops are {ev.IMAGE_SIZE} px")
        return ev.photo_crop(name, seed, held_out)

    return crop


@dataclass(frozen=True)
class Family:
    name: str
    source: str  # where the surface comes from (never the project's own generator)
    description: str
    #: (seed, size, held_out) -> one part's photo. A photograph's references come from its left half, the parts
    #: judged from its right half; a procedural texture's from seeds of their own (no pixel in common either way).
    make: Callable[[int, int, bool], Image.Image]


def _procedural(make: Callable[[int, int], Image.Image]) -> Callable[[int, int, bool], Image.Image]:
    return lambda seed, size, held_out: make(seed + (50_000 if held_out else 0), size)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("refractory-brick", "scikit-image photograph", "brick wall (skimage.data.brick)", _photo("brick")),
        Family(
            "cast-surface", "scikit-image photograph", "finely pitted grey surface (skimage.data.moon)", _photo("moon")
        ),
        Family("gravel-casting", "scikit-image photograph", "coarse gravel (skimage.data.gravel)", _photo("gravel")),
        Family("felt-mat", "scikit-image photograph", "grass-like fibres (skimage.data.grass)", _photo("grass")),
        Family("etched-grain", "FastNoise Lite (pyfastnoiselite)", "cellular metal grains", _procedural(_grain)),
        Family("cast-concrete", "FastNoise Lite (pyfastnoiselite)", "fBm OpenSimplex2", _procedural(_concrete)),
        Family("polished-stone", "FastNoise Lite (pyfastnoiselite)", "ridged fractal veins", _procedural(_marble)),
        Family("wood-laminate", "FastNoise Lite (pyfastnoiselite)", "stretched value noise", _procedural(_wood)),
        Family("zinc-spangle", "FastNoise Lite (pyfastnoiselite)", "flat cells + fractal sheen", _procedural(_spangle)),
        Family("brushed-aluminium", "OpenSimplex (opensimplex)", "anisotropic noise + grain", _procedural(_brushed)),
        Family("embossed-polymer", "OpenSimplex (opensimplex)", "turbulence", _procedural(_leather)),
        Family("sandblasted-steel", "OpenSimplex (opensimplex)", "fine isotropic noise", _procedural(_sandblasted)),
    )
}


def load_split(path: Path = SPLIT_FILE) -> dict[str, tuple[str, ...]]:
    """{"tuning": families, "held_out": families}, as recorded."""
    import yaml

    recorded = yaml.safe_load(path.read_text())
    split = {half: tuple(recorded[half]) for half in ("tuning", "held_out")}
    unknown = {f for names in split.values() for f in names} - set(FAMILIES)
    if unknown or set(split["tuning"]) & set(split["held_out"]):
        raise ValueError(f"{path}: unknown or doubly assigned families {sorted(unknown)}")
    return split


#: Families the engine's rules were already chosen or looked at on (the earlier localisation evaluation's
#: photographs): they can only be tuning families.
SEEN_BEFORE = ("refractory-brick", "cast-surface", "gravel-casting", "felt-mat")


def make_split(seed: int = 34) -> dict[str, list[str]]:
    """How the recorded split was made (once): the families seen before go to the tuning half; of each procedural
    source, one family drawn with `seed` joins them (so rules are also tried on every source), the others are
    held out."""
    import random

    rng = random.Random(seed)
    split: dict[str, list[str]] = {"tuning": list(SEEN_BEFORE), "held_out": []}
    for source in dict.fromkeys(f.source for n, f in FAMILIES.items() if n not in SEEN_BEFORE):
        names = sorted(n for n, f in FAMILIES.items() if f.source == source and n not in SEEN_BEFORE)
        rng.shuffle(names)
        split["tuning"].append(names[0])
        split["held_out"] += sorted(names[1:])
    return split


# --- the protocol ------------------------------------------------------------------------------------------------


def part(family: str, seed: int, held_out: bool = True) -> Image.Image:
    return FAMILIES[family].make(seed, IMAGE_SIZE, held_out)


def references(family: str, count: int = REFERENCES) -> list[bytes]:
    return [samples.to_bytes(part(family, 500 + i, held_out=False), "PNG") for i in range(count)]


def labelled_parts(family: str, goods: int = GOODS, per_defect: int = PER_DEFECT) -> list[ev.LabelledImage]:
    """Unseen good parts and parts with each defect kind (seeds of their own per family), with masks."""
    images = []
    for i in range(goods):
        surface = part(family, 1_000 + i)
        images.append(ev.LabelledImage(samples.to_bytes(surface, "PNG"), "good", np.zeros(surface.size[::-1], bool)))
    for k, kind in enumerate(ev.FOREIGN_DEFECTS):
        for i in range(per_defect):
            n = 2_000 + 100 * k + i
            image, mask = ev.with_defect(part(family, n), kind, n)
            images.append(ev.LabelledImage(samples.to_bytes(image, "PNG"), kind, mask))
    return images


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a rate (what a handful of images can and cannot tell)."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


@dataclass
class FamilyResult:
    family: str
    source: str
    half: str
    image_auroc: float
    defective: int
    detected: int
    box_hits: int
    boxes: int
    defects: int
    goods: int
    flagged: int  # good parts with any defect
    per_kind: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HalfSummary:
    half: str
    families: list[str]
    image_auroc_min: float
    image_auroc_mean: float
    detected: float
    detected_ci: tuple[float, float]
    box_hits: float
    box_hits_ci: tuple[float, float]
    boxes_per_defect: float
    flagged: float
    flagged_ci: tuple[float, float]
    defective: int
    goods: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_family(engine: Any, family: str, half: str) -> FamilyResult:
    """Register the family's references under its own equipment type, then judge its unseen parts."""
    ev.add_good_references(engine, family, references(family))
    engine.load({family}, generic=False)
    scored = ev.evaluate_localisation(engine, family, labelled_parts(family))
    kinds = scored.per_kind
    defective = sum(k["images"] for k in kinds.values())
    goods = scored.images - defective
    return FamilyResult(
        family=family,
        source=FAMILIES[family].source,
        half=half,
        image_auroc=scored.image_auroc,
        defective=defective,
        detected=sum(k["detected"] for k in kinds.values()),
        box_hits=sum(k["box_hits"] for k in kinds.values()),
        boxes=sum(k["boxes"] for k in kinds.values()),
        defects=sum(k["defects"] for k in kinds.values()),
        goods=goods,
        flagged=round(scored.false_positive_rate * goods),
        per_kind=kinds,
    )


def summarise(half: str, results: list[FamilyResult]) -> HalfSummary:
    defective = sum(r.defective for r in results)
    goods = sum(r.goods for r in results)
    detected = sum(r.detected for r in results)
    hits = sum(r.box_hits for r in results)
    flagged = sum(r.flagged for r in results)
    return HalfSummary(
        half=half,
        families=[r.family for r in results],
        image_auroc_min=round(min(r.image_auroc for r in results), 4),
        image_auroc_mean=round(float(np.mean([r.image_auroc for r in results])), 4),
        detected=round(detected / defective, 4),
        detected_ci=wilson(detected, defective),
        box_hits=round(hits / defective, 4),
        box_hits_ci=wilson(hits, defective),
        boxes_per_defect=round(sum(r.boxes for r in results) / max(sum(r.defects for r in results), 1), 4),
        flagged=round(flagged / goods, 4),
        flagged_ci=wilson(flagged, goods),
        defective=defective,
        goods=goods,
    )


def family_suite(
    engine: Any, split: dict[str, tuple[str, ...]] | None = None, halves: tuple[str, ...] = ("held_out", "tuning")
) -> dict[str, Any]:
    """The halves on `engine` (any reference store; each family is registered under its own name): the held-out
    half first. While choosing a rule, score `halves=("tuning",)` only."""
    split = split or load_split()
    report: dict[str, Any] = {"split": {k: list(v) for k, v in split.items()}, "halves": {}, "families": []}
    for half in halves:
        results = [score_family(engine, family, half) for family in split[half]]
        report["families"] += [r.as_dict() for r in results]
        report["halves"][half] = summarise(half, results).as_dict()
    return report


def print_report(report: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    halves = Table(
        "half",
        "families",
        "image AUROC min / mean",
        "detected [95 % CI]",
        f"box IoU ≥ {ev.BOX_IOU} [95 % CI]",
        "boxes/defect",
        "good parts flagged [95 % CI]",
        title="vision on surface families (held-out half: never used to choose anything)",
    )
    for half, s in report["halves"].items():
        halves.add_row(
            half,
            str(len(s["families"])),
            f"{s['image_auroc_min']:.3f} / {s['image_auroc_mean']:.3f}",
            f"{s['detected']:.3f} [{s['detected_ci'][0]:.3f}, {s['detected_ci'][1]:.3f}] of {s['defective']}",
            f"{s['box_hits']:.3f} [{s['box_hits_ci'][0]:.3f}, {s['box_hits_ci'][1]:.3f}]",
            f"{s['boxes_per_defect']:.2f}",
            f"{s['flagged']:.3f} [{s['flagged_ci'][0]:.3f}, {s['flagged_ci'][1]:.3f}] of {s['goods']}",
        )
    families = Table(
        "family", "source", "half", "AUROC", "detected", "box hits", "boxes", "flagged", title="per family"
    )
    for r in report["families"]:
        families.add_row(
            r["family"],
            r["source"],
            r["half"],
            f"{r['image_auroc']:.3f}",
            f"{r['detected']}/{r['defective']}",
            f"{r['box_hits']}/{r['defective']}",
            f"{r['boxes']}/{r['defects']}",
            f"{r['flagged']}/{r['goods']}",
        )
    console.print(halves, families)


def main(argv: list[str] | None = None) -> int:
    """`python -m services.vision.families [--output FILE]`: both halves on a fresh store (the starter set loaded, as
    a service has it); prints the tables and writes <data dir>/eval/vision-families.json."""
    import argparse
    import json
    import tempfile

    from copilot.runtime.config import data_dir
    from services.vision.backbone import feature_extractor
    from services.vision.core import VisionEngine
    from services.vision.references import ReferenceStore

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--half", choices=("held_out", "tuning"), action="append", help="score only this half (repeatable)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        engine = VisionEngine(feature_extractor(), ReferenceStore(Path(folder)))
        engine.seed_starter_set()
        engine.load()
        report = family_suite(engine, halves=tuple(args.half or ("held_out", "tuning")))
    from rich.console import Console

    console = Console()
    print_report(report, console)
    target = args.output or data_dir() / "eval" / "vision-families.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
