"""The diagnosis workflow: a LangGraph StateGraph vision -> knowledge -> report (vision skipped without
an image), or vision || knowledge -> report with `parallel=True` (knowledge then does not see the defects).
Each node calls an agent through `AgentClients` with a deadline (the caller's, when shorter than the stage's);
a failed or late agent marks its stage degraded and the workflow goes on with a fallback result (guidance that
sends the technician to a supervisor, a report composed in-process).

`events()` streams StageStarted / StageFinished (with the stage's partial result) through LangGraph's custom
stream, then the Diagnosis; `run()` is the same stream consumed to its end. Cancelling the consumer cancels
the agent calls in flight."""

from __future__ import annotations

import asyncio
import logging
import operator
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict, TypeVar

import grpc
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from opentelemetry import trace

from copilot.domain import (
    AdviceRequest,
    Diagnosis,
    DiagnosisInput,
    Guidance,
    IncidentReport,
    PastIncident,
    ReportInputs,
    Stage,
    StageFinished,
    StageStarted,
    StageState,
    StageStatus,
    VisionFindings,
    VisionRequest,
)
from copilot.runtime.metrics import copilot_metrics
from services.orchestrator.clients import AgentClients
from services.orchestrator.decisions import (
    FALLBACK_GUIDANCE,
    SAFETY_DISCLAIMER,
    escalation_reasons,
    fallback_report,
    merge_confidence,
    requires_manual_review,
    review_notes,
)
from services.orchestrator.equipment import EquipmentContext, EquipmentResolver

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


WorkflowEvent = StageStarted | StageFinished | Diagnosis
#: Looks up earlier incidents similar to this one (the incident history); None = no history.
RelatedIncidents = Callable[[DiagnosisInput, str], Awaitable[Sequence[PastIncident]]]


@dataclass(frozen=True)
class StageTimeouts:
    """Each stage's own deadline in seconds (the caller's deadline wins when it is shorter)."""

    vision: float = 10.0
    knowledge: float = 15.0
    report: float = 5.0


class DiagnosisState(TypedDict, total=False):
    """The graph state of one diagnosis: its input, each stage's result and the stage statuses."""

    request_id: str
    input: DiagnosisInput
    equipment: EquipmentContext  # the machine type for knowledge, the reference set for vision
    deadline: float | None  # absolute, time.monotonic()
    vision: VisionFindings | None
    guidance: Guidance
    confidence: float
    requires_manual_review: bool
    report: IncidentReport
    stages: Annotated[list[StageStatus], operator.add]


@dataclass(frozen=True)
class RunContext:
    """What one run depends on besides its data (LangGraph's run context, not the graph state)."""

    #: The incident-history lookup, started with the run (off the critical path) and awaited by the report node;
    #: None when there is no history.
    related_incidents: asyncio.Future[tuple[PastIncident, ...]] | None = None


#: The graph's node names: one node per stage, named after it.
VISION, KNOWLEDGE, REPORT = Stage.VISION.value, Stage.KNOWLEDGE.value, Stage.REPORT.value
Result = TypeVar("Result", VisionFindings, Guidance, IncidentReport)


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, asyncio.TimeoutError):
        return "DEADLINE_EXCEEDED: stage timed out"
    return f"{type(exc).__name__}: {exc}"


