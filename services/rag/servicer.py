"""KnowledgeService: a thin gRPC adapter over the knowledge core."""

from __future__ import annotations

import asyncio
import functools
from typing import NoReturn

import grpc
from opentelemetry import trace

from copilot.agents.v1 import knowledge_pb2, knowledge_pb2_grpc
from copilot.domain import FieldViolation
from copilot.runtime import convert
from copilot.runtime.errors import Reason, abort_invalid, abort_with
from copilot.runtime.interceptors import Context
from copilot.runtime.metrics import copilot_metrics
from copilot.runtime.pagination import decode_page_token, encode_page_token, invalid_page_token, page_size
from services.rag.core import KnowledgeBase
from services.rag.corpus import DocumentFormat, DocumentMeta, DocumentRejected
from services.rag.store import StoredDocument

tracer = trace.get_tracer(__name__)

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50  # page_size limits, query lengths and id formats are protovalidate rules in knowledge.proto

_FORMATS = {
    knowledge_pb2.DOCUMENT_FORMAT_MARKDOWN: DocumentFormat.MARKDOWN,
    knowledge_pb2.DOCUMENT_FORMAT_TEXT: DocumentFormat.TEXT,
    knowledge_pb2.DOCUMENT_FORMAT_PDF: DocumentFormat.PDF,
    knowledge_pb2.DOCUMENT_FORMAT_DOCX: DocumentFormat.DOCX,
    knowledge_pb2.DOCUMENT_FORMAT_HTML: DocumentFormat.HTML,
}
_FORMATS_PB = {v: k for k, v in _FORMATS.items()}
_OUTCOMES = {
    "created": knowledge_pb2.INGEST_OUTCOME_CREATED,
    "replaced": knowledge_pb2.INGEST_OUTCOME_REPLACED,
    "unchanged": knowledge_pb2.INGEST_OUTCOME_UNCHANGED,
}


def document_to_pb(doc: StoredDocument) -> knowledge_pb2.Document:
    ingested = convert.timestamp_to_pb(doc.ingested_at)
    return knowledge_pb2.Document(
        document_id=doc.document_id,
        title=doc.title,
        version=doc.version,
        equipment_types=list(doc.equipment_types),
        plant_ids=list(doc.plant_ids),
        format=_FORMATS_PB[doc.format],
        filename=doc.filename,
        chunk_count=doc.chunk_count,
        sections=list(doc.sections),
        content_hash=doc.content_hash,
        size_bytes=doc.size_bytes,
        ingested_at=ingested,
    )


def _record_retrieval(k: int, scores: list[float], fallback: bool | None) -> None:
    meters = copilot_metrics()
    meters.retrieval_results.record(k)
    if scores:
        meters.retrieval_top_score.record(max(scores))
    if fallback:
        meters.guidance_fallbacks.add(1)


async def _no_document(context: Context, document_id: str) -> NoReturn:
    await abort_with(
        context,
        grpc.StatusCode.NOT_FOUND,
        Reason.DOCUMENT_NOT_FOUND,
        f"document {document_id} is not loaded",
        metadata={"document_id": document_id},
    )


