"""The LangGraph workflow around fake agents (the gRPC agents are exercised in contract/integration tests)."""
from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import grpc
import pytest

from copilot.domain import (
    Defect, DiagnosisInput, Guidance, GuidanceStep, IncidentReport, SopCitation, Stage, StageState, StageStatus,
    VisionFindings,
)
from services.orchestrator.workflow import DiagnosisWorkflow, StageTimeouts, merge_confidence
from services.report.core import compose_report


class FakeAgents:
    """Records calls; each agent can be made to fail or hang."""

    def __init__(self, vision_conf=0.9, knowledge_conf=0.8, fail=(), hang=()):
        self.vision_conf, self.knowledge_conf = vision_conf, knowledge_conf
        self.fail, self.hang = set(fail), set(hang)
        self.calls: list[tuple[str, float]] = []
        self.seen_defects = None
        self.seen_inputs = None

    async def _maybe(self, name, timeout):
        self.calls.append((name, timeout))
        if name in self.fail:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details=f"{name} is down")
        if name in self.hang:
            await asyncio.wait_for(asyncio.sleep(3600), timeout)

    async def analyze_image(self, data, mime_type, image_id, equipment_id, equipment_type, timeout):
        await self._maybe("vision", timeout)
        return VisionFindings((Defect("crack", self.vision_conf),), self.vision_conf, 0.5, "1 defect", "fake")

    async def advise(self, problem_description, defects, plant_id, equipment_id, equipment_type, timeout):
        await self._maybe("knowledge", timeout)
        self.seen_defects = tuple(defects)
        return Guidance((GuidanceStep("Check coolant.", ("SOP-123",), ("Cooling",)),),
                        (SopCitation("SOP-123", "CNC", "Cooling", 0.7),), ("Lock out.",), self.knowledge_conf, False, "q")

    async def compose_report(self, inputs, timeout) -> IncidentReport:
        await self._maybe("report", timeout)
        self.seen_inputs = inputs
        return compose_report(inputs, datetime.now(timezone.utc))


TEXT = DiagnosisInput("PUNE-IN", "CNC-A-102", "Machine overheating during operation")
PHOTO = DiagnosisInput("PUNE-IN", "CNC-A-102", "Machine overheating during operation", image_data=b"\xff\xd8\xff...")


def _states(diagnosis):
    return {s.stage: s.state for s in diagnosis.stages}


async def test_with_image_all_three_agents_run_in_order_and_defects_feed_knowledge():
    agents = FakeAgents()
    diagnosis = await DiagnosisWorkflow(agents).run(PHOTO)
    assert [c[0] for c in agents.calls] == ["vision", "knowledge", "report"]
    assert agents.seen_defects == (Defect("crack", 0.9),)
    assert _states(diagnosis) == {Stage.VISION: StageState.OK, Stage.KNOWLEDGE: StageState.OK, Stage.REPORT: StageState.OK}
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
    assert merge_confidence([StageStatus(Stage.VISION, StageState.SKIPPED), ok(Stage.KNOWLEDGE, 0.6)]) == pytest.approx(0.6)
    assert merge_confidence([StageStatus(Stage.VISION, StageState.DEGRADED, "x"), ok(Stage.KNOWLEDGE, 0.8)]) == pytest.approx(0.4)
    assert merge_confidence([StageStatus(Stage.REPORT, StageState.OK)]) == 0.0
