"""`copilot bench --suite retrieval`: embedding sentences/s, ingestion chunks/s, and retrieval p50/p99 at
1k, 10k and 100k chunks in an embedded Chroma store, in one run.

The large stores are synthetic: 2,000 generated maintenance sentences are embedded for real, and each stored
chunk gets one of those vectors plus small noise (re-normalised), so the vector index holds 100k distinct
vectors without spending half an hour embedding them. Every timed query goes through the real path:
MiniLM query embedding, Chroma HNSW search, the live-version check and the identifier boost.
"""

from __future__ import annotations

import json
import platform
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.mesh import percentiles

EQUIPMENT = [
    "press",
    "conveyor",
    "robot",
    "compressor",
    "boiler",
    "pump",
    "motor",
    "spindle",
    "welder",
    "chiller",
    "gearbox",
    "mixer",
    "oven",
    "lathe",
    "packer",
    "crane",
    "extruder",
    "dryer",
    "valve",
    "fan",
]
PARTS = [
    "bearing",
    "seal",
    "hose",
    "belt",
    "filter",
    "sensor",
    "nozzle",
    "coupling",
    "relay",
    "fuse",
    "gasket",
    "impeller",
    "roller",
    "clamp",
    "encoder",
    "heater",
    "thermocouple",
    "contactor",
    "cylinder",
    "chain",
]
SYMPTOMS = [
    "overheats",
    "leaks oil",
    "vibrates",
    "trips the breaker",
    "makes a grinding noise",
    "loses pressure",
    "runs slow",
    "stalls",
    "smokes",
    "shows an alarm",
    "drifts out of position",
    "wears unevenly",
]
ACTIONS = ["inspect", "replace", "clean", "tighten", "lubricate", "measure", "realign", "recalibrate", "flush", "test"]
QUERIES = [
    "pump mechanical seal leaking",
    "robot encoder alarm after power loss",
    "press loses pressure alarm E-0452",
    "conveyor belt slipping on the drive pulley",
    "compressor overheats in summer",
    "boiler burner flame failure",
    "motor trips on overload",
    "spindle bearing noise",
    "welder wire feed erratic",
    "dryer heater fault",
]


def _sentences(count: int, rng: random.Random) -> list[str]:
    out = []
    for i in range(count):
        eq, part = rng.choice(EQUIPMENT), rng.choice(PARTS)
        out.append(
            f"When the {eq} {rng.choice(SYMPTOMS)}, {rng.choice(ACTIONS)} the {part} and "
            f"{rng.choice(ACTIONS)} the {rng.choice(PARTS)}; fault code {eq[:2].upper()}-{i:04d}."
        )
    return out


def _metadata_scan(store, code: str, limit: int) -> list[str]:
    """The identifier lookup of the previous release: a `$contains` filter on each chunk's identifiers metadata
    (Chroma evaluates it record by record), with what the lookup returns (text, metadata, vector)."""
    where = {"identifiers": {"$contains": code.upper()}}
    return list(store.chunks.get(where=where, limit=limit, include=["documents", "metadatas", "embeddings"])["ids"])


def _contains_scan(store, code: str, limit: int) -> list[str]:
    """The identifier lookup before the index: Chroma's full-text `$contains` over every chunk's text."""
    variants = list(dict.fromkeys((code, code.upper(), code.lower())))
    where_document = {"$or": [{"$contains": v} for v in variants]} if len(variants) > 1 else {"$contains": code}
    return list(store.chunks.get(where_document=where_document, limit=limit, include=[])["ids"])


