"""VisionService: a thin gRPC adapter over the vision core."""
from __future__ import annotations

import asyncio
import time

from opentelemetry import trace

from copilot.runtime import convert
from copilot.runtime.errors import abort_invalid
from copilot.runtime.metrics import copilot_metrics
from copilot.v1 import vision_pb2, vision_pb2_grpc
from services.vision.core import ImageRejected, TextureInspector

tracer = trace.get_tracer(__name__)


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, inspector: TextureInspector) -> None:
        self.inspector = inspector

    async def AnalyzeImage(self, request: vision_pb2.AnalyzeImageRequest, context) -> vision_pb2.AnalyzeImageResponse:
        with tracer.start_as_current_span("vision.analyze") as span:
            span.set_attributes({"app.stage": "vision", "app.image_id": request.image_id,
                                 "app.equipment_id": request.equipment_id, "app.image.bytes": len(request.image.data)})
            started = time.perf_counter()
            try:
                # CPU-bound: off the event loop so health checks and other calls keep flowing.
                findings = await asyncio.to_thread(self.inspector.analyze, request.image.data)
            except ImageRejected as exc:
                span.set_attribute("app.rejected", exc.violation.description)
                await abort_invalid(context, [exc.violation])
            meters = copilot_metrics()
            meters.inference_duration.record(time.perf_counter() - started, {"model": findings.model})
            for defect in findings.defects:
                meters.defects.add(1, {"type": defect.type})
            span.set_attributes({
                "app.defect_count": len(findings.defects),
                "app.defect_types": [d.type for d in findings.defects],
                "app.confidence": findings.confidence,
                "app.anomaly_score": findings.anomaly_score,
                "app.model": findings.model,
            })
            return convert.findings_to_pb(findings)
