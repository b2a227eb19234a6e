"""The knowledge service's embedder, int8 against float MiniLM, measured in one run so the ratios hold on a noisy
machine: CPU per query in-process (one query, batches of 8), `copilot eval` quality on the labelled set, and the
mesh's text Diagnose throughput at 8 and 32 clients with CPU per diagnosis per process, the knowledge service
restarted with one embedder then the other (alternating, `--rounds` times; each switch embeds the store again).

    python -m benchmarks.embedder [--rounds 2] [--diagnoses 600] [--out .copilot-data/bench/embedder.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from copilot.runtime.config import data_dir

KINDS = ("onnx-int8", "onnx")  # the default, then the float graph it replaced


def _cpu_per_query_ms(embedder, texts: list[str], batch: int, rounds: int = 200) -> float:
    for _ in range(10):
        embedder.embed_documents(texts[:batch])
    started = time.process_time()
    for i in range(rounds):
        part = [texts[(i * batch + j) % len(texts)] for j in range(batch)]
        embedder.embed_documents(part)
    return round((time.process_time() - started) * 1000 / (rounds * batch), 3)


def in_process(folder: Path) -> dict:
    from services.rag.core import AdvisorTuning, KnowledgeBase, open_store
    from services.rag.corpus import starter_corpus
    from services.rag.embedders import minilm_embedder
    from services.rag.evaluation import LABELLED_QUESTIONS, evaluate, load_questions

    questions = load_questions(LABELLED_QUESTIONS)
    texts = [q.text for q in questions]
    results: dict = {}
    for kind in KINDS:
        embedder = minilm_embedder(kind=kind, onnx_dir=folder / "models")  # type: ignore[arg-type]
        store = open_store(folder / f"chroma-{kind}")
        KnowledgeBase(store, embedder).ensure_documents(starter_corpus())
        report = evaluate(KnowledgeBase(store, embedder, AdvisorTuning(hybrid=True)), questions)
        summary = report.summary()
        summary.pop("results", None)
        results[kind] = {
            "cpu_ms_per_query_single": _cpu_per_query_ms(embedder, texts, 1),
            "cpu_ms_per_query_batch8": _cpu_per_query_ms(embedder, texts, 8, rounds=60),
            "eval": {k: float(v) for k, v in summary.items()},
        }
    return results


def mesh_ab(folder: Path, rounds: int, diagnoses: int, console: Console) -> dict:
    from benchmarks.mesh import _throughput, restart_with
    from copilot_cli.launcher import Mesh

    mesh = Mesh.on_free_ports(data_dir=folder / "mesh", extra_env={"ORCHESTRATOR_RATE_LIMIT": "1000000/minute"})
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    mesh.start()
    try:
        mesh.wait_ready()
        for _ in range(rounds):
            for kind in KINDS:
                with console.status(f"knowledge on {kind}: restart, then 8 and 32 clients…"):
                    restart_with(mesh, "knowledge", KNOWLEDGE_EMBEDDER=kind)
                    pids = {name: proc.handle.pid for name, proc in mesh.services.items() if name != "vision"}
                    address = mesh.address("orchestrator")
                    _throughput(address, 8, 100, None)  # warm the new process
                    runs[kind].append({str(c): _throughput(address, c, diagnoses, None, pids) for c in (8, 32)})
    finally:
        mesh.stop()
    summary: dict = {}
    for kind, rs in runs.items():
        summary[kind] = {
            clients: {
                "per_s": round(statistics.fmean(r[clients]["per_s"] for r in rs), 1),
                "errors": sum(sum(r[clients]["errors"].values()) for r in rs),
                "cpu_ms_per_diagnosis": {
                    name: round(statistics.fmean(r[clients]["cpu_ms_per_diagnosis"][name] for r in rs), 2)
                    for name in rs[0][clients].get("cpu_ms_per_diagnosis", {})
                },
            }
            for clients in ("8", "32")
        }
    return {"rounds": runs, "mean": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two embedders in the mesh")
    parser.add_argument("--diagnoses", type=int, default=600, help="text diagnoses per throughput run")
    parser.add_argument("--out", type=Path, default=data_dir() / "bench" / "embedder.json")
    args = parser.parse_args()
    console = Console()
    results: dict = {"when": datetime.now(UTC).isoformat(), "kinds": list(KINDS)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with console.status("in-process: CPU per query and copilot eval, int8 and float…"):
            results["in_process"] = in_process(folder)
        results["mesh"] = mesh_ab(folder, args.rounds, args.diagnoses, console)
    table = Table(title="MiniLM int8 vs float (one run)")
    for column in ("embedder", "ms/query", "ms/query (8)", "recall@3", "citation prec.", "per s 8 / 32", "CPU ms 8cl"):
        table.add_column(column)
    for kind in KINDS:
        local, mesh = results["in_process"][kind], results["mesh"]["mean"][kind]
        table.add_row(
            kind,
            f"{local['cpu_ms_per_query_single']:.2f}",
            f"{local['cpu_ms_per_query_batch8']:.2f}",
            f"{local['eval']['recall_at_3']:.3f}",
            f"{local['eval']['citation_precision']:.3f}",
            f"{mesh['8']['per_s']:.1f} / {mesh['32']['per_s']:.1f}",
            ", ".join(f"{k} {v:.1f}" for k, v in mesh["8"]["cpu_ms_per_diagnosis"].items()),
        )
    console.print(table)
    int8, float32 = results["mesh"]["mean"]["onnx-int8"], results["mesh"]["mean"]["onnx"]
    results["ratios"] = {
        f"throughput_{c}_clients": round(int8[c]["per_s"] / float32[c]["per_s"], 3) for c in ("8", "32")
    } | {
        f"knowledge_cpu_{c}_clients": round(
            int8[c]["cpu_ms_per_diagnosis"]["knowledge"] / float32[c]["cpu_ms_per_diagnosis"]["knowledge"], 3
        )
        for c in ("8", "32")
    }
    console.print(f"int8 / float: {results['ratios']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
