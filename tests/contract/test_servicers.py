"""Each servicer through a real in-process gRPC server: its contract, its errors, health and reflection."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from copilot.agents.v1 import (
    knowledge_pb2,
    knowledge_pb2_grpc,
    report_pb2,
    report_pb2_grpc,
    vision_pb2,
    vision_pb2_grpc,
)
from copilot.client import auth_metadata, diagnose_request
from copilot.runtime.config import ServerSettings
from copilot.runtime.errors import field_violations
from copilot.runtime.server import ServiceSpec
from copilot.v1 import common_pb2, copilot_pb2, copilot_pb2_grpc

from .conftest import channel_to, serving

# --- vision -----------------------------------------------------------------------------------------


async def test_vision_analyses_the_photo_it_is_sent(vision_server, crack_photo, clean_photo):
    async with channel_to(vision_server, "service") as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        cracked = await stub.AnalyzeImage(vision_pb2.AnalyzeImageRequest(image=common_pb2.Image(data=crack_photo)))
        clean = await stub.AnalyzeImage(vision_pb2.AnalyzeImageRequest(image=common_pb2.Image(data=clean_photo)))
    assert {"crack", "corrosion"} <= {d.type for d in cracked.defects}
    assert all(
        d.HasField("box") and 0 <= d.box.x_min < d.box.x_max <= 1
        for d in cracked.defects
        if d.type != "surface-roughness"
    )
    assert len(clean.defects) == 0 and clean.model == "patchcore/efficientnet-lite0"
    assert cracked.reference_set == "generic"  # no equipment type given


@pytest.mark.parametrize(("data", "fragment"), [(b"", "empty"), (b"not an image at all", "not a JPEG")])
async def test_vision_rejects_bad_images_with_field_details_and_keeps_serving(
    vision_server, crack_photo, data, fragment
):
    async with channel_to(vision_server, "service") as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.AnalyzeImage(vision_pb2.AnalyzeImageRequest(image=common_pb2.Image(data=data)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        (violation,) = field_violations(err.value)
        assert violation.field == "image.data" and fragment in violation.description
        again = await stub.AnalyzeImage(vision_pb2.AnalyzeImageRequest(image=common_pb2.Image(data=crack_photo)))
        assert again.defects


async def test_vision_references_register_list_page_and_delete(vision_server, crack_photo):
    async with channel_to(vision_server) as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        image = common_pb2.Image(data=crack_photo)
        added = await stub.RegisterReference(
            vision_pb2.RegisterReferenceRequest(equipment_type="pump-housing", label="crack", image=image)
        )
        again = await stub.RegisterReference(
            vision_pb2.RegisterReferenceRequest(equipment_type="pump-housing", label="crack", image=image)
        )
        assert added.created and not again.created and again.reference.reference_id == added.reference.reference_id
        assert added.reference.sha256 and added.reference.width == 512 and added.reference.created_at.seconds > 0

        seen, token = [], ""
        while True:
            page = await stub.ListReferences(vision_pb2.ListReferencesRequest(page_size=25, page_token=token))
            seen += [r.reference_id for r in page.references]
            token = page.next_page_token
            if not token:
                break
        assert len(seen) == len(set(seen)) == 63  # 62 starter images + the one just added
        only = await stub.ListReferences(vision_pb2.ListReferencesRequest(equipment_type="pump-housing"))
        assert [r.label for r in only.references] == ["crack"]

        await stub.DeleteReference(vision_pb2.DeleteReferenceRequest(reference_id=added.reference.reference_id))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.DeleteReference(vision_pb2.DeleteReferenceRequest(reference_id=added.reference.reference_id))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListReferences(vision_pb2.ListReferencesRequest(page_size=-1))
        assert {v.field for v in field_violations(err.value)} == {"page_size"}  # protovalidate rule
        huge = await stub.ListReferences(vision_pb2.ListReferencesRequest(page_size=10_000))  # served at 500
        assert 0 < len(huge.references) <= 500
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListReferences(vision_pb2.ListReferencesRequest(page_token="%%%"))
        assert {v.field for v in field_violations(err.value)} == {"page_token"}  # semantic check in the servicer
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RegisterReference(
                vision_pb2.RegisterReferenceRequest(equipment_type="Pump", label="good", image=image)
            )
        assert [v.field for v in field_violations(err.value)] == ["equipment_type"]


async def test_vision_heatmap_on_request(vision_server, crack_photo):
    async with channel_to(vision_server, "service") as channel:
        reply = await vision_pb2_grpc.VisionServiceStub(channel).AnalyzeImage(
            vision_pb2.AnalyzeImageRequest(
                image=common_pb2.Image(data=crack_photo), equipment_type="brushed-steel", include_heatmap=True
            )
        )
    assert reply.heatmap_png.startswith(b"\x89PNG") and reply.reference_set == "brushed-steel"
    assert not reply.HasField("anomaly_map") and not reply.generic_reference_set


async def test_vision_raw_anomaly_map_on_request(vision_server, crack_photo):
    async with channel_to(vision_server, "service") as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        image = common_pb2.Image(data=crack_photo)
        reply = await stub.AnalyzeImage(
            vision_pb2.AnalyzeImageRequest(image=image, equipment_type="brushed-steel", include_anomaly_map=True)
        )
        generic = await stub.AnalyzeImage(vision_pb2.AnalyzeImageRequest(image=image, equipment_type="gearbox"))
    grid = reply.anomaly_map
    assert grid.width == grid.height == 32 and len(grid.values) == 32 * 32
    # above the threshold (1.0) under each defect box, at it nowhere else far from them
    for defect in reply.defects:
        x = int((defect.box.x_min + defect.box.x_max) / 2 * grid.width)
        y = int((defect.box.y_min + defect.box.y_max) / 2 * grid.height)
        assert grid.values[y * grid.width + x] > 1.0
    assert min(grid.values) < 1.0 and reply.heatmap_png == b""
    assert generic.generic_reference_set and generic.reference_set == "generic" and generic.confidence < 0.5
    # the type's threshold, calibrated on its own ten good references: every one held out scored below it, and the
    # defective photo's peak is above the best of them
    calibration = reply.calibration
    assert calibration.calibrated and calibration.good_references == 10
    assert 0 < calibration.median_good_score <= calibration.largest_good_score < 1.0 < max(grid.values)


# --- knowledge --------------------------------------------------------------------------------------


async def test_knowledge_retrieve_and_advise(knowledge_server):
    async with channel_to(knowledge_server, "service") as channel:
        stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
        retrieved = await stub.Retrieve(knowledge_pb2.RetrieveRequest(query="welding gas flow and porosity", top_k=2))
        advice = await stub.Advise(
            knowledge_pb2.AdviseRequest(
                problem_description="CNC machine overheating during operation",
                defects=[common_pb2.Defect(type="crack", confidence=0.9)],
            )
        )
    assert len(retrieved.chunks) == 2 and retrieved.chunks[0].sop_id == "MAINT-GUIDE-V2"
    assert advice.steps and advice.steps[0].sop_ids == ["SOP-123"]
    assert advice.query.endswith("Defects observed: crack.")
    assert {c.sop_id for c in advice.citations} >= {s.sop_ids[0] for s in advice.steps}


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (knowledge_pb2.AdviseRequest(problem_description="   "), {"problem_description"}),
        (knowledge_pb2.AdviseRequest(problem_description="ok text", top_k=99), {"top_k"}),
        (knowledge_pb2.AdviseRequest(problem_description="", top_k=-1), {"problem_description", "top_k"}),
    ],
)
async def test_knowledge_rejects_bad_requests(knowledge_server, request_, fields):
    async with channel_to(knowledge_server, "service") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await knowledge_pb2_grpc.KnowledgeServiceStub(channel).Advise(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in field_violations(err.value)} == fields


# --- report -----------------------------------------------------------------------------------------


async def test_report_composes_the_structured_report(report_server):
    request = report_pb2.ComposeReportRequest(
        request_id="r-1",
        plant_id="PUNE-IN",
        equipment_id="CNC-A-102",
        problem_description="Overheating badly",
        guidance=[common_pb2.GuidanceStep(text="Check coolant.", sop_ids=["SOP-123"])],
        confidence_score=0.8,
    )
    async with channel_to(report_server, "service") as channel:
        reply = await report_pb2_grpc.ReportServiceStub(channel).ComposeReport(request)
    report = reply.report
    assert report.recommended_actions[0].sop_ids == ["SOP-123"] and report.referenced_sop_ids == ["SOP-123"]
    assert report.generated_at.seconds > 0 and report.rendered_text.startswith("MANUFACTURING INCIDENT REPORT")


async def test_report_rejects_missing_fields(report_server):
    async with channel_to(report_server, "service") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await report_pb2_grpc.ReportServiceStub(channel).ComposeReport(
                report_pb2.ComposeReportRequest(confidence_score=2)
            )
    assert {v.field for v in field_violations(err.value)} == {
        "request_id",
        "plant_id",
        "equipment_id",
        "problem_description",
        "confidence_score",
    }


# --- orchestrator -----------------------------------------------------------------------------------


async def test_diagnose_through_all_agents(copilot_server, crack_photo):
    request = diagnose_request("PUNE-IN", "PUMP-A-7", "Pump housing overheating during operation", crack_photo, "img-1")
    async with channel_to(copilot_server) as channel:
        reply = await copilot_pb2_grpc.CopilotServiceStub(channel).Diagnose(
            request, metadata=auth_metadata("technician-7")
        )
    assert [s.state for s in reply.stages] == [copilot_pb2.STAGE_STATE_OK] * 3
    assert {"crack", "corrosion"} <= {d.type for d in reply.report.defects}
    assert {"PUMP-330", "MOTOR-240"} & set(reply.report.referenced_sop_ids)  # the pump and motor manuals
    expected = round((reply.stages[0].confidence + reply.stages[1].confidence) / 2, 4)
    assert reply.confidence_score == pytest.approx(expected, abs=1e-4)
    assert reply.requires_manual_review == (reply.confidence_score < 0.5)
    assert reply.request_id and reply.safety_disclaimer


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer admin-1"),),
        (("authorization", "technician-1"),),
        (("authorization", "Bearer technician-"),),
    ],
)
async def test_diagnose_needs_a_technician_token(copilot_server, metadata):
    async with channel_to(copilot_server, role=None) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await copilot_pb2_grpc.CopilotServiceStub(channel).Diagnose(
                diagnose_request("PUNE-IN", "CNC-A-102", "Machine overheating during operation"), metadata=metadata
            )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_diagnose_validation_names_every_field(copilot_server):
    request = copilot_pb2.DiagnoseRequest(
        plant_id="pune",
        equipment_id="ab",
        problem_description="<bad>",
        image=common_pb2.Image(data=b"GIF89a...", mime_type="image/jpeg"),
    )
    async with channel_to(copilot_server) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await copilot_pb2_grpc.CopilotServiceStub(channel).Diagnose(request, metadata=auth_metadata())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in field_violations(err.value)]
    assert set(fields) == {"plant_id", "equipment_id", "problem_description", "image.data"}
    assert "plant_id" in err.value.details()


# --- shared runtime: health, reflection, errors -----------------------------------------------------


async def test_health_and_reflection_on_every_server(vision_server, knowledge_server, report_server, copilot_server):
    for server in (vision_server, knowledge_server, report_server, copilot_server):
        async with channel_to(server) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", *server.spec.service_names):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = [
                r
                async for r in stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
            ]
            listed = {s.name for s in responses[0].list_services_response.service}
            assert set(server.spec.service_names) | {"grpc.health.v1.Health"} <= listed


async def test_health_is_not_serving_until_warm_up_finishes_and_during_shutdown():
    loaded = asyncio.Event()
    spec = ServiceSpec(
        name="slow",
        service_names=["copilot.agents.v1.ReportService"],
        register=lambda server: None,
        warm_up=loaded.wait,
    )
    async with serving(spec, ServerSettings(port=0), ready=False) as server, channel_to(server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            await health.Check(health_pb2.HealthCheckRequest())
        ).status == health_pb2.HealthCheckResponse.NOT_SERVING
        loaded.set()
        await server.wait_ready()
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING


async def test_knowledge_answers_unavailable_while_loading():
    from services.rag.servicer import KnowledgeServicer

    spec = ServiceSpec(
        name="knowledge",
        service_names=["copilot.agents.v1.KnowledgeService"],
        register=lambda s: knowledge_pb2_grpc.add_KnowledgeServiceServicer_to_server(KnowledgeServicer(), s),
        warm_up=asyncio.Event().wait,
    )
    async with serving(spec, ServerSettings(port=0), ready=False) as server, channel_to(server, "service") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await knowledge_pb2_grpc.KnowledgeServiceStub(channel).Retrieve(knowledge_pb2.RetrieveRequest(query="x"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_unexpected_errors_become_internal_without_leaking_details(monkeypatch):
    from services.report import servicer as report_servicer
    from services.report.server import ReportSettings, build

    def explode(_inputs):
        raise RuntimeError("secret database password in a stack trace")

    monkeypatch.setattr(report_servicer, "compose_report", explode)
    request = report_pb2.ComposeReportRequest(
        request_id="r-1", plant_id="PUNE-IN", equipment_id="CNC-A-102", problem_description="x" * 12
    )
    async with serving(*build(ReportSettings(port=0))) as server, channel_to(server, "service") as channel:
        stub = report_pb2_grpc.ReportServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ComposeReport(request)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in err.value.details() and "trace id" in err.value.details()
        monkeypatch.undo()
        assert (await stub.ComposeReport(request)).report.summary  # still serving
