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
    ReviewKind,
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
    (what a failed stage stands for), the report stage has none."""
    values = [
        (s.confidence or 0.0) if s.state is StageState.OK else 0.0
        for s in stages
        if s.stage in (Stage.VISION, Stage.KNOWLEDGE) and s.state is not StageState.SKIPPED
    ]
    return round(sum(values) / len(values), 4) if values else 0.0


#: Guidance reviews that send a diagnosis to manual review whatever its confidence: steps that are not written
#: for this machine, or matched in a language the library does not serve, are not an answer to trust.
REVIEW_REASONS = {
    ReviewKind.EQUIPMENT_NOT_COVERED: EscalationReason.EQUIPMENT_NOT_COVERED,
    ReviewKind.EQUIPMENT_MISMATCH: EscalationReason.EQUIPMENT_MISMATCH,
    ReviewKind.UNSUPPORTED_LANGUAGE: EscalationReason.UNSUPPORTED_LANGUAGE,
    ReviewKind.UNKNOWN_EQUIPMENT_WEAK_MATCH: EscalationReason.UNKNOWN_EQUIPMENT_WEAK_MATCH,
}


def escalation_reasons(
    stages: Sequence[StageStatus], confidence: float, guidance: Guidance | None
) -> tuple[EscalationReason, ...]:
    """Every reason that applies, most serious first. Manual review is decided by LOW_CONFIDENCE (mean < 0.5), by
    the guidance's own reviews (REVIEW_REASONS) and by NO_SUPPORTING_SOP; the others tell the reviewer where to
    look."""
    reasons = []
    if any(s.state is StageState.DEGRADED for s in stages):
        reasons.append(EscalationReason.STAGE_DEGRADED)
    if guidance is not None:
        reasons += [REVIEW_REASONS[r.kind] for r in guidance.reviews]
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


def requires_manual_review(confidence: float, guidance: Guidance | None = None) -> bool:
    """The manual-review rule (mean < 0.5), and guidance that is no answer to trust: a review it carries, or no SOP at all
    (the fallback steps: a confident photo must not lift a diagnosis that no SOP supports above review)."""
    if confidence < MANUAL_REVIEW_THRESHOLD:
        return True
    return guidance is not None and (bool(guidance.reviews) or guidance.fallback)


def review_notes(stages: Sequence[StageStatus], confidence: float, guidance: Guidance | None) -> tuple[str, ...]:
    """Why the diagnosis goes to manual review, one sentence each, for the response and the report (empty when it
    does not)."""
    if not requires_manual_review(confidence, guidance):
        return ()
    notes = [r.message for r in guidance.reviews] if guidance is not None else []
    if guidance is not None and guidance.fallback and not guidance.reviews:
        notes.append("No plant SOP supports guidance for this problem: only the general escalation steps are given.")
    if confidence < MANUAL_REVIEW_THRESHOLD:
        notes.append(f"The diagnosis confidence is {confidence:.0%}, below {MANUAL_REVIEW_THRESHOLD:.0%}.")
    notes += [f"The {s.stage.value} stage was degraded ({s.error})." for s in stages if s.state is StageState.DEGRADED]
    return tuple(notes)


def fallback_report(inputs: ReportInputs) -> IncidentReport:
    """The report when the report agent cannot be reached: the same composition, written by the orchestrator
    and marked so."""
    return compose_report(inputs, written_by_orchestrator=True)
