"""The diagnosis workflow: a LangGraph StateGraph vision -> knowledge -> report (vision skipped without
an image). Each node calls an agent through `AgentClients` with a deadline; a failed or late agent marks
its stage degraded and the workflow goes on with the seed's fallback result."""
from __future__ import annotations

import asyncio
import logging
import operator
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, TypedDict

import grpc
from langgraph.graph import END, START, StateGraph
from opentelemetry import trace

from copilot.domain import (
    Diagnosis,
    DiagnosisInput,
    Guidance,
    GuidanceStep,
    IncidentReport,
    RecommendedAction,
    ReportInputs,
    Stage,
    StageState,
    StageStatus,
    VisionFindings,
)
from copilot.report_format import render_text
from copilot.runtime.metrics import copilot_metrics
from services.orchestrator.clients import AgentClients

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

MANUAL_REVIEW_THRESHOLD = 0.5
SAFETY_DISCLAIMER = (
    "AI-generated guidance for a qualified technician. Follow your plant's safety procedures and "
    "lockout/tagout (SAFETY-SOP-001) before any maintenance, and verify every step against the cited SOPs."
)
FALLBACK_GUIDANCE = Guidance(
    steps=(GuidanceStep("Isolate the equipment under lockout/tagout and escalate to the maintenance supervisor."),),
    citations=(), safety_notes=(), confidence=0.0, fallback=True, query="",
)


@dataclass(frozen=True)
class StageTimeouts:
    vision: float = 10.0
    knowledge: float = 15.0
    report: float = 5.0


class DiagnosisState(TypedDict, total=False):
    request_id: str
    input: DiagnosisInput
    deadline: float | None  # absolute, time.monotonic()
    vision: VisionFindings | None
    guidance: Guidance
    confidence: float
    requires_manual_review: bool
    report: IncidentReport
    stages: Annotated[list[StageStatus], operator.add]


def merge_confidence(stages: list[StageStatus]) -> float:
    """Mean of the stage confidences that exist: a skipped stage has none, a degraded one counts 0.0
    (the seed's fallback value), the report stage has none."""
    values = [
        (s.confidence or 0.0) if s.state is StageState.OK else 0.0
        for s in stages
        if s.stage in (Stage.VISION, Stage.KNOWLEDGE) and s.state is not StageState.SKIPPED
    ]
    return round(sum(values) / len(values), 4) if values else 0.0


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, asyncio.TimeoutError):
        return "DEADLINE_EXCEEDED: stage timed out"
    return f"{type(exc).__name__}: {exc}"