class KnowledgeServicer(knowledge_pb2_grpc.KnowledgeServiceServicer):
    def __init__(self, knowledge: KnowledgeBase | None = None) -> None:
        self.knowledge = knowledge  # None until the process has loaded the model and the store

    async def _ready(self, context: Context) -> KnowledgeBase:
        if self.knowledge is None:
            await abort_with(context, grpc.StatusCode.UNAVAILABLE, Reason.WARMING_UP, "knowledge base is still loading")
        return self.knowledge

    async def Retrieve(
        self, request: knowledge_pb2.RetrieveRequest, context: Context
    ) -> knowledge_pb2.RetrieveResponse:
        knowledge = await self._ready(context)
        with tracer.start_as_current_span("knowledge.retrieve") as span:
            chunks = await asyncio.to_thread(
                knowledge.retrieve,
                request.query,
                request.top_k or None,
                request.equipment_type,
                request.plant_id,
                await knowledge.query_embedding(request.query),
            )
            span.set_attributes(
                {
                    "app.retrieval.k": len(chunks),
                    "app.sop_ids": [c.sop_id for c in chunks],
                    "app.retrieval.scores": [c.score for c in chunks],
                }
            )
            _record_retrieval(len(chunks), [c.score for c in chunks], fallback=None)
            return knowledge_pb2.RetrieveResponse(chunks=[convert.chunk_to_pb(c) for c in chunks])

    async def Advise(self, request: knowledge_pb2.AdviseRequest, context: Context) -> knowledge_pb2.AdviseResponse:
        knowledge = await self._ready(context)
        defects = [convert.defect_from_pb(d) for d in request.defects]
        with tracer.start_as_current_span("knowledge.advise") as span:
            span.set_attributes(
                {"app.stage": "knowledge", "app.equipment_id": request.equipment_id, "app.defect_count": len(defects)}
            )
            embedding = await knowledge.query_embedding(knowledge.build_query(request.problem_description, defects))
            guidance = await asyncio.to_thread(
                functools.partial(
                    knowledge.advise,
                    request.problem_description,
                    defects,
                    top_k=request.top_k or None,
                    equipment_type=request.equipment_type,
                    plant_id=request.plant_id,
                    embedding=embedding,
                    equipment_id=request.equipment_id,
                )
            )
            meters = copilot_metrics()
            if guidance.citations_removed:
                meters.citations_removed.add(guidance.citations_removed, {"generator": guidance.generator})
            if guidance.unsupported_steps and not guidance.fallback:
                meters.unsupported_steps.add(guidance.unsupported_steps, {"generator": guidance.generator})
            _record_retrieval(len(guidance.citations), [c.score for c in guidance.citations], guidance.fallback)
            span.set_attributes(
                {
                    "app.sop_ids": sorted({c.sop_id for c in guidance.citations}),
                    "app.step_count": len(guidance.steps),
                    "app.confidence": guidance.confidence,
                    "app.fallback": guidance.fallback,
                    "app.generator": guidance.generator,
                    "app.citations_removed": guidance.citations_removed,
                    "app.cached": guidance.cached,
                    "app.equipment_type": guidance.equipment_type,
                    "app.equipment_source": guidance.equipment_source,
                    "app.language": guidance.language,
                    "app.reviews": [r.kind.value for r in guidance.reviews],
                }
            )
            return convert.guidance_to_pb(guidance)

    # --- documents ------------------------------------------------------------------------------

    async def IngestDocument(self, request_iterator, context: Context) -> knowledge_pb2.IngestDocumentResponse:
        knowledge = await self._ready(context)
        limit = knowledge.limits.max_bytes
        metadata: knowledge_pb2.DocumentMetadata | None = None
        parts: list[bytes] = []
        size = 0
        async for message in request_iterator:
            kind = message.WhichOneof("payload")
            if metadata is None:
                if kind != "metadata":
                    await abort_invalid(context, [FieldViolation("metadata", "the first message must carry metadata")])
                metadata = message.metadata
                continue
            if kind == "metadata":
                await abort_invalid(context, [FieldViolation("metadata", "only the first message may carry metadata")])
            size += len(message.content)
            if size > limit:  # stop reading: the rest would only fill memory
                await abort_invalid(context, [FieldViolation("content", f"is larger than the limit of {limit} bytes")])
            parts.append(message.content)
        if metadata is None:
            await abort_invalid(context, [FieldViolation("metadata", "is required (the stream was empty)")])
        meta = DocumentMeta(
            document_id=metadata.document_id,
            title=metadata.title,
            version=metadata.version,
            equipment_types=tuple(metadata.equipment_types),
            plant_ids=tuple(metadata.plant_ids),
            format=_FORMATS.get(metadata.format),
            filename=metadata.filename[:255],
        )
        with tracer.start_as_current_span("knowledge.ingest") as span:
            span.set_attributes({"app.document_id": metadata.document_id, "app.document_bytes": size})
            try:
                result = await asyncio.to_thread(knowledge.ingest_document, b"".join(parts), meta)
            except DocumentRejected as exc:
                copilot_metrics().documents_ingested.add(1, {"outcome": "rejected"})
                await abort_invalid(context, exc.violations)
            copilot_metrics().documents_ingested.add(1, {"outcome": result.outcome})
            span.set_attributes(
                {
                    "app.document_id": result.document.document_id,
                    "app.ingest.outcome": result.outcome,
                    "app.ingest.chunks_written": result.chunks_written,
                }
            )
        return knowledge_pb2.IngestDocumentResponse(
            document=document_to_pb(result.document),
            outcome=_OUTCOMES[result.outcome],
            chunks_written=result.chunks_written,
            chunks_removed=result.chunks_removed,
        )

    async def ListDocuments(self, request: knowledge_pb2.ListDocumentsRequest, context: Context):
        after = ""
        filters = {"equipment_type": request.equipment_type, "plant_id": request.plant_id}
        if request.page_token:
            position = decode_page_token(request.page_token, "ListDocuments", 1, filters=filters)
            if position is None or not isinstance(position[0], str):
                await abort_invalid(context, [invalid_page_token("ListDocuments")])
            after = position[0]
        knowledge = await self._ready(context)
        documents = await asyncio.to_thread(knowledge.list_documents, request.equipment_type, request.plant_id)
        remaining = [d for d in documents if d.document_id > after] if after else documents
        page = remaining[: page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)]
        more = len(remaining) > len(page)
        return knowledge_pb2.ListDocumentsResponse(
            documents=[document_to_pb(d) for d in page],
            total_size=len(documents),
            next_page_token=encode_page_token("ListDocuments", page[-1].document_id, filters=filters) if more else "",
        )

    async def GetDocument(self, request: knowledge_pb2.GetDocumentRequest, context: Context):
        knowledge = await self._ready(context)
        doc = await asyncio.to_thread(knowledge.get_document, request.document_id)
        if doc is None:
            await _no_document(context, request.document_id)
        chunks = await asyncio.to_thread(knowledge.document_chunks, request.document_id, doc.version)
        return knowledge_pb2.GetDocumentResponse(
            document=document_to_pb(doc), chunks=[convert.chunk_to_pb(c) for c in chunks]
        )

    async def DeleteDocument(self, request: knowledge_pb2.DeleteDocumentRequest, context: Context):
        knowledge = await self._ready(context)
        removed = await asyncio.to_thread(knowledge.delete_document, request.document_id)
        if removed is None:
            await _no_document(context, request.document_id)
        return knowledge_pb2.DeleteDocumentResponse(chunks_removed=removed)