class DiagnosisWorkflow:
    """The diagnosis as a LangGraph StateGraph over the three agents (see the module docstring)."""

    def __init__(
        self,
        clients: AgentClients,
        timeouts: StageTimeouts | None = None,
        *,
        parallel: bool = False,
        related_incidents: RelatedIncidents | None = None,
        equipment: EquipmentResolver | None = None,
    ) -> None:
        self.clients = clients
        self.equipment = equipment or EquipmentResolver()
        self.timeouts = timeouts or StageTimeouts()
        self.parallel = parallel
        self.related_incidents = related_incidents
        graph = StateGraph(DiagnosisState, context_schema=RunContext)
        graph.add_node(VISION, self._vision)
        graph.add_node(KNOWLEDGE, self._knowledge)
        graph.add_node(REPORT, self._report)
        if parallel:  # fan-out from START; both run in one superstep, so report (fan-in) runs once after both
            graph.add_conditional_edges(START, self._route_parallel, [VISION, KNOWLEDGE])
            graph.add_edge(VISION, REPORT)
            graph.add_edge(KNOWLEDGE, REPORT)
        else:
            graph.add_conditional_edges(START, self._route, {VISION: VISION, KNOWLEDGE: KNOWLEDGE})
            graph.add_edge(VISION, KNOWLEDGE)
            graph.add_edge(KNOWLEDGE, REPORT)
        graph.add_edge(REPORT, END)
        self.graph = graph.compile()

    # --- helpers --------------------------------------------------------------------------------

    # The routers are coroutines: LangGraph runs a plain function's branch in the event loop's thread pool, one
    # thread hand-off per diagnosis for a dictionary lookup.

    @staticmethod
    async def _route(state: DiagnosisState) -> str:
        return VISION if state["input"].image_data else KNOWLEDGE

    @staticmethod
    async def _route_parallel(state: DiagnosisState) -> list[str]:
        return [VISION, KNOWLEDGE] if state["input"].image_data else [KNOWLEDGE]

    @staticmethod
    def _budget(state: DiagnosisState, stage_timeout: float) -> float:
        deadline = state.get("deadline")
        if deadline is None:
            return stage_timeout
        return min(stage_timeout, deadline - time.monotonic())

    async def _call(
        self,
        stage: Stage,
        state: DiagnosisState,
        stage_timeout: float,
        call: Callable[[float], Awaitable[Result]],
        describe: Callable[[Result], tuple[float | None, dict[str, Any]]],
    ) -> tuple[Result | None, StageStatus]:
        """Run one agent call inside its span. `describe(result)` gives the stage confidence (or None) and
        the business attributes of a successful result. Any failure degrades the stage; none escapes."""
        started = time.perf_counter()
        timeout = self._budget(state, stage_timeout)
        emit = get_stream_writer()
        emit(StageStarted(state["request_id"], stage))
        with tracer.start_as_current_span(f"workflow.{stage.value}") as span:
            span.set_attributes(
                {"app.stage": stage.value, "app.request_id": state["request_id"], "app.timeout_s": round(timeout, 3)}
            )
            result, confidence, outcome, error = None, None, StageState.OK, ""
            try:
                if timeout <= 0:
                    raise TimeoutError
                result = await call(timeout)
                confidence, attributes = describe(result)
                span.set_attributes(attributes)
            except Exception as exc:
                outcome, error = StageState.DEGRADED, _describe_error(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, error))
                log.warning(
                    "stage %s degraded: %s",
                    stage.value,
                    error,
                    extra={"stage": stage.value, "request_id": state["request_id"]},
                )
            span.set_attribute("app.stage.state", outcome.value)
            if confidence is not None:
                span.set_attribute("app.confidence", confidence)
            elapsed = time.perf_counter() - started
            meters = copilot_metrics()
            meters.stage_duration.record(elapsed, {"stage": stage.value, "state": outcome.value})
            if outcome is StageState.DEGRADED:
                meters.stage_degraded.add(1, {"stage": stage.value})
            status = StageStatus(stage, outcome, error, confidence, round(elapsed * 1000, 2))
            emit(StageFinished(state["request_id"], status, result))
            return result, status

    # --- nodes ----------------------------------------------------------------------------------

    async def _vision(self, state: DiagnosisState) -> dict[str, Any]:
        req = state["input"]
        reference_set = state["equipment"].reference_set
        findings, status = await self._call(
            Stage.VISION,
            state,
            self.timeouts.vision,
            lambda timeout: self.clients.analyze_image(
                VisionRequest(
                    image_data=req.image_data,
                    image_mime_type=req.image_mime_type,
                    image_id=req.image_id,
                    equipment_id=req.equipment_id,
                    reference_set=reference_set,
                ),
                timeout=timeout,
            ),
            lambda f: (
                f.confidence,
                {"app.defect_count": len(f.defects), "app.defect_types": [d.type for d in f.defects]},
            ),
        )
        return {"vision": findings, "stages": [status]}

    async def _knowledge(self, state: DiagnosisState) -> dict[str, Any]:
        req = state["input"]
        vision = state.get("vision")
        question = AdviceRequest(
            problem_description=req.problem_description,
            plant_id=req.plant_id,
            equipment_id=req.equipment_id,
            equipment_type=state["equipment"].equipment_type,
            defects=vision.defects if vision is not None else (),
        )
        guidance, status = await self._call(
            Stage.KNOWLEDGE,
            state,
            self.timeouts.knowledge,
            lambda timeout: self.clients.advise(question, timeout=timeout),
            lambda g: (
                g.confidence,
                {
                    "app.sop_ids": sorted({c.sop_id for c in g.citations}),
                    "app.step_count": len(g.steps),
                    "app.fallback": g.fallback,
                },
            ),
        )
        return {"guidance": guidance or FALLBACK_GUIDANCE, "stages": [status]}

    async def _related(
        self, request: DiagnosisInput, request_id: str, deadline: float | None
    ) -> tuple[PastIncident, ...]:
        """Earlier incidents on the same equipment (at most 1 s); a history failure never fails the diagnosis."""
        budget = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if self.related_incidents is None:
            return ()
        try:
            with tracer.start_as_current_span("workflow.history"):
                return tuple(
                    await asyncio.wait_for(self.related_incidents(request, request_id), timeout=max(0.05, budget))
                )
        except Exception as exc:
            log.warning("incident history lookup failed: %s", _describe_error(exc))
            return ()

    async def _report(self, state: DiagnosisState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        req = state["input"]
        stages = state["stages"]
        confidence = merge_confidence(stages)
        related = runtime.context.related_incidents
        vision = state.get("vision")
        guidance = state.get("guidance") or FALLBACK_GUIDANCE
        manual = requires_manual_review(confidence, guidance)
        notes = tuple(f"{s.stage.value} stage degraded ({s.error})" for s in stages if s.state is StageState.DEGRADED)
        inputs = ReportInputs(
            request_id=state["request_id"],
            plant_id=req.plant_id,
            equipment_id=req.equipment_id,
            problem_description=req.problem_description,
            defects=vision.defects if vision else (),
            guidance=guidance.steps,
            citations=guidance.citations,
            safety_notes=guidance.safety_notes,
            confidence_score=confidence,
            requires_manual_review=manual,
            stage_notes=notes,
            image_analyzed=vision is not None,
            related_incidents=await related if related is not None else (),
            vision_summary=vision.description[:2000] if vision else "",
            vision_confidence=min(1.0, max(0.0, vision.confidence)) if vision else 0.0,
            review_notes=review_notes(stages, confidence, guidance)[:16],
            equipment_type=guidance.equipment_type or state["equipment"].equipment_type,
        )
        report, status = await self._call(
            Stage.REPORT,
            state,
            self.timeouts.report,
            lambda timeout: self.clients.compose_report(inputs, timeout=timeout),
            lambda r: (
                None,
                {
                    "app.sop_ids": list(r.referenced_sop_ids),
                    "app.overall_confidence": confidence,
                    "app.requires_manual_review": manual,
                },
            ),
        )
        return {
            "report": report or fallback_report(inputs),
            "confidence": confidence,
            "requires_manual_review": manual,
            "stages": [status],
        }

    # --- entry ----------------------------------------------------------------------------------

    async def events(
        self, request: DiagnosisInput, *, deadline: float | None = None, request_id: str | None = None
    ) -> AsyncIterator[WorkflowEvent]:
        """StageStarted / StageFinished events as the stages run, then the Diagnosis (always last)."""
        request_id = request_id or str(uuid.uuid4())
        began = time.perf_counter()
        with tracer.start_as_current_span("workflow.diagnose") as span:
            span.set_attributes(
                {
                    "app.request_id": request_id,
                    "app.plant_id": request.plant_id,
                    "app.equipment_id": request.equipment_id,
                    "app.has_image": bool(request.image_data),
                    "app.parallel": self.parallel,
                }
            )
            # the history lookup runs while the agents work; the report node awaits it
            related = (
                asyncio.ensure_future(self._related(request, request_id, deadline))
                if self.related_incidents is not None
                else None
            )
            equipment = await self.equipment.resolve(request)
            span.set_attributes(
                {
                    "app.equipment_type": equipment.equipment_type,
                    "app.equipment_type.source": equipment.type_source,
                    "app.reference_set": equipment.reference_set,
                }
            )
            initial: DiagnosisState = {
                "request_id": request_id,
                "input": request,
                "equipment": equipment,
                "deadline": deadline,
                "vision": None,
                "stages": [],
            }
            final: DiagnosisState = initial
            try:
                # with a list of stream modes, langgraph yields (mode, chunk) pairs
                stream: Any = self.graph.astream(
                    initial, context=RunContext(related_incidents=related), stream_mode=["custom", "values"]
                )
                async for mode, chunk in stream:
                    if mode == "custom":
                        yield chunk
                    else:
                        final = chunk
            finally:
                if related is not None and not related.done():
                    related.cancel()
            diagnosis = self._finish(final, request_id, span)
            # the latency SLOs' histogram: text and photo diagnoses apart (deploy/monitoring/slos.yaml)
            copilot_metrics().diagnosis_duration.record(
                time.perf_counter() - began, {"photo": "true" if request.image_data else "false"}
            )
            yield diagnosis

    async def run(
        self, request: DiagnosisInput, *, deadline: float | None = None, request_id: str | None = None
    ) -> Diagnosis:
        diagnosis = None
        async for event in self.events(request, deadline=deadline, request_id=request_id):
            diagnosis = event
        assert isinstance(diagnosis, Diagnosis)
        return diagnosis

    @staticmethod
    def _finish(final: DiagnosisState, request_id: str, span: trace.Span) -> Diagnosis:
        stages = {s.stage: s for s in final["stages"]}
        if Stage.VISION not in stages:
            stages[Stage.VISION] = StageStatus(Stage.VISION, StageState.SKIPPED, "no image supplied")
        ordered = [stages[stage] for stage in Stage]
        guidance = final.get("guidance")
        reasons = escalation_reasons(ordered, final["confidence"], guidance)
        meters = copilot_metrics()
        degraded = any(s.state is StageState.DEGRADED for s in ordered)
        meters.diagnoses.add(
            1,
            {
                "requires_manual_review": final["requires_manual_review"],
                "degraded": "true" if degraded else "false",  # the availability SLO's bad answers
            },
        )
        meters.diagnosis_confidence.record(final["confidence"])
        if final["requires_manual_review"]:
            meters.escalations.add(1)
        span.set_attributes(
            {
                "app.confidence": final["confidence"],
                "app.requires_manual_review": final["requires_manual_review"],
                "app.escalation_reasons": [r.value for r in reasons],
                "app.sop_ids": list(final["report"].referenced_sop_ids),
                "app.defect_count": len(final["report"].defects),
                "app.degraded_stages": [s.stage.value for s in ordered if s.state is StageState.DEGRADED],
            }
        )
        return Diagnosis(
            request_id=request_id,
            report=final["report"],
            confidence_score=final["confidence"],
            requires_manual_review=final["requires_manual_review"],
            stages=ordered,
            safety_disclaimer=SAFETY_DISCLAIMER,
            escalation_reasons=reasons,
            trace_id=format(span.get_span_context().trace_id, "032x"),
            review_notes=review_notes(ordered, final["confidence"], guidance),
            equipment_type=(guidance.equipment_type if guidance else "") or final["equipment"].equipment_type,
            reference_set=final["equipment"].reference_set
            if Stage.VISION in {s.stage for s in final["stages"]}
            else "",
        )
