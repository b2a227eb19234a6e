"""Worst-case memory of one photo in the vision agent: the largest image each format may be under the default
ImageLimits, decoded as the vision service decodes it (`services.vision.core.decode_image`: JPEG at a reduced
scale, PNG/WebP whole) and turned into the backbone's input (`backbone.pixels`, 256² RGB). Everything after that
works at the working size, whatever the photo was. Each case runs in a fresh interpreter; its figure is the peak
resident memory (ru_maxrss) above the same interpreter's peak after the imports. Also the shapes that are
refused now, from the header (what they would have cost is the finding of issue #38).

    python -m benchmarks.image_memory [--out .copilot-data/bench/image-memory.json]

Prints a table, writes JSON. The vision pods' memory limit is sized from the worst case (deploy/k8s/base/vision.yaml).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from copilot.runtime.config import data_dir

ROOT = Path(__file__).resolve().parents[1]

#: (case, format, width, height, mode): the largest of each format the default limits let through, and the
#: hostile shapes of issue #38.
CASES = (
    ("largest JPEG (40 MP, decoded reduced)", "JPEG", 7300, 5479, "RGB"),
    ("JPEG at the side limit (12000 x 750)", "JPEG", 12000, 750, "RGB"),
    ("largest PNG (8 MP RGBA, decoded whole)", "PNG", 2828, 2828, "RGBA"),
    ("largest WebP (8 MP, decoded whole)", "WEBP", 2828, 2828, "RGB"),
    ("the shipped 1.9 MP sample photo", "sample", 0, 0, ""),
    ("1 x 40,000,000 grey PNG (refused now)", "PNG", 1, 40_000_000, "L"),
)

MAKE = """
import io, sys
import numpy as np
from PIL import Image
fmt, width, height, mode, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if fmt == "sample":
    data = open("src/copilot_cli/samples/pump-housing-crack.jpg", "rb").read()
elif width * height > 50_000_000:  # the hostile PNG: written row by row, never held as pixels
    import struct, zlib
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw = zlib.compress(b"\\0\\x80" * height, 9)
    data = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
else:  # a smooth gradient: below the 10 MiB limit at every size
    row = np.linspace(0, 255, width, dtype=np.uint8)
    image = Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (height, width)))).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=85) if fmt == "JPEG" else image.save(buffer, fmt)
    data = buffer.getvalue()
open(out, "wb").write(data)
"""

#: measured in a fresh interpreter that only reads the file: its peak before decoding is the imports'
MEASURE = """
import json, resource, sys
from copilot.images import ImageLimits, ImageRejected
from services.vision.core import decode_image
from services.vision.backbone import pixels
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome = "decoded"
try:
    decoded = decode_image(data, ImageLimits(), working_size=256)
    prepared = pixels(decoded, 256)
    shape = list(decoded.size)
except ImageRejected as exc:
    outcome, shape = f"refused: {exc.violation.description}", []
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"bytes": len(data), "outcome": outcome, "decoded_size": shape,
                  "peak_above_baseline_mib": round((after - before) / 1024, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=data_dir() / "bench" / "image-memory.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name, fmt, width, height, mode in CASES:
            image = Path(folder) / "image"
            run = [sys.executable, "-c", MAKE, fmt, str(width), str(height), mode or "RGB", str(image)]
            subprocess.run(run, cwd=ROOT, check=True, timeout=600)
            done = subprocess.run(
                [sys.executable, "-c", MEASURE, str(image)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            )
            row = {"case": name, "width": width, "height": height, **json.loads(done.stdout.splitlines()[-1])}
            results.append(row)
    table = Table("case", "bytes", "decoded at", "peak MiB above baseline", "outcome", title="vision: memory per photo")
    for r in results:
        table.add_row(
            r["case"],
            f"{r['bytes']:,}",
            "x".join(map(str, r["decoded_size"])) or "-",
            f"{r['peak_above_baseline_mib']:.1f}",
            r["outcome"][:60],
        )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"about": __doc__.split("\n\n")[0], "results": results}, indent=2) + "\n")
    Console().print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