class DiagnosisWorkflow:
    def __init__(self, clients: AgentClients, timeouts: StageTimeouts | None = None) -> None:
        self.clients = clients
        self.timeouts = timeouts or StageTimeouts()
        graph = StateGraph(DiagnosisState)
        graph.add_node("vision", self._vision)
        graph.add_node("knowledge", self._knowledge)
        graph.add_node("report", self._report)
        graph.add_conditional_edges(START, self._route, {"vision": "vision", "knowledge": "knowledge"})
        graph.add_edge("vision", "knowledge")
        graph.add_edge("knowledge", "report")
        graph.add_edge("report", END)
        self.graph = graph.compile()

    # --- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _route(state: DiagnosisState) -> str:
        return "vision" if state["input"].image_data else "knowledge"

    @staticmethod
    def _budget(state: DiagnosisState, stage_timeout: float) -> float:
        deadline = state.get("deadline")
        if deadline is None:
            return stage_timeout
        return min(stage_timeout, deadline - time.monotonic())

    async def _call(self, stage: Stage, state: DiagnosisState, stage_timeout: float, call, describe):
        """Run one agent call inside its span. `describe(result)` gives the stage confidence (or None) and
        the business attributes of a successful result. Any failure degrades the stage; none escapes."""
        started = time.perf_counter()
        timeout = self._budget(state, stage_timeout)
        with tracer.start_as_current_span(f"workflow.{stage.value}") as span:
            span.set_attributes({"app.stage": stage.value, "app.request_id": state["request_id"],
                                 "app.timeout_s": round(timeout, 3)})
            result, confidence, outcome, error = None, None, StageState.OK, ""
            try:
                if timeout <= 0:
                    raise asyncio.TimeoutError
                result = await call(timeout)
                confidence, attributes = describe(result)
                span.set_attributes(attributes)
            except Exception as exc:  # noqa: BLE001
                outcome, error = StageState.DEGRADED, _describe_error(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, error))
                log.warning("stage %s degraded: %s", stage.value, error,
                            extra={"stage": stage.value, "request_id": state["request_id"]})
            span.set_attribute("app.stage.state", outcome.value)
            if confidence is not None:
                span.set_attribute("app.confidence", confidence)
            elapsed = time.perf_counter() - started
            meters = copilot_metrics()
            meters.stage_duration.record(elapsed, {"stage": stage.value, "state": outcome.value})
            if outcome is StageState.DEGRADED:
                meters.stage_degraded.add(1, {"stage": stage.value})
            return result, StageStatus(stage, outcome, error, confidence, round(elapsed * 1000, 2))

    # --- nodes ----------------------------------------------------------------------------------

    async def _vision(self, state: DiagnosisState) -> dict:
        req = state["input"]
        findings, status = await self._call(
            Stage.VISION, state, self.timeouts.vision,
            lambda t: self.clients.analyze_image(req.image_data, req.image_mime_type, req.image_id, req.equipment_id,
                                                req.equipment_type, t),
            lambda f: (f.confidence, {"app.defect_count": len(f.defects), "app.defect_types": [d.type for d in f.defects]}),
        )
        return {"vision": findings, "stages": [status]}

    async def _knowledge(self, state: DiagnosisState) -> dict:
        req = state["input"]
        defects = state["vision"].defects if state.get("vision") else ()
        guidance, status = await self._call(
            Stage.KNOWLEDGE, state, self.timeouts.knowledge,
            lambda t: self.clients.advise(req.problem_description, defects, req.plant_id, req.equipment_id,
                                          req.equipment_type, t),
            lambda g: (g.confidence, {"app.sop_ids": sorted({c.sop_id for c in g.citations}),
                                      "app.step_count": len(g.steps), "app.fallback": g.fallback}),
        )
        return {"guidance": guidance or FALLBACK_GUIDANCE, "stages": [status]}

    async def _report(self, state: DiagnosisState) -> dict:
        req = state["input"]
        stages = state["stages"]
        confidence = merge_confidence(stages)
        manual = confidence < MANUAL_REVIEW_THRESHOLD
        vision = state.get("vision")
        guidance = state["guidance"]
        notes = tuple(f"{s.stage.value} stage degraded ({s.error})" for s in stages if s.state is StageState.DEGRADED)
        inputs = ReportInputs(
            request_id=state["request_id"], plant_id=req.plant_id, equipment_id=req.equipment_id,
            problem_description=req.problem_description, defects=vision.defects if vision else (),
            guidance=guidance.steps, citations=guidance.citations, safety_notes=guidance.safety_notes,
            confidence_score=confidence, requires_manual_review=manual, stage_notes=notes,
            image_analyzed=vision is not None,
        )
        report, status = await self._call(
            Stage.REPORT, state, self.timeouts.report,
            lambda t: self.clients.compose_report(inputs, t),
            lambda r: (None, {"app.sop_ids": list(r.referenced_sop_ids), "app.overall_confidence": confidence,
                              "app.requires_manual_review": manual}),
        )
        return {"report": report or fallback_report(inputs), "confidence": confidence,
                "requires_manual_review": manual, "stages": [status]}

    # --- entry ----------------------------------------------------------------------------------

    async def run(self, request: DiagnosisInput, *, deadline: float | None = None,
                  request_id: str | None = None) -> Diagnosis:
        request_id = request_id or str(uuid.uuid4())
        with tracer.start_as_current_span("workflow.diagnose") as span:
            span.set_attributes({"app.request_id": request_id, "app.plant_id": request.plant_id,
                                 "app.equipment_id": request.equipment_id, "app.has_image": bool(request.image_data)})
            final = await self.graph.ainvoke(
                {"request_id": request_id, "input": request, "deadline": deadline, "vision": None, "stages": []}
            )
            stages = {s.stage: s for s in final["stages"]}
            if Stage.VISION not in stages:
                stages[Stage.VISION] = StageStatus(Stage.VISION, StageState.SKIPPED, "no image supplied")
            ordered = [stages[s] for s in (Stage.VISION, Stage.KNOWLEDGE, Stage.REPORT)]
            meters = copilot_metrics()
            meters.diagnoses.add(1, {"requires_manual_review": final["requires_manual_review"]})
            meters.diagnosis_confidence.record(final["confidence"])
            if final["requires_manual_review"]:
                meters.escalations.add(1)
            span.set_attributes({
                "app.confidence": final["confidence"],
                "app.requires_manual_review": final["requires_manual_review"],
                "app.sop_ids": list(final["report"].referenced_sop_ids),
                "app.defect_count": len(final["report"].defects),
                "app.degraded_stages": [s.stage.value for s in ordered if s.state is StageState.DEGRADED],
            })
            return Diagnosis(
                request_id=request_id, report=final["report"], confidence_score=final["confidence"],
                requires_manual_review=final["requires_manual_review"], stages=ordered,
                safety_disclaimer=SAFETY_DISCLAIMER,
            )


def fallback_report(i: ReportInputs) -> IncidentReport:
    """The minimal report the orchestrator writes itself when the report agent is unavailable: the raw
    findings in the seed's layout, clearly marked for manual review."""
    now = datetime.now(timezone.utc)
    summary = (f"Equipment {i.equipment_id} at plant {i.plant_id}: {i.problem_description.rstrip('.')}. "
               "The report agent was unavailable; this report lists the raw findings for manual review.")
    actions = tuple(RecommendedAction(s.text, s.sop_ids) for s in i.guidance)
    referenced = tuple(dict.fromkeys(s for step in i.guidance for s in step.sop_ids))
    safety = (*i.safety_notes, "Lock out/tag out the equipment before maintenance (SAFETY-SOP-001).")
    follow = ("Escalate to a maintenance engineer for manual review.", *i.stage_notes)
    return IncidentReport(summary=summary, defects=i.defects, recommended_actions=actions, safety_notes=safety,
                          follow_up=follow, referenced_sop_ids=referenced, generated_at=now,
                          rendered_text=render_text(summary, i.defects, actions, safety, follow, referenced, now),
                          citations=i.citations)
