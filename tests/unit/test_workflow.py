"""The LangGraph workflow around fake agents (the gRPC agents are exercised in contract/integration tests)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from copilot.domain import (
    Defect,
    DiagnosisInput,
    EscalationReason,
    Guidance,
    GuidanceReview,
    GuidanceStep,
    IncidentReport,
    ReviewKind,
    SopCitation,
    Stage,
    StageState,
    StageStatus,
    VisionFindings,
)
from copilot.equipment import EquipmentRegistry, RegisteredEquipment
from services.orchestrator.decisions import merge_confidence
from services.orchestrator.equipment import EquipmentResolver
from services.orchestrator.workflow import DiagnosisWorkflow, StageTimeouts
from tests.fakes import FakeAgents

TEXT = DiagnosisInput("PUNE-IN", "CNC-A-102", "Machine overheating during operation")
PHOTO = DiagnosisInput("PUNE-IN", "CNC-A-102", "Machine overheating during operation", image_data=b"\xff\xd8\xff...")


def _states(diagnosis):
    return {s.stage: s.state for s in diagnosis.stages}


async def test_with_image_all_three_agents_run_in_order_and_defects_feed_knowledge():
    agents = FakeAgents()
    diagnosis = await DiagnosisWorkflow(agents).run(PHOTO)
    assert [c[0] for c in agents.calls] == ["vision", "knowledge", "report"]
    assert agents.seen_defects == (Defect("crack", 0.9),)
    assert _states(diagnosis) == {
        Stage.VISION: StageState.OK,
        Stage.KNOWLEDGE: StageState.OK,
        Stage.REPORT: StageState.OK,
    }
    assert diagnosis.confidence_score == pytest.approx(0.85)
    assert not diagnosis.requires_manual_review
    assert diagnosis.report.referenced_sop_ids == ("SOP-123",)
    assert agents.seen_inputs.confidence_score == pytest.approx(0.85)


async def test_without_image_vision_is_skipped_and_confidence_is_knowledge_alone():
    agents = FakeAgents(knowledge_conf=0.7)
    diagnosis = await DiagnosisWorkflow(agents).run(TEXT)
    assert [c[0] for c in agents.calls] == ["knowledge", "report"]
    vision = diagnosis.stages[0]
    assert (vision.stage, vision.state, vision.error) == (Stage.VISION, StageState.SKIPPED, "no image supplied")
    assert diagnosis.confidence_score == pytest.approx(0.7)


async def test_low_confidence_requires_manual_review():
    diagnosis = await DiagnosisWorkflow(FakeAgents(vision_conf=0.4, knowledge_conf=0.5)).run(PHOTO)
    assert diagnosis.confidence_score == pytest.approx(0.45) and diagnosis.requires_manual_review


@pytest.mark.parametrize("failing", ["vision", "knowledge", "report"])
async def test_a_failed_agent_degrades_its_stage_and_the_answer_still_comes(failing):
    diagnosis = await DiagnosisWorkflow(FakeAgents(fail={failing})).run(PHOTO)
    status = next(s for s in diagnosis.stages if s.stage.value == failing)
    assert status.state is StageState.DEGRADED and status.error == f"UNAVAILABLE: {failing} is down"
    assert diagnosis.report.rendered_text.startswith("MANUFACTURING INCIDENT REPORT")
    others = [s for s in diagnosis.stages if s.stage.value != failing]
    assert all(s.state is StageState.OK for s in others)
    if failing in ("vision", "knowledge"):  # a degraded stage counts 0.0 in the mean -> escalation
        assert diagnosis.requires_manual_review
    if failing == "report":
        assert "report agent was unavailable" in diagnosis.report.summary


async def test_a_hanging_agent_is_cut_at_its_stage_timeout():
    agents = FakeAgents(hang={"vision"})
    started = time.monotonic()
    diagnosis = await DiagnosisWorkflow(agents, StageTimeouts(vision=0.2)).run(PHOTO)
    assert time.monotonic() - started < 2
    assert diagnosis.stages[0].state is StageState.DEGRADED and "DEADLINE_EXCEEDED" in diagnosis.stages[0].error
    assert diagnosis.stages[1].state is StageState.OK


async def test_the_callers_deadline_bounds_every_stage():
    agents = FakeAgents()
    await DiagnosisWorkflow(agents).run(PHOTO, deadline=time.monotonic() + 1.0)
    assert all(0 < timeout <= 1.0 for _, timeout in agents.calls)


async def test_an_expired_deadline_degrades_without_calling():
    agents = FakeAgents()
    diagnosis = await DiagnosisWorkflow(agents).run(PHOTO, deadline=time.monotonic() - 1)
    assert agents.calls == []
    assert all(s.state is StageState.DEGRADED for s in diagnosis.stages)
    assert diagnosis.requires_manual_review


def test_merge_confidence_rules():
    ok = lambda stage, c: StageStatus(stage, StageState.OK, confidence=c)  # noqa: E731
    assert merge_confidence([ok(Stage.VISION, 0.9), ok(Stage.KNOWLEDGE, 0.5)]) == pytest.approx(0.7)
    assert merge_confidence([StageStatus(Stage.VISION, StageState.SKIPPED), ok(Stage.KNOWLEDGE, 0.6)]) == pytest.approx(
        0.6
    )
    assert merge_confidence(
        [StageStatus(Stage.VISION, StageState.DEGRADED, "x"), ok(Stage.KNOWLEDGE, 0.8)]
    ) == pytest.approx(0.4)
    assert merge_confidence([StageStatus(Stage.REPORT, StageState.OK)]) == 0.0


async def test_events_come_in_stage_order_with_partial_results_and_the_diagnosis_last():
    from services.orchestrator.workflow import StageFinished, StageStarted

    events = [e async for e in DiagnosisWorkflow(FakeAgents()).events(PHOTO, request_id="req-1")]
    kinds = [
        (type(e).__name__, getattr(e, "stage", None) or getattr(getattr(e, "status", None), "stage", None))
        for e in events
    ]
    assert kinds == [
        ("StageStarted", Stage.VISION),
        ("StageFinished", Stage.VISION),
        ("StageStarted", Stage.KNOWLEDGE),
        ("StageFinished", Stage.KNOWLEDGE),
        ("StageStarted", Stage.REPORT),
        ("StageFinished", Stage.REPORT),
        ("Diagnosis", None),
    ]
    assert all(e.request_id == "req-1" for e in events)
    finished = [e for e in events if isinstance(e, StageFinished)]
    assert isinstance(finished[0].result, VisionFindings) and finished[0].result.defects[0].type == "crack"
    assert isinstance(finished[1].result, Guidance) and finished[1].result.citations[0].sop_id == "SOP-123"
    assert isinstance(finished[2].result, IncidentReport)
    assert not any(
        isinstance(e, StageStarted) and e.stage is Stage.VISION
        for e in [x async for x in DiagnosisWorkflow(FakeAgents()).events(TEXT)]
    )


async def test_parallel_mode_runs_vision_and_knowledge_together_and_reports_once():
    agents = FakeAgents(delay_s=0.3)
    started = time.monotonic()
    diagnosis = await DiagnosisWorkflow(agents, parallel=True).run(PHOTO)
    elapsed = time.monotonic() - started
    assert [name for name, _ in agents.calls].count("report") == 1
    assert {name for name, _ in agents.calls[:2]} == {"vision", "knowledge"}
    assert agents.seen_defects == ()  # knowledge did not wait for vision
    assert elapsed < 0.3 * 3  # two stages overlapped (sequential would be >= 0.9 s)
    assert diagnosis.confidence_score == pytest.approx((0.9 + 0.8) / 2)
    assert [s.stage for s in diagnosis.stages] == [Stage.VISION, Stage.KNOWLEDGE, Stage.REPORT]


def test_escalation_reasons_name_every_cause():
    from copilot.domain import EscalationReason as R
    from services.orchestrator.workflow import FALLBACK_GUIDANCE, escalation_reasons

    good = Guidance(
        (GuidanceStep("Check coolant.", ("SOP-123",)),), (SopCitation("SOP-123", "t", "s", 0.7),), (), 0.8, False, "q"
    )
    ok = lambda stage, c: StageStatus(stage, StageState.OK, confidence=c)  # noqa: E731
    assert escalation_reasons([ok(Stage.VISION, 0.9), ok(Stage.KNOWLEDGE, 0.8)], 0.85, good) == ()
    assert escalation_reasons([ok(Stage.VISION, 0.3), ok(Stage.KNOWLEDGE, 0.8)], 0.55, good) == (
        R.LOW_VISION_CONFIDENCE,
    )
    degraded = [StageStatus(Stage.VISION, StageState.DEGRADED, "down"), ok(Stage.KNOWLEDGE, 0.8)]
    assert escalation_reasons(degraded, 0.4, good) == (R.STAGE_DEGRADED, R.LOW_CONFIDENCE)
    assert escalation_reasons([ok(Stage.KNOWLEDGE, 0.2)], 0.2, FALLBACK_GUIDANCE) == (
        R.LOW_CONFIDENCE,
        R.NO_SUPPORTING_SOP,
    )
    unsupported = Guidance((GuidanceStep("Guess.", (), (), unsupported=True),), good.citations, (), 0.8, False, "q")
    assert escalation_reasons([ok(Stage.KNOWLEDGE, 0.8)], 0.8, unsupported) == (R.UNSUPPORTED_GUIDANCE,)


async def test_diagnosis_carries_reasons_and_a_trace_id():
    from copilot.domain import EscalationReason

    diagnosis = await DiagnosisWorkflow(FakeAgents(fail={"vision"})).run(PHOTO)
    assert EscalationReason.STAGE_DEGRADED in diagnosis.escalation_reasons
    assert EscalationReason.LOW_CONFIDENCE in diagnosis.escalation_reasons
    assert len(diagnosis.trace_id) == 32


async def test_related_incidents_reach_the_report_and_a_failing_history_does_not_fail_the_diagnosis():
    from copilot.domain import PastIncident

    past = PastIncident(
        "old-1",
        datetime(2026, 1, 5, tzinfo=UTC),
        "Spindle overheating again",
        ("SOP-123",),
        "Replaced the coolant pump",
    )
    seen = {}

    async def related(request, request_id):
        seen["args"] = (request.equipment_id, request_id)
        return [past]

    agents = FakeAgents()
    diagnosis = await DiagnosisWorkflow(agents, related_incidents=related).run(TEXT, request_id="new-1")
    assert seen["args"] == ("CNC-A-102", "new-1")
    assert agents.seen_inputs.related_incidents == (past,)
    assert any("old-1" in line for line in diagnosis.report.follow_up)

    async def broken(request, request_id):
        raise RuntimeError("database is down")

    diagnosis = await DiagnosisWorkflow(FakeAgents(), related_incidents=broken).run(TEXT)
    assert diagnosis.report.summary and all(s.state is not StageState.DEGRADED for s in diagnosis.stages)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("request_input", [TEXT, PHOTO], ids=["text", "photo"])
async def test_a_run_hands_nothing_to_the_thread_pool(parallel, request_input, monkeypatch):
    """Routing and nodes stay on the event loop: a thread hand-off per diagnosis costs a GIL switch under load."""
    import asyncio

    loop = asyncio.get_running_loop()
    submitted = []
    run_in_executor = loop.run_in_executor

    def counting(executor, fn, *args):
        submitted.append(fn)
        return run_in_executor(executor, fn, *args)

    monkeypatch.setattr(loop, "run_in_executor", counting)
    diagnosis = await DiagnosisWorkflow(FakeAgents(), parallel=parallel).run(request_input)
    assert diagnosis.report.referenced_sop_ids == ("SOP-123",)
    assert submitted == []


async def test_guidance_that_needs_review_sends_the_diagnosis_to_review_whatever_its_confidence():
    """Knowledge at 0.95 from an air-compressor SOP for a chiller: the mean is high, the answer is not to trust."""
    review = GuidanceReview(
        ReviewKind.EQUIPMENT_NOT_COVERED, "No SOP in scope is written for chiller; the closest are for air-compressor"
    )
    agents = FakeAgents(knowledge_conf=0.95, reviews=(review,), sop_types=("air-compressor",))
    diagnosis = await DiagnosisWorkflow(agents).run(
        DiagnosisInput("PUNE-IN", "CH-901", "Chiller trips on high discharge pressure alarm", equipment_type="chiller")
    )
    assert diagnosis.confidence_score == 0.95 and diagnosis.requires_manual_review
    assert EscalationReason.EQUIPMENT_NOT_COVERED in diagnosis.escalation_reasons
    assert EscalationReason.LOW_CONFIDENCE not in diagnosis.escalation_reasons
    assert diagnosis.review_notes == (review.message,)
    report = diagnosis.report
    assert all(not a.sop_ids for a in report.recommended_actions)  # no compressor step as the recommendation
    assert [a.sop_ids for a in report.review_steps] == [("SOP-123",)]
    assert "REVIEW REQUIRED:" in report.rendered_text and review.message in report.rendered_text
    assert agents.seen_inputs.review_notes == (review.message,) and agents.seen_inputs.requires_manual_review


async def test_the_registry_decides_what_each_agent_is_told_about_the_equipment():
    agents = FakeAgents()
    registry = EquipmentRegistry([RegisteredEquipment("PUMP-*", "centrifugal-pump", "brushed-steel")])
    workflow = DiagnosisWorkflow(agents, equipment=EquipmentResolver(registry))
    diagnosis = await workflow.run(
        DiagnosisInput("PUNE-IN", "PUMP-A-7", "Crack near the outlet flange", image_data=b"\xff\xd8\xff...")
    )
    assert agents.seen_equipment == {"vision": "brushed-steel", "knowledge": "centrifugal-pump"}
    assert (diagnosis.equipment_type, diagnosis.reference_set) == ("centrifugal-pump", "brushed-steel")
    text_only = await workflow.run(DiagnosisInput("PUNE-IN", "PUMP-A-7", "Mechanical seal is dripping"))
    assert text_only.reference_set == "" and text_only.equipment_type == "centrifugal-pump"
