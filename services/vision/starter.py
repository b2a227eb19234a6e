"""The shipped starter reference set: generated surfaces (brushed steel, painted panel), good and with drawn
defects. `python -m services.vision.starter` regenerates services/vision/starter/ deterministically.

Seeds 100-199 are used here; the held-out evaluation set (`copilot eval vision`) uses seeds from 1000 on."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from services.vision import samples

GOOD_PER_SURFACE = 10
EXAMPLES_PER_DEFECT = 3


def starter_dir() -> Path:
    return Path(str(resources.files("services.vision") / "starter"))


def starter_images():
    """(equipment_type, label, file name, PIL image) of the whole starter set."""
    for surface in samples.SURFACES:
        for i in range(GOOD_PER_SURFACE):
            yield surface, "good", f"good-{i:02d}.jpg", samples.make_surface(surface, 100 + i)
        for d_index, defect in enumerate(samples.DEFECTS):
            for i in range(EXAMPLES_PER_DEFECT):
                seed = 150 + d_index * EXAMPLES_PER_DEFECT + i
                yield surface, defect, f"{defect}-{i:02d}.jpg", samples.make_defect(surface, defect, seed)


def main(out: str | None = None) -> int:
    root = Path(out) if out else Path(__file__).resolve().parent / "starter"
    count = 0
    for surface, _label, name, image in starter_images():
        folder = root / surface
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / name, "JPEG", quality=90)
        count += 1
    print(f"wrote {count} reference images under {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
