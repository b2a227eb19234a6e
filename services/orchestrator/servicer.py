"""CopilotService: the public gRPC edge. Validates, then hands the request to the workflow."""
from __future__ import annotations

import time

from opentelemetry import trace

from copilot.runtime import convert
from copilot.runtime.errors import abort_invalid
from copilot.runtime.interceptors import current_principal
from copilot.v1 import copilot_pb2, copilot_pb2_grpc
from services.orchestrator.validation import validate_diagnosis
from services.orchestrator.workflow import DiagnosisWorkflow


class CopilotServicer(copilot_pb2_grpc.CopilotServiceServicer):
    def __init__(self, workflow: DiagnosisWorkflow, *, max_image_bytes: int) -> None:
        self.workflow = workflow
        self.max_image_bytes = max_image_bytes

    async def Diagnose(self, request: copilot_pb2.DiagnoseRequest, context) -> copilot_pb2.DiagnoseResponse:
        diagnosis_input = convert.diagnosis_input_from_pb(request)
        violations = validate_diagnosis(diagnosis_input, has_image=request.HasField("image"),
                                        max_image_bytes=self.max_image_bytes)
        if violations:
            await abort_invalid(context, violations)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        trace.get_current_span().set_attribute("app.principal", current_principal.get() or "")
        diagnosis = await self.workflow.run(diagnosis_input, deadline=deadline)
        return convert.diagnosis_to_pb(diagnosis)
