"""One Diagnose = one trace with spans from all four services, received by an OTLP receiver the test runs."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import grpc
import pytest

from copilot.client import auth_metadata, diagnose_request
from copilot.v1 import copilot_pb2_grpc
from copilot_cli.launcher import Mesh, free_port
from tests.otlp_receiver import attributes, serve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def receiver():
    port = free_port()
    server, servicer = serve(f"127.0.0.1:{port}")
    yield servicer, port
    server.stop(0)


@pytest.fixture(scope="module")
def traced_mesh(receiver, tmp_path_factory):
    _, port = receiver
    mesh = Mesh.on_free_ports(
        data_dir=tmp_path_factory.mktemp("traced"),
        extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    mesh.start()
    try:
        mesh.wait_ready(timeout=180)
        yield mesh
    finally:
        mesh.stop()


def test_one_diagnosis_is_one_trace_across_four_services(receiver, traced_mesh, crack_photo):
    servicer, _ = receiver
    with grpc.insecure_channel(traced_mesh.address("orchestrator")) as channel:
        reply = copilot_pb2_grpc.CopilotServiceStub(channel).Diagnose(
            diagnose_request("PUNE-IN", "PUMP-A-7", "Pump overheating during operation", crack_photo),
            metadata=auth_metadata("technician-7"),
            timeout=30,
        )

    deadline = time.monotonic() + 20
    spans: list = []
    while time.monotonic() < deadline:
        roots = [
            s
            for svc, s in servicer.spans
            if s.name == "workflow.diagnose" and attributes(s).get("app.request_id") == reply.request_id
        ]
        if roots:
            spans = servicer.trace(roots[0].trace_id)
            if {svc for svc, _ in spans} >= {
                "copilot-orchestrator",
                "copilot-vision",
                "copilot-knowledge",
                "copilot-report",
            }:
                break
        time.sleep(0.2)
    by_service = defaultdict(set)
    for svc, span in spans:
        by_service[svc].add(span.name)
    assert set(by_service) == {"copilot-orchestrator", "copilot-vision", "copilot-knowledge", "copilot-report"}, (
        by_service
    )

    # every agent's server span hangs under an orchestrator client span: context crossed gRPC metadata
    ids = {span.span_id: (svc, span) for svc, span in spans}
    for svc, rpc in [
        ("copilot-vision", "/copilot.agents.v1.VisionService/AnalyzeImage"),
        ("copilot-knowledge", "/copilot.agents.v1.KnowledgeService/Advise"),
        ("copilot-report", "/copilot.agents.v1.ReportService/ComposeReport"),
    ]:
        (server_span,) = [
            s for v, s in spans if (v == svc and s.name == rpc.lstrip("/")) or (v == svc and s.name == rpc)
        ]
        parent_svc, _parent = ids[server_span.parent_span_id]
        assert parent_svc == "copilot-orchestrator"

    named = {span.name: attributes(span) for _, span in spans}
    assert named["workflow.vision"]["app.defect_count"] == len(reply.report.defects) > 0
    assert set(named["workflow.knowledge"]["app.sop_ids"]) <= set(reply.report.referenced_sop_ids)
    assert named["workflow.knowledge"]["app.sop_ids"]
    assert named["workflow.diagnose"]["app.confidence"] == pytest.approx(reply.confidence_score, abs=1e-4)
    assert named["workflow.report"]["app.stage"] == "report"
    assert named["knowledge.advise"]["app.stage"] == "knowledge"
    assert named["vision.analyze"]["app.defect_count"] == len(reply.report.defects)

    # the orchestrator's JSON log line for this call carries the same trace id and the principal
    trace_hex = spans[0][1].trace_id.hex()
    assert reply.trace_id == trace_hex
    lines = [
        json.loads(line)
        for line in traced_mesh.services["orchestrator"].log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    assert any(
        line.get("trace_id") == trace_hex
        and line.get("rpc.method", "").endswith("/Diagnose")
        and line.get("principal") == "technician-7"
        for line in lines
    )

    # the user (never a token) is on the server span of every hop: the orchestrator authenticated the technician and
    # calls the agents with its own service token, naming the user it calls for
    server_spans = [(svc, attributes(s)) for svc, s in spans if s.kind == s.SPAN_KIND_SERVER]
    assert {svc for svc, _ in server_spans} == set(by_service)
    assert all(attrs.get("enduser.id") == "technician-7" for _, attrs in server_spans), server_spans
    for svc, attrs in server_spans:
        if svc == "copilot-orchestrator":
            assert attrs.get("enduser.role") == "technician" and "copilot.caller" not in attrs
        else:
            assert attrs.get("copilot.caller") == "orchestrator" and "enduser.role" not in attrs
    assert not any("Bearer" in str(value) for _, s in spans for value in attributes(s).values())
    # the launcher polled every service's health until SERVING: those probes make no span and no INFO log line
    assert not any("grpc.health" in s.name for _, s in servicer.spans), {s.name for _, s in servicer.spans}
    assert not any(line.get("rpc.method", "").startswith("/grpc.health") for line in lines)
