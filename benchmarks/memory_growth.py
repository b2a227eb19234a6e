"""How a vision or knowledge process's memory grows with what it holds (sizing the pods' memory requests).

    python -m benchmarks.memory_growth [--out .copilot-data/bench/memory-growth.json]

Each service runs in a fresh subprocess: its core loaded as the server loads it (vision: the starter set,
62 references; knowledge: the shipped SOP library in an embedded Chroma store), then more of what grows it:
vision references of a new equipment type (generated good surfaces), knowledge documents (generated SOPs of
ten sections each). RSS after each step; the table shows MiB per added reference / document.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from copilot.runtime.config import data_dir

VISION = """
import json, resource, sys, tempfile
from pathlib import Path
from services.vision.samples import make_surface, to_bytes
from services.vision.core import VisionEngine
from services.vision.backbone import feature_extractor
from services.vision.references import ReferenceStore

def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20

engine = VisionEngine(feature_extractor(), ReferenceStore(Path(tempfile.mkdtemp())))
engine.seed_starter_set(); engine.load()
rows = [(len(engine.store), rss())]
for step in STEPS:
    while len(engine.store) < 62 + step:
        n = len(engine.store)
        engine.store.add("machined-steel", "good", to_bytes(make_surface("painted-panel", seed=1000 + n)), 256, 256)
    engine.load({"machined-steel"})
    rows.append((len(engine.store), rss()))
print(json.dumps(rows))
"""

KNOWLEDGE = """
import json, tempfile
from pathlib import Path
from services.rag.core import KnowledgeBase, open_store
from services.rag.embedders import minilm_embedder
from services.rag.corpus import DocumentMeta, parse_document, starter_corpus

def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20

kb = KnowledgeBase(open_store(Path(tempfile.mkdtemp())), minilm_embedder())
kb.ensure_documents(starter_corpus())
count = len(starter_corpus())
rows = [(count, rss())]
for step in STEPS:
    documents = []
    while count < len(starter_corpus()) + step:
        sections = "\\n\\n".join(
            f"## Step group {s}\\n" + "\\n".join(f"{i}. Check valve V-{count}-{s}-{i} torque and seal seating "
                                                 f"on line {count}, then record reading {i * s}." for i in range(1, 6))
            for s in range(1, 11))
        text = f"---\\nid: GEN-{count:04d}\\ntitle: Generated procedure {count}\\nversion: '1'\\n---\\n# Generated procedure {count}\\n\\n{sections}\\n"
        documents.append(parse_document(text.encode(), DocumentMeta(filename=f"GEN-{count:04d}.md")))
        count += 1
    kb.ensure_documents(documents)
    rows.append((count, rss()))
print(json.dumps(rows))
"""


def run(program: str, steps: list[int]) -> list[tuple[int, float]]:
    out = subprocess.run(
        [sys.executable, "-c", program.replace("STEPS", repr(steps))],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return [tuple(row) for row in json.loads(out.stdout.strip().splitlines()[-1])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=data_dir() / "bench" / "memory-growth.json")
    parser.add_argument("--references", type=int, nargs="+", default=[12, 24])
    parser.add_argument("--documents", type=int, nargs="+", default=[50, 100])
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {
        "vision": {"unit": "reference", "rows": run(VISION, args.references)},
        "knowledge": {"unit": "document (10 sections)", "rows": run(KNOWLEDGE, args.documents)},
    }
    print(f"{'service':<11}{'held':>8}{'RSS MiB':>10}{'MiB per unit':>15}")
    for service, result in results.items():
        rows = result["rows"]
        (n0, r0), (n1, r1) = rows[0], rows[-1]
        result["mib_per_unit"] = round((r1 - r0) / (n1 - n0), 3)
        for held, rss in rows:
            print(f"{service:<11}{held:>8}{rss:>10.0f}")
        print(f"{service:<11}{'':>8}{'':>10}{result['mib_per_unit']:>15.3f}  per {result['unit']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
