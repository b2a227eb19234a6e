"""ReportService: a thin gRPC adapter over the report core (request rules: protovalidate, in report.proto)."""

from __future__ import annotations

from opentelemetry import trace

from copilot.agents.v1 import report_pb2, report_pb2_grpc
from copilot.reporting import compose_report
from copilot.runtime import convert

tracer = trace.get_tracer(__name__)


class ReportServicer(report_pb2_grpc.ReportServiceServicer):
    async def ComposeReport(
        self, request: report_pb2.ComposeReportRequest, context
    ) -> report_pb2.ComposeReportResponse:
        with tracer.start_as_current_span("report.compose") as span:
            report = compose_report(convert.report_inputs_from_pb(request))
            span.set_attributes(
                {
                    "app.stage": "report",
                    "app.request_id": request.request_id,
                    "app.sop_ids": list(report.referenced_sop_ids),
                    "app.action_count": len(report.recommended_actions),
                    "app.defect_count": len(report.defects),
                }
            )
            return report_pb2.ComposeReportResponse(report=convert.report_to_pb(report))
