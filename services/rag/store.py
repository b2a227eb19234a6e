"""The document store: three Chroma collections, the chunks (with embeddings), a catalog of documents and the
identifier index (`services.rag.identifiers`: error codes and part numbers -> the chunks carrying them).

The catalog record of a document names its live version; a query keeps only chunks of live versions. A new
version is written beside the old one, then the catalog flips, then the old chunks are deleted, so a query
sees either all of the old version or all of the new one, never half of each, and a failed write leaves the
store as it was. The same holds with several knowledge replicas on one Chroma server, since the catalog lives
in Chroma too.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from copilot.domain import SopChunk
from copilot.equipment import canonical_scope
from services.rag import identifiers as identifier_index
from services.rag.corpus import Chunk, DocumentFormat, SopDocument, embedding_text
from services.rag.onnx_embedder import MODEL_IDS

log = logging.getLogger(__name__)

CHUNKS = "manufacturing_sops"
CATALOG = "manufacturing_documents"
#: Catalog records of documents whose chunks carry their identifiers and are in the identifier index (format 1:
#: written before chunks carried them; 2: before the identifier index collection).
INDEX_FORMAT = 3
ANY = "*"  # scope value of documents that apply to every equipment type / plant
#: The model every document was embedded with before catalog records named theirs: the float MiniLM.
LEGACY_EMBEDDER = MODEL_IDS["fp32"]


@dataclass(frozen=True)
class StoredDocument:
    """A document's catalog record: the live version and its scope."""

    document_id: str
    title: str
    version: str
    equipment_types: tuple[str, ...]
    plant_ids: tuple[str, ...]
    format: DocumentFormat
    filename: str
    chunk_count: int
    sections: tuple[str, ...]
    content_hash: str
    size_bytes: int
    ingested_at: datetime


@dataclass(frozen=True)
class IngestResult:
    """What an ingest did: created, replaced or unchanged, and the chunks written and removed."""

    document: StoredDocument
    outcome: str  # "created" | "replaced" | "unchanged"
    chunks_written: int
    chunks_removed: int


class VersionConflict(ValueError):
    """The same id and version were loaded before with different content."""


# Chroma's client is used as Any here: its result fields are Optional by `include`, and every call below asks
# for the fields it reads, so its types would only add None checks that cannot fail.
ChromaClient = Any


