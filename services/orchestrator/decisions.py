"""The decision rules of a diagnosis, apart from the graph that runs the stages: how stage confidences merge,
when a diagnosis goes to manual review and why, and what stands in for a stage that failed."""

from __future__ import annotations

from collections.abc import Sequence

from copilot.domain import (
    MANUAL_REVIEW_THRESHOLD,
    EscalationReason,
    Guidance,
    GuidanceStep,
    IncidentReport,
    ReportInputs,
    Stage,
    StageState,
    StageStatus,
)
from copilot.reporting import compose_report

SAFETY_DISCLAIMER = (
    "AI-generated guidance for a qualified technician. Follow your plant's safety procedures and "
    "lockout/tagout (SAFETY-SOP-001) before any maintenance, and verify every step against the cited SOPs."
)
FALLBACK_GUIDANCE = Guidance(
    steps=(GuidanceStep("Isolate the equipment under lockout/tagout and escalate to the maintenance supervisor."),),
    citations=(),
    safety_notes=(),
    confidence=0.0,
    fallback=True,
    query="",
)


def merge_confidence(stages: list[StageStatus]) -> float:
    """Mean of the stage confidences that exist: a skipped stage has none, a degraded one counts 0.0
    (the seed's fallback value), the report stage has none."""
    values = [
        (s.confidence or 0.0) if s.state is StageState.OK else 0.0
        for s in stages
        if s.stage in (Stage.VISION, Stage.KNOWLEDGE) and s.state is not StageState.SKIPPED
    ]
    return round(sum(values) / len(values), 4) if values else 0.0


def escalation_reasons(
    stages: Sequence[StageStatus], confidence: float, guidance: Guidance | None
) -> tuple[EscalationReason, ...]:
    """Every reason that applies, most serious first. Only LOW_CONFIDENCE decides manual review (the seed's
    rule: mean < 0.5); the others tell the reviewer where to look."""
    reasons = []
    if any(s.state is StageState.DEGRADED for s in stages):
        reasons.append(EscalationReason.STAGE_DEGRADED)
    if confidence < MANUAL_REVIEW_THRESHOLD:
        reasons.append(EscalationReason.LOW_CONFIDENCE)
    if guidance is None or guidance.fallback or not guidance.citations:
        reasons.append(EscalationReason.NO_SUPPORTING_SOP)
    vision = next((s for s in stages if s.stage is Stage.VISION and s.state is StageState.OK), None)
    if vision is not None and (vision.confidence or 0.0) < MANUAL_REVIEW_THRESHOLD:
        reasons.append(EscalationReason.LOW_VISION_CONFIDENCE)
    if guidance is not None and not guidance.fallback and any(step.unsupported for step in guidance.steps):
        reasons.append(EscalationReason.UNSUPPORTED_GUIDANCE)
    return tuple(reasons)


def requires_manual_review(confidence: float) -> bool:
    return confidence < MANUAL_REVIEW_THRESHOLD


def fallback_report(inputs: ReportInputs) -> IncidentReport:
    """The report when the report agent cannot be reached: the same composition, written by the orchestrator
    and marked so."""
    return compose_report(inputs, written_by_orchestrator=True)
