"""KnowledgeService: a thin gRPC adapter over the knowledge core."""
from __future__ import annotations

import asyncio

import grpc

from opentelemetry import trace

from copilot.domain import FieldViolation
from copilot.runtime import convert
from copilot.runtime.errors import abort_invalid
from copilot.runtime.metrics import copilot_metrics
from copilot.v1 import knowledge_pb2, knowledge_pb2_grpc
from services.rag.core import KnowledgeBase

tracer = trace.get_tracer(__name__)

MAX_QUERY_CHARS = 4000
MAX_TOP_K = 20


def _check_text(field: str, value: str) -> list[FieldViolation]:
    if not value.strip():
        return [FieldViolation(field, "must not be empty")]
    if len(value) > MAX_QUERY_CHARS:
        return [FieldViolation(field, f"must be at most {MAX_QUERY_CHARS} characters (got {len(value)})")]
    return []


def _check_top_k(top_k: int) -> list[FieldViolation]:
    if not 0 <= top_k <= MAX_TOP_K:
        return [FieldViolation("top_k", f"must be between 0 (server default) and {MAX_TOP_K} (got {top_k})")]
    return []


def _record_retrieval(k: int, scores: list[float], fallback: bool | None) -> None:
    meters = copilot_metrics()
    meters.retrieval_results.record(k)
    if scores:
        meters.retrieval_top_score.record(max(scores))
    if fallback:
        meters.guidance_fallbacks.add(1)


class KnowledgeServicer(knowledge_pb2_grpc.KnowledgeServiceServicer):
    def __init__(self, knowledge: KnowledgeBase | None = None) -> None:
        self.knowledge = knowledge  # None until the process has loaded the model and the store

    async def _ready(self, context) -> KnowledgeBase:
        if self.knowledge is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "knowledge base is still loading")
        return self.knowledge

    async def Retrieve(self, request: knowledge_pb2.RetrieveRequest, context) -> knowledge_pb2.RetrieveResponse:
        violations = _check_text("query", request.query) + _check_top_k(request.top_k)
        if violations:
            await abort_invalid(context, violations)
        knowledge = await self._ready(context)
        with tracer.start_as_current_span("knowledge.retrieve") as span:
            chunks = await asyncio.to_thread(knowledge.retrieve, request.query, request.top_k or None)
            span.set_attributes({"app.retrieval.k": len(chunks), "app.sop_ids": [c.sop_id for c in chunks],
                                 "app.retrieval.scores": [c.score for c in chunks]})
            _record_retrieval(len(chunks), [c.score for c in chunks], fallback=None)
            return knowledge_pb2.RetrieveResponse(chunks=[convert.chunk_to_pb(c) for c in chunks])

    async def Advise(self, request: knowledge_pb2.AdviseRequest, context) -> knowledge_pb2.AdviseResponse:
        violations = _check_text("problem_description", request.problem_description) + _check_top_k(request.top_k)
        if violations:
            await abort_invalid(context, violations)
        knowledge = await self._ready(context)
        defects = [convert.defect_from_pb(d) for d in request.defects]
        with tracer.start_as_current_span("knowledge.advise") as span:
            span.set_attributes({"app.stage": "knowledge", "app.equipment_id": request.equipment_id,
                                 "app.defect_count": len(defects)})
            guidance = await asyncio.to_thread(
                knowledge.advise, request.problem_description, defects, request.top_k or None
            )
            _record_retrieval(len(guidance.citations), [c.score for c in guidance.citations], guidance.fallback)
            span.set_attributes({
                "app.sop_ids": sorted({c.sop_id for c in guidance.citations}),
                "app.step_count": len(guidance.steps),
                "app.confidence": guidance.confidence,
                "app.fallback": guidance.fallback,
            })
            return convert.guidance_to_pb(guidance)