def run_retrieval(
    queries: int, output: Path, console: Console, sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
) -> dict:
    from services.rag.core import KnowledgeBase, open_store
    from services.rag.corpus import Chunk, SopDocument, chunk_document, starter_corpus
    from services.rag.embedders import minilm_embedder
    from services.rag.identifiers import identifiers

    rng = random.Random(7)
    embedder = minilm_embedder()
    embedder.embed_documents(["warm-up"])

    # 1. Embedding throughput (batch 64, normalised), on real library text.
    texts = [c.embedding_text for doc in starter_corpus() for c in chunk_document(doc)]
    texts = (texts * (512 // len(texts) + 1))[:512]
    started = time.perf_counter()
    embedder.embed_documents(texts)
    embed_rate = len(texts) / (time.perf_counter() - started)

    base_texts = _sentences(2000, rng)
    base = np.asarray(embedder.embed_documents(base_texts), dtype=np.float32)
    results: dict = {"embedding_sentences_per_s": round(embed_rate, 1), "sizes": {}}

    with tempfile.TemporaryDirectory() as folder:
        # 2. Ingestion through the real path (parse -> chunk -> embed -> store), the shipped library x 6 copies.
        kb = KnowledgeBase(open_store(Path(folder) / "ingest"), embedder)
        library = starter_corpus()
        started = time.perf_counter()
        written = 0
        for copy in range(6):
            for doc in library:
                written += kb.ingest(
                    SopDocument(f"{doc.document_id}-C{copy}", doc.title, doc.version, doc.sections, doc.equipment_types)
                ).chunks_written
        results["ingest_chunks_per_s"] = round(written / (time.perf_counter() - started), 1)
        results["ingest_chunks"] = written

        # 3. Retrieval latency at each size, one store grown step by step.
        store = open_store(Path(folder) / "scale")
        kb = KnowledgeBase(store, embedder)
        stored = 0
        doc_size = 1000
        codes = [identifiers(t)[-1] for t in base_texts[:200]]  # "PR-0007": each in ~1 of 2,000 chunks
        found_code = 0
        for size in sorted(sizes):
            build_started = time.perf_counter()
            while stored < size:
                n = min(doc_size, size - stored)
                doc_id = f"SYN-{stored // doc_size:05d}"
                picks = rng.choices(range(len(base_texts)), k=n)
                chunks = [
                    Chunk(doc_id, "1", "Synthetic manual", f"Section {i % 40}", base_texts[p], i)
                    for i, p in enumerate(picks)
                ]
                noise = np.random.default_rng(stored).normal(0, 0.04, size=(n, base.shape[1])).astype(np.float32)
                vectors = base[picks] + noise
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                doc = SopDocument(doc_id, "Synthetic manual", "1", ())
                store.ingest(doc, chunks, vectors.tolist(), embedder.model_id)
                stored += n
            build_s = time.perf_counter() - build_started
            for q in QUERIES[:3]:  # warm the index and caches
                kb.retrieve(q)
            latencies, vector_only = [], []
            for i in range(queries):
                q = QUERIES[i % len(QUERIES)]
                started = time.perf_counter()
                kb.retrieve(q)
                latencies.append((time.perf_counter() - started) * 1000)
                embedding = embedder.embed_query(q)
                started = time.perf_counter()
                store.query(embedding, 12)
                vector_only.append((time.perf_counter() - started) * 1000)
            # identifier queries: a fault code that is in the store, through the whole retrieval, and the lookup alone
            # by the identifier index (key lookups) against the two scans before it: `$contains` on the chunks'
            # identifiers metadata (previous release) and Chroma's full-text `$contains` (same store, same codes)
            with_code, indexed, metadata_scanned, scanned = [], [], [], []
            for i in range(queries):
                code = codes[i % len(codes)]
                q = f"{rng.choice(EQUIPMENT)} shows fault {code}"
                started = time.perf_counter()
                top = kb.retrieve(q)
                with_code.append((time.perf_counter() - started) * 1000)
                found_code += bool(top) and code in top[0].text
                started = time.perf_counter()
                store.lexical([code], 20)
                indexed.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                _metadata_scan(store, code, 20)
                metadata_scanned.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                _contains_scan(store, code, 20)
                scanned.append((time.perf_counter() - started) * 1000)
            results["sizes"][str(size)] = {
                "chunks": store.chunk_count(),
                "build_s": round(build_s, 1),
                "retrieve": percentiles(latencies),
                "retrieve_identifier_queries": percentiles(with_code),
                "identifier_top1_has_code": round(found_code / queries, 3),
                "vector_search": percentiles(vector_only),
                "identifier_index_lookup": percentiles(indexed),
                "metadata_contains_lookup": percentiles(metadata_scanned),
                "contains_scan_lookup": percentiles(scanned),
            }
            found_code = 0

    table = Table(
        "chunks",
        "retrieve p50 ms",
        "retrieve p99 ms",
        "with a code p50 ms",
        "with a code p99 ms",
        "vector search p50 ms",
        "vector search p99 ms",
        "code lookup p50 ms: index / metadata $contains / text $contains",
        "store build s",
        title=f"retrieval ({queries} queries per size; MiniLM query embedding included)",
    )
    for size, r in results["sizes"].items():
        table.add_row(
            f"{int(size):,}",
            f"{r['retrieve']['p50_ms']:.1f}",
            f"{r['retrieve']['p99_ms']:.1f}",
            f"{r['retrieve_identifier_queries']['p50_ms']:.1f}",
            f"{r['retrieve_identifier_queries']['p99_ms']:.1f}",
            f"{r['vector_search']['p50_ms']:.1f}",
            f"{r['vector_search']['p99_ms']:.1f}",
            f"{r['identifier_index_lookup']['p50_ms']:.1f} / {r['metadata_contains_lookup']['p50_ms']:.1f} / "
            f"{r['contains_scan_lookup']['p50_ms']:.1f}",
            f"{r['build_s']:.0f}",
        )
    console.print(table)
    console.print(
        f"embedding: {results['embedding_sentences_per_s']:.0f} sentences/s (batch 64); ingestion through "
        f"parse/chunk/embed/store: {results['ingest_chunks_per_s']:.0f} chunks/s ({results['ingest_chunks']} chunks)"
    )
    results["meta"] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "queries_per_size": queries,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {output}")
    return results
