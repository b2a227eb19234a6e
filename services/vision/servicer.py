"""VisionService: a thin gRPC adapter over the vision providers and the reference store."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import datetime

import grpc
from opentelemetry import trace

from copilot.agents.v1 import vision_pb2, vision_pb2_grpc
from copilot.runtime import convert
from copilot.runtime.errors import Reason, abort_invalid, abort_with
from copilot.runtime.interceptors import Context
from copilot.runtime.metrics import copilot_metrics
from copilot.runtime.pagination import decode_page_token, encode_page_token, invalid_page_token, page_size
from services.vision.core import ImageRejected, NoReferenceImages, VisionEngine
from services.vision.providers import VisionProvider
from services.vision.references import Reference

tracer = trace.get_tracer(__name__)
DEFAULT_PAGE = 50
MAX_PAGE = 500


def _reference_pb(ref: Reference) -> vision_pb2.ReferenceImage:
    created = convert.timestamp_to_pb(datetime.fromisoformat(ref.created_at))
    return vision_pb2.ReferenceImage(
        reference_id=ref.reference_id,
        equipment_type=ref.equipment_type,
        label=ref.label,
        sha256=ref.sha256,
        width=ref.width,
        height=ref.height,
        created_at=created,
    )


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self) -> None:
        self.provider: VisionProvider | None = None  # attached by warm-up
        self.engine: VisionEngine | None = None  # the reference engine, when the provider uses one

    async def _provider(self, context: Context) -> VisionProvider:
        if self.provider is None:
            await abort_with(context, grpc.StatusCode.UNAVAILABLE, Reason.WARMING_UP, "vision model is still loading")
        return self.provider

    async def _engine(self, context: Context) -> VisionEngine:
        provider = await self._provider(context)
        if self.engine is None:
            await abort_with(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.REFERENCES_NOT_SUPPORTED,
                f"reference images are used by the patchcore provider, not {provider.name}",
                metadata={"provider": provider.name},
            )
        return self.engine

    async def AnalyzeImage(
        self, request: vision_pb2.AnalyzeImageRequest, context: Context
    ) -> vision_pb2.AnalyzeImageResponse:
        provider = await self._provider(context)
        with tracer.start_as_current_span("vision.analyze") as span:
            span.set_attributes(
                {
                    "app.stage": "vision",
                    "app.image_id": request.image_id,
                    "app.equipment_id": request.equipment_id,
                    "app.equipment_type": request.equipment_type,
                    "app.image.bytes": len(request.image.data),
                    "app.provider": provider.name,
                }
            )
            started = time.perf_counter()
            try:
                findings = await provider.analyze(request.image.data, request.equipment_type, request.include_heatmap)
            except ImageRejected as exc:
                span.set_attribute("app.rejected", exc.violation.description)
                await abort_invalid(context, [exc.violation])
            except NoReferenceImages as exc:
                await abort_with(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    Reason.NO_REFERENCE_IMAGES,
                    str(exc),
                    metadata={"equipment_type": request.equipment_type},
                )
            except Exception as exc:
                span.record_exception(exc)
                await abort_with(
                    context,
                    grpc.StatusCode.UNAVAILABLE,
                    Reason.MODEL_FAILED,
                    f"{provider.name} provider failed: {type(exc).__name__}",
                    metadata={"provider": provider.name},
                )
            meters = copilot_metrics()
            meters.inference_duration.record(time.perf_counter() - started, {"model": findings.model})
            for defect in findings.defects:
                meters.defects.add(1, {"type": defect.type})
            span.set_attributes(
                {
                    "app.defect_count": len(findings.defects),
                    "app.defect_types": [d.type for d in findings.defects],
                    "app.confidence": findings.confidence,
                    "app.anomaly_score": findings.anomaly_score,
                    "app.model": findings.model,
                    "app.reference_set": findings.reference_set,
                }
            )
            if not request.include_anomaly_map:
                findings = dataclasses.replace(findings, anomaly_map=None)
            return convert.findings_to_pb(findings)

    async def RegisterReference(self, request, context: Context) -> vision_pb2.RegisterReferenceResponse:
        engine = await self._engine(context)
        try:
            ref, created = await asyncio.to_thread(
                engine.register, request.equipment_type, request.label, request.image.data
            )
        except ImageRejected as exc:
            await abort_invalid(context, [exc.violation])
        return vision_pb2.RegisterReferenceResponse(reference=_reference_pb(ref), created=created)

    async def ListReferences(self, request, context: Context) -> vision_pb2.ListReferencesResponse:
        engine = await self._engine(context)
        after = ""
        filters = {"equipment_type": request.equipment_type}
        if request.page_token:
            position = decode_page_token(request.page_token, "ListReferences", 1, filters=filters)
            if position is None or not isinstance(position[0], str):
                await abort_invalid(context, [invalid_page_token("ListReferences")])
            after = position[0]
        refs = sorted(
            (r for r in engine.store.all() if not request.equipment_type or r.equipment_type == request.equipment_type),
            key=lambda r: r.reference_id,
        )
        remaining = [r for r in refs if r.reference_id > after]
        page = remaining[: page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE)]
        more = len(remaining) > len(page)
        token = encode_page_token("ListReferences", page[-1].reference_id, filters=filters) if more else ""
        return vision_pb2.ListReferencesResponse(references=[_reference_pb(r) for r in page], next_page_token=token)

    async def DeleteReference(self, request, context: Context) -> vision_pb2.DeleteReferenceResponse:
        engine = await self._engine(context)
        ref = await asyncio.to_thread(engine.delete, request.reference_id)
        if ref is None:
            await abort_with(
                context,
                grpc.StatusCode.NOT_FOUND,
                Reason.REFERENCE_NOT_FOUND,
                f"no reference {request.reference_id!r}",
                metadata={"reference_id": request.reference_id},
            )
        return vision_pb2.DeleteReferenceResponse()