def open_client(persist_path: Path | None = None, host: str | None = None, port: int = 8000) -> ChromaClient:
    """`HttpClient` when a Chroma server host is given, else an embedded `PersistentClient`."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if host:
        return chromadb.HttpClient(host=host, port=port, settings=settings)
    assert persist_path is not None, "persist_path or host is required"
    persist_path.mkdir(parents=True, exist_ok=True)
    try:
        return chromadb.PersistentClient(path=str(persist_path), settings=settings)
    except Exception as exc:  # chromadb raises its own InternalError for a damaged file
        raise StoreUnreadable(
            f"the Chroma store at {persist_path} cannot be opened ({type(exc).__name__}: {exc}); refusing to serve "
            "from it: restore it from a backup, or move it away to start again from the shipped library"
        ) from exc


class StoreUnreadable(RuntimeError):
    """The embedded Chroma directory is damaged: the knowledge service will not serve from it."""


EquipmentScope = str | Collection[str]  # one type, or the names that all count as one machine


def _types(equipment_type: EquipmentScope) -> builtins.list[str]:
    """Scope values in their canonical form (`canonical_scope`): as documents are stored since they have one,
    and as earlier releases stored them (lower case), so stores written before need no migration."""
    names = [equipment_type] if isinstance(equipment_type, str) else list(equipment_type)
    return sorted({canonical_scope(n) for n in names if n and n.strip()})


def _scope_where(equipment_type: EquipmentScope = "", plant_id: str = "") -> dict[str, Any] | None:
    clauses: list[dict[str, Any]] = []
    types = _types(equipment_type)
    if types:
        clauses.append(
            {"$or": [*({"equipment_types": {"$contains": t}} for t in types), {"equipment_types": {"$contains": ANY}}]}
        )
    if plant_id:
        plant = canonical_scope(plant_id)
        clauses.append({"$or": [{"plant_ids": {"$contains": plant}}, {"plant_ids": {"$contains": ANY}}]})
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _stored(record_id: str, meta: Mapping[str, Any]) -> StoredDocument:
    return StoredDocument(
        document_id=record_id,
        title=meta["title"],
        version=meta["version"],
        equipment_types=tuple(t for t in meta.get("equipment_types", []) if t != ANY),
        # as the uploader wrote them (`plant_labels`, since scopes are compared canonically); else the stored form
        plant_ids=tuple(
            [p for p in meta.get("plant_labels") or () if p != ANY]
            or [p for p in meta.get("plant_ids", []) if p != ANY]
        ),
        format=DocumentFormat(meta.get("format", "markdown")),
        filename=meta.get("filename", ""),
        chunk_count=int(meta["chunk_count"]),
        sections=tuple(s for s in meta.get("sections", "").split("\n") if s),
        content_hash=meta["content_hash"],
        size_bytes=int(meta.get("size_bytes", 0)),
        ingested_at=datetime.fromtimestamp(float(meta.get("ingested_at", 0)), UTC),
    )


class DocumentStore:
    """Chunks, catalog and identifier index in Chroma (see the module docstring for atomicity)."""

    def __init__(self, client: ChromaClient) -> None:
        self.client = client
        # Embeddings are computed by the caller; Chroma's own (downloading) embedder is never used.
        self.chunks = client.get_or_create_collection(
            CHUNKS, embedding_function=None, metadata={"hnsw:space": "cosine"}
        )
        # Chroma stores records with vectors; the catalog's is a constant placeholder nobody queries by.
        self.catalog = client.get_or_create_collection(CATALOG, embedding_function=None)
        # The identifier index: record id = identifier (upper case), document = the ids of the chunks carrying it,
        # one per line. Read by key; written by the replica that ingests or deletes the document.
        self.identifier_index = client.get_or_create_collection(identifier_index.COLLECTION, embedding_function=None)
        self._write_lock = threading.Lock()  # one writer per process; Chroma serialises across processes

    # --- catalog --------------------------------------------------------------------------------

    def get(self, document_id: str) -> StoredDocument | None:
        found = self.catalog.get(ids=[document_id], include=["metadatas"])
        return _stored(found["ids"][0], found["metadatas"][0]) if found["ids"] else None

    def list(self, equipment_type: EquipmentScope = "", plant_id: str = "") -> list[StoredDocument]:
        found = self.catalog.get(where=_scope_where(equipment_type, plant_id), include=["metadatas"])
        return sorted(
            (_stored(i, m) for i, m in zip(found["ids"], found["metadatas"], strict=True)), key=lambda d: d.document_id
        )

    def live_versions(self, document_ids: Sequence[str]) -> dict[str, str]:
        if not document_ids:
            return {}
        found = self.catalog.get(ids=list(dict.fromkeys(document_ids)), include=["metadatas"])
        return {i: m["version"] for i, m in zip(found["ids"], found["metadatas"], strict=True)}

    def chunk_count(self) -> int:
        return int(self.chunks.count())

    def document_chunks(self, document_id: str, version: str | None = None) -> builtins.list[SopChunk]:
        """A document's chunks in order; `version` defaults to the live one (read from the catalog)."""
        if version is None:
            doc = self.get(document_id)
            if doc is None:
                return []
            version = doc.version
        found = self._version_chunks(document_id, version, ["documents", "metadatas"])
        chunks = [
            _chunk(i, t, m, 0.0) for i, t, m in zip(found["ids"], found["documents"], found["metadatas"], strict=True)
        ]
        return sorted(chunks, key=lambda c: c.position)

    def _version_chunks(self, document_id: str, version: str, include: builtins.list[str]) -> Any:
        """The chunk records of one version of a document (what `include` asks for), in no particular order."""
        return self.chunks.get(where={"$and": [{"sop_id": document_id}, {"version": version}]}, include=include)

    # --- writes ---------------------------------------------------------------------------------

    def ingest(
        self, doc: SopDocument, chunks: Sequence[Chunk], embeddings: Sequence[Sequence[float]], embedder: str
    ) -> IngestResult:
        """Write a parsed, chunked and embedded document (see the module docstring for the atomicity); `embedder`
        names the model that made the embeddings (kept in the catalog, see `reembed`)."""
        with self._write_lock:
            current = self.get(doc.document_id)
            if current is not None and current.version == doc.version:
                if current.content_hash == doc.content_hash:
                    return IngestResult(current, "unchanged", 0, 0)
                raise VersionConflict(
                    f"{doc.document_id} version {doc.version} is already loaded with different content; "
                    "give the new content a new version"
                )
            new_ids = [c.chunk_id for c in chunks]
            chunk_idents = [identifier_index.chunk_identifiers(c.document_id, c.text) for c in chunks]
            scope_types = _types(doc.equipment_types) or [ANY]
            scope_plants = sorted({canonical_scope(p) for p in doc.plant_ids}) or [ANY]
            try:
                for start in range(0, len(chunks), 1000):  # Chroma caps one write's batch size
                    part = slice(start, start + 1000)
                    # chunk metadata keeps the key "sop_id" (the document id) that existing stores hold
                    self.chunks.upsert(
                        ids=new_ids[part],
                        embeddings=[list(e) for e in embeddings[part]],
                        documents=[c.text for c in chunks[part]],
                        metadatas=[
                            {
                                "sop_id": c.document_id,
                                "version": c.version,
                                "title": c.title,
                                "section": c.section,
                                "position": c.position,
                                "equipment_types": scope_types,
                                "plant_ids": scope_plants,
                                "identifiers": idents,
                            }
                            for c, idents in zip(chunks[part], chunk_idents[part], strict=True)
                        ],
                    )
            except Exception:
                self._delete_quietly(new_ids)  # leave the store exactly as before
                raise
            record = {
                "title": doc.title,
                "version": doc.version,
                "equipment_types": scope_types,
                "plant_ids": scope_plants,
                "plant_labels": list(doc.plant_labels) or [ANY],
                "format": doc.format.value,
                "filename": doc.filename,
                "chunk_count": len(chunks),
                "sections": "\n".join(dict.fromkeys(s.heading for s in doc.sections)),
                "content_hash": doc.content_hash,
                "size_bytes": doc.size_bytes,
                "ingested_at": time.time(),
                "index_format": INDEX_FORMAT,
                "embedder": embedder,
            }
            previous = self._indexed_identifiers(doc.document_id, current)  # read before the switch replaces it
            try:
                self.catalog.upsert(ids=[doc.document_id], embeddings=[[1.0]], metadatas=[record])  # the switch
            except Exception:
                self._delete_quietly(new_ids)
                raise
            if not identifier_index.post(
                self.identifier_index, doc.document_id, identifier_index.postings(new_ids, chunk_idents), previous
            ):  # the next start indexes it again
                self.catalog.update(ids=[doc.document_id], metadatas=[{"index_format": 2}])
            removed = 0
            if current is not None:
                removed = self._delete_version_chunks(doc.document_id, keep_version=doc.version)
            log.info("ingested %s v%s (%d chunks, %d removed)", doc.document_id, doc.version, len(chunks), removed)
            return IngestResult(
                _stored(doc.document_id, record), "replaced" if current else "created", len(chunks), removed
            )

    def delete(self, document_id: str) -> int | None:
        """Remove a document; None when it was not loaded. The catalog goes first, so queries stop at once."""
        with self._write_lock:
            current = self.get(document_id)
            if current is None:
                return None
            indexed = self._indexed_identifiers(document_id, current)
            self.catalog.delete(ids=[document_id])
            identifier_index.post(self.identifier_index, document_id, {}, indexed)
            return self._delete_version_chunks(document_id, keep_version=None)

    def _indexed_identifiers(self, document_id: str, current: StoredDocument | None) -> builtins.list[str]:
        """The identifiers under which the live version's chunks are in the index (from their metadata; read on
        writes only, so that catalog reads on the query path stay small)."""
        if current is None:
            return []
        found = self._version_chunks(document_id, current.version, ["metadatas"])
        return sorted({i for m in found["metadatas"] for i in (m.get("identifiers") or [])})

    def _delete_version_chunks(self, document_id: str, keep_version: str | None) -> int:
        where: dict[str, Any] = {"sop_id": document_id}
        if keep_version is not None:
            where = {"$and": [{"sop_id": document_id}, {"version": {"$ne": keep_version}}]}
        stale = self.chunks.get(where=where, include=[])["ids"]
        if stale:
            self.chunks.delete(ids=stale)
        return len(stale)

    def _delete_quietly(self, ids: builtins.list[str]) -> None:
        try:
            if ids:
                self.chunks.delete(ids=ids)
        except Exception:  # the original error matters more; orphans of a dead version are never served
            log.exception("could not roll back %d chunks", len(ids))

    # --- queries --------------------------------------------------------------------------------

    def query(
        self, embedding: Sequence[float], k: int, equipment_type: EquipmentScope = "", plant_id: str = ""
    ) -> builtins.list[SopChunk]:
        """The k nearest chunks of live document versions, cosine similarity as score."""
        result = self.chunks.query(
            query_embeddings=[list(embedding)],
            n_results=k,
            where=_scope_where(equipment_type, plant_id),
            include=["documents", "metadatas", "distances"],
        )
        # a chunk deleted between the index search and the read (an old version going while a new one is live)
        # comes back without its document and metadata: it is not served
        return [
            _chunk(i, t, m, max(0.0, 1.0 - float(d)))
            for i, t, m, d in zip(
                result["ids"][0], result["documents"][0], result["metadatas"][0], result["distances"][0], strict=True
            )
            if t is not None and m is not None
        ]

    def lexical(
        self, terms: Sequence[str], limit: int, equipment_type: EquipmentScope = "", plant_id: str = ""
    ) -> builtins.list[tuple[SopChunk, builtins.list[float]]]:
        """Chunks carrying any of the identifiers (any case; see `chunk_identifiers`), with their vectors, in the
        scope: key lookups in the identifier index, then the chunks by id (chunks of a version being replaced may
        come too; the caller keeps live versions only)."""
        chunk_ids = identifier_index.lookup(self.identifier_index, terms)
        found: builtins.list[tuple[SopChunk, builtins.list[float]]] = []
        batch = max(limit * 2, 50)
        for start in range(0, len(chunk_ids), batch):
            got = self.chunks.get(
                ids=chunk_ids[start : start + batch], include=["documents", "metadatas", "embeddings"]
            )
            for i, t, m, e in zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"], strict=True):
                if t is not None and m is not None and _in_scope(m, equipment_type, plant_id):
                    found.append((_chunk(i, t, m, 0.0), list(e)))
            if len(found) >= limit:
                break
        return found[:limit]

    def reembed(
        self,
        embedder: str,
        embed: Callable[[builtins.list[str]], builtins.list[builtins.list[float]]],
        stop: threading.Event | None = None,
    ) -> int:
        """Embed again with `embed` the live chunks of every document whose catalog record names another model than
        `embedder` (records without one were written by releases that embedded with the float MiniLM). Vectors of
        two models are not comparable, so a query must meet vectors of its own model. Ids, text and metadata stay;
        a document is marked only once all its chunks are done, so a start that stops part way resumes at the next
        one, and a document replaced meanwhile is left to its writer's record; `stop` (set) ends the pass between
        two documents. Run in the background by every replica once it serves; idempotent. Returns the documents
        embedded again."""
        found = self.catalog.get(include=["metadatas"])
        redone = 0
        for document_id, meta in zip(found["ids"], found["metadatas"], strict=True):
            if meta.get("embedder", LEGACY_EMBEDDER) == embedder:
                continue
            if stop is not None and stop.is_set():
                break
            with self._write_lock:
                version = meta["version"]
                chunks = self._version_chunks(document_id, version, ["documents", "metadatas"])
                texts = [
                    embedding_text(m["title"], m["section"], t)
                    for t, m in zip(chunks["documents"], chunks["metadatas"], strict=True)
                ]
                for start in range(0, len(texts), 1000):
                    part = slice(start, start + 1000)
                    self.chunks.update(ids=chunks["ids"][part], embeddings=embed(texts[part]))
                current = self.get(document_id)
                if current is None or current.version != version:
                    continue  # replaced or deleted meanwhile: the new version is its writer's
                self.catalog.update(ids=[document_id], metadatas=[{"embedder": embedder}])
            redone += 1
        if redone:
            log.info("embedded the chunks of %d documents again with %s", redone, embedder)
        return redone

    def index_identifiers(self) -> int:
        """Bring documents stored by earlier releases (or whose index entries lost a concurrent update) into the
        identifier index: format 1 (chunks without their identifiers) gets them as chunk metadata, formats 1 and 2
        get their entries, from the live version's chunks. Metadata only: nothing is embedded again. Run at start
        by every replica; idempotent. Returns the documents upgraded."""
        found = self.catalog.get(include=["metadatas"])
        upgraded = 0
        for document_id, meta in zip(found["ids"], found["metadatas"], strict=True):
            old_format = int(meta.get("index_format", 1))
            if old_format >= INDEX_FORMAT:
                continue
            with self._write_lock:
                version = meta["version"]
                chunks = self._version_chunks(document_id, version, ["documents", "metadatas"])
                ids = chunks["ids"]
                idents = [
                    identifier_index.chunk_identifiers(document_id, t)
                    if old_format < 2
                    else list(m.get("identifiers") or [])
                    for t, m in zip(chunks["documents"], chunks["metadatas"], strict=True)
                ]
                if old_format < 2:
                    for start in range(0, len(ids), 1000):
                        part = slice(start, start + 1000)
                        self.chunks.update(ids=ids[part], metadatas=[{"identifiers": i} for i in idents[part]])
                if not identifier_index.post(
                    self.identifier_index, document_id, identifier_index.postings(ids, idents), []
                ):
                    continue  # stays in its old format: the next start tries again
                # update merges keys: the live version named in the record stays as another writer left it
                self.catalog.update(ids=[document_id], metadatas=[{"index_format": INDEX_FORMAT}])
            upgraded += 1
        if upgraded:
            log.info("indexed the identifiers of %d documents stored before the identifier index", upgraded)
        return upgraded


def _in_scope(meta: Mapping[str, Any], equipment_type: EquipmentScope, plant_id: str) -> bool:
    """The scope filter of `_scope_where`, on one chunk's metadata."""
    types, plants = meta.get("equipment_types") or [ANY], meta.get("plant_ids") or [ANY]
    wanted = _types(equipment_type)
    return (not wanted or ANY in types or any(t in types for t in wanted)) and (
        not plant_id or canonical_scope(plant_id) in plants or ANY in plants
    )


def _chunk(chunk_id: str, text: str, meta: Mapping[str, Any], score: float) -> SopChunk:
    return SopChunk(
        chunk_id=chunk_id,
        sop_id=meta["sop_id"],
        title=meta["title"],
        section=meta["section"],
        text=text,
        score=round(score, 4),
        version=meta.get("version", ""),
        position=int(meta.get("position", 0)),
        equipment_types=tuple(t for t in meta.get("equipment_types") or () if t != ANY),
    )
