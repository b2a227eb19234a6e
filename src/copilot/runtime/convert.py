"""Domain dataclasses <-> generated protobuf messages, in one place."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from copilot import domain as d
from copilot.agents.v1 import knowledge_pb2, report_pb2, vision_pb2
from copilot.images import without_trailing_bytes
from copilot.v1 import common_pb2, copilot_pb2

# --- shared messages ------------------------------------------------------------------------------


def box_to_pb(box: d.BoundingBox) -> common_pb2.BoundingBox:
    return common_pb2.BoundingBox(x_min=box.x_min, y_min=box.y_min, x_max=box.x_max, y_max=box.y_max)


def defect_to_pb(defect: d.Defect) -> common_pb2.Defect:
    msg = common_pb2.Defect(type=defect.type, confidence=defect.confidence, description=defect.description)
    if defect.box is not None:
        msg.box.CopyFrom(box_to_pb(defect.box))
    return msg


def defect_from_pb(msg: common_pb2.Defect) -> d.Defect:
    box = None
    if msg.HasField("box"):
        box = d.BoundingBox(msg.box.x_min, msg.box.y_min, msg.box.x_max, msg.box.y_max)
    return d.Defect(type=msg.type, confidence=msg.confidence, description=msg.description, box=box)


def citation_to_pb(c: d.SopCitation) -> common_pb2.SopCitation:
    return common_pb2.SopCitation(
        sop_id=c.sop_id,
        title=c.title,
        section=c.section,
        score=c.score,
        version=c.version,
        equipment_types=list(c.equipment_types),
    )


def citation_from_pb(m: common_pb2.SopCitation) -> d.SopCitation:
    return d.SopCitation(
        sop_id=m.sop_id,
        title=m.title,
        section=m.section,
        score=m.score,
        version=m.version,
        equipment_types=tuple(m.equipment_types),
    )


def step_to_pb(s: d.GuidanceStep) -> common_pb2.GuidanceStep:
    return common_pb2.GuidanceStep(
        text=s.text, sop_ids=list(s.sop_ids), sections=list(s.sections), unsupported=s.unsupported
    )


def step_from_pb(m: common_pb2.GuidanceStep) -> d.GuidanceStep:
    return d.GuidanceStep(text=m.text, sop_ids=tuple(m.sop_ids), sections=tuple(m.sections), unsupported=m.unsupported)


def timestamp_to_pb(value: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp (an aware datetime is converted to UTC; a naive one is taken as UTC)."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(d.as_utc(value))
    return stamp


def _actions_to_pb(actions: tuple[d.RecommendedAction, ...]) -> list[common_pb2.RecommendedAction]:
    return [common_pb2.RecommendedAction(description=a.description, sop_ids=list(a.sop_ids)) for a in actions]


def _actions_from_pb(actions: Iterable[common_pb2.RecommendedAction]) -> tuple[d.RecommendedAction, ...]:
    return tuple(d.RecommendedAction(description=a.description, sop_ids=tuple(a.sop_ids)) for a in actions)


def report_to_pb(r: d.IncidentReport) -> common_pb2.IncidentReport:
    generated = timestamp_to_pb(r.generated_at.astimezone(UTC))
    return common_pb2.IncidentReport(
        summary=r.summary,
        defects=[defect_to_pb(x) for x in r.defects],
        recommended_actions=_actions_to_pb(r.recommended_actions),
        review_steps=_actions_to_pb(r.review_steps),
        review_notes=list(r.review_notes),
        safety_notes=list(r.safety_notes),
        follow_up=list(r.follow_up),
        referenced_sop_ids=list(r.referenced_sop_ids),
        generated_at=generated,
        rendered_text=r.rendered_text,
        citations=[citation_to_pb(c) for c in r.citations],
    )


def report_from_pb(m: common_pb2.IncidentReport) -> d.IncidentReport:
    return d.IncidentReport(
        summary=m.summary,
        defects=tuple(defect_from_pb(x) for x in m.defects),
        recommended_actions=_actions_from_pb(m.recommended_actions),
        review_steps=_actions_from_pb(m.review_steps),
        review_notes=tuple(m.review_notes),
        safety_notes=tuple(m.safety_notes),
        follow_up=tuple(m.follow_up),
        referenced_sop_ids=tuple(m.referenced_sop_ids),
        generated_at=m.generated_at.ToDatetime(tzinfo=UTC),
        rendered_text=m.rendered_text,
        citations=tuple(citation_from_pb(c) for c in m.citations),
    )


# --- vision ---------------------------------------------------------------------------------------


def findings_to_pb(f: d.VisionFindings) -> vision_pb2.AnalyzeImageResponse:
    return vision_pb2.AnalyzeImageResponse(
        defects=[defect_to_pb(x) for x in f.defects],
        confidence=f.confidence,
        anomaly_score=f.anomaly_score,
        description=f.description,
        model=f.model,
        width=f.width,
        height=f.height,
        heatmap_png=f.heatmap_png,
        reference_set=f.reference_set,
        anomaly_map=anomaly_map_to_pb(f.anomaly_map) if f.anomaly_map is not None else None,
        generic_reference_set=f.generic,
    )


def anomaly_map_to_pb(m: d.AnomalyMap) -> vision_pb2.AnomalyMap:
    return vision_pb2.AnomalyMap(width=m.width, height=m.height, values=m.values)


def anomaly_map_from_pb(m: vision_pb2.AnomalyMap) -> d.AnomalyMap:
    return d.AnomalyMap(width=m.width, height=m.height, values=tuple(m.values))


def findings_from_pb(m: vision_pb2.AnalyzeImageResponse) -> d.VisionFindings:
    return d.VisionFindings(
        defects=tuple(defect_from_pb(x) for x in m.defects),
        confidence=m.confidence,
        anomaly_score=m.anomaly_score,
        description=m.description,
        model=m.model,
        width=m.width,
        height=m.height,
        reference_set=m.reference_set,
        generic=m.generic_reference_set,
        anomaly_map=anomaly_map_from_pb(m.anomaly_map) if m.HasField("anomaly_map") else None,
    )


# --- knowledge ------------------------------------------------------------------------------------


def chunk_to_pb(c: d.SopChunk) -> knowledge_pb2.SopChunk:
    return knowledge_pb2.SopChunk(
        chunk_id=c.chunk_id,
        sop_id=c.sop_id,
        title=c.title,
        section=c.section,
        text=c.text,
        score=c.score,
        version=c.version,
        position=c.position,
        equipment_types=list(c.equipment_types),
    )


def chunk_from_pb(m: knowledge_pb2.SopChunk) -> d.SopChunk:
    return d.SopChunk(
        chunk_id=m.chunk_id,
        sop_id=m.sop_id,
        title=m.title,
        section=m.section,
        text=m.text,
        score=m.score,
        version=m.version,
        position=m.position,
        equipment_types=tuple(m.equipment_types),
    )


_REVIEW = {
    d.ReviewKind.EQUIPMENT_NOT_COVERED: knowledge_pb2.GUIDANCE_REVIEW_KIND_EQUIPMENT_NOT_COVERED,
    d.ReviewKind.EQUIPMENT_MISMATCH: knowledge_pb2.GUIDANCE_REVIEW_KIND_EQUIPMENT_MISMATCH,
    d.ReviewKind.UNSUPPORTED_LANGUAGE: knowledge_pb2.GUIDANCE_REVIEW_KIND_UNSUPPORTED_LANGUAGE,
    d.ReviewKind.UNKNOWN_EQUIPMENT_WEAK_MATCH: knowledge_pb2.GUIDANCE_REVIEW_KIND_UNKNOWN_EQUIPMENT_WEAK_MATCH,
}
_REVIEW_FROM = {v: k for k, v in _REVIEW.items()}


def guidance_to_pb(g: d.Guidance) -> knowledge_pb2.AdviseResponse:
    return knowledge_pb2.AdviseResponse(
        steps=[step_to_pb(s) for s in g.steps],
        citations=[citation_to_pb(c) for c in g.citations],
        safety_notes=list(g.safety_notes),
        confidence=g.confidence,
        fallback=g.fallback,
        query=g.query,
        generator=g.generator,
        model=g.model,
        citations_removed=g.citations_removed,
        unsupported_steps=g.unsupported_steps,
        cached=g.cached,
        equipment_type=g.equipment_type,
        equipment_source=g.equipment_source,
        language=g.language,
        reviews=[knowledge_pb2.GuidanceReview(kind=_REVIEW[r.kind], message=r.message) for r in g.reviews],
    )


def guidance_from_pb(m: knowledge_pb2.AdviseResponse) -> d.Guidance:
    return d.Guidance(
        steps=tuple(step_from_pb(s) for s in m.steps),
        citations=tuple(citation_from_pb(c) for c in m.citations),
        safety_notes=tuple(m.safety_notes),
        confidence=m.confidence,
        fallback=m.fallback,
        query=m.query,
        generator=m.generator,
        model=m.model,
        citations_removed=m.citations_removed,
        unsupported_steps=m.unsupported_steps,
        cached=m.cached,
        equipment_type=m.equipment_type,
        equipment_source=m.equipment_source,
        language=m.language,
        reviews=tuple(d.GuidanceReview(_REVIEW_FROM[r.kind], r.message) for r in m.reviews if r.kind in _REVIEW_FROM),
    )


# --- report ---------------------------------------------------------------------------------------


def report_inputs_to_pb(i: d.ReportInputs) -> report_pb2.ComposeReportRequest:
    return report_pb2.ComposeReportRequest(
        request_id=i.request_id,
        plant_id=i.plant_id,
        equipment_id=i.equipment_id,
        problem_description=i.problem_description,
        defects=[defect_to_pb(x) for x in i.defects],
        guidance=[step_to_pb(s) for s in i.guidance],
        citations=[citation_to_pb(c) for c in i.citations],
        safety_notes=list(i.safety_notes),
        confidence_score=i.confidence_score,
        requires_manual_review=i.requires_manual_review,
        stage_notes=list(i.stage_notes),
        related_incidents=[past_incident_to_pb(x) for x in i.related_incidents],
        image_analyzed=i.image_analyzed,
        vision_summary=i.vision_summary,
        vision_confidence=i.vision_confidence,
        review_notes=list(i.review_notes),
        equipment_type=i.equipment_type,
    )


def report_inputs_from_pb(m: report_pb2.ComposeReportRequest) -> d.ReportInputs:
    return d.ReportInputs(
        request_id=m.request_id,
        plant_id=m.plant_id,
        equipment_id=m.equipment_id,
        problem_description=m.problem_description,
        defects=tuple(defect_from_pb(x) for x in m.defects),
        guidance=tuple(step_from_pb(s) for s in m.guidance),
        citations=tuple(citation_from_pb(c) for c in m.citations),
        safety_notes=tuple(m.safety_notes),
        confidence_score=m.confidence_score,
        requires_manual_review=m.requires_manual_review,
        stage_notes=tuple(m.stage_notes),
        related_incidents=tuple(past_incident_from_pb(x) for x in m.related_incidents),
        image_analyzed=m.image_analyzed,
        vision_summary=m.vision_summary,
        vision_confidence=m.vision_confidence,
        review_notes=tuple(m.review_notes),
        equipment_type=m.equipment_type,
    )


# --- public API -----------------------------------------------------------------------------------

_STAGE = {
    d.Stage.VISION: copilot_pb2.STAGE_VISION,
    d.Stage.KNOWLEDGE: copilot_pb2.STAGE_KNOWLEDGE,
    d.Stage.REPORT: copilot_pb2.STAGE_REPORT,
}
_REASON = {
    d.EscalationReason.STAGE_DEGRADED: copilot_pb2.ESCALATION_REASON_STAGE_DEGRADED,
    d.EscalationReason.LOW_CONFIDENCE: copilot_pb2.ESCALATION_REASON_LOW_CONFIDENCE,
    d.EscalationReason.NO_SUPPORTING_SOP: copilot_pb2.ESCALATION_REASON_NO_SUPPORTING_SOP,
    d.EscalationReason.LOW_VISION_CONFIDENCE: copilot_pb2.ESCALATION_REASON_LOW_VISION_CONFIDENCE,
    d.EscalationReason.UNSUPPORTED_GUIDANCE: copilot_pb2.ESCALATION_REASON_UNSUPPORTED_GUIDANCE,
    d.EscalationReason.EQUIPMENT_NOT_COVERED: copilot_pb2.ESCALATION_REASON_EQUIPMENT_NOT_COVERED,
    d.EscalationReason.EQUIPMENT_MISMATCH: copilot_pb2.ESCALATION_REASON_EQUIPMENT_MISMATCH,
    d.EscalationReason.UNSUPPORTED_LANGUAGE: copilot_pb2.ESCALATION_REASON_UNSUPPORTED_LANGUAGE,
    d.EscalationReason.UNKNOWN_EQUIPMENT_WEAK_MATCH: copilot_pb2.ESCALATION_REASON_UNKNOWN_EQUIPMENT_WEAK_MATCH,
}
_STATE = {
    d.StageState.OK: copilot_pb2.STAGE_STATE_OK,
    d.StageState.DEGRADED: copilot_pb2.STAGE_STATE_DEGRADED,
    d.StageState.SKIPPED: copilot_pb2.STAGE_STATE_SKIPPED,
}


def diagnosis_input_from_pb(m: copilot_pb2.DiagnoseRequest) -> d.DiagnosisInput:
    return d.DiagnosisInput(
        plant_id=m.plant_id,
        equipment_id=m.equipment_id,
        problem_description=m.problem_description,
        # the image's own bytes: what follows its end is neither stored, hashed nor sent to vision
        image_data=without_trailing_bytes(m.image.data) if m.HasField("image") else b"",
        image_mime_type=m.image.mime_type if m.HasField("image") else "",
        image_id=m.image_id if m.HasField("image_id") else "",
        equipment_type=m.equipment_type,
        reference_set=m.reference_set,
    )


def stage_to_pb(stage: d.Stage) -> copilot_pb2.Stage:
    return _STAGE[stage]


def stage_status_to_pb(s: d.StageStatus) -> copilot_pb2.StageStatus:
    return copilot_pb2.StageStatus(
        stage=_STAGE[s.stage], state=_STATE[s.state], error=s.error, confidence=s.confidence, duration_ms=s.duration_ms
    )


def diagnosis_to_pb(x: d.Diagnosis) -> copilot_pb2.DiagnoseResponse:
    return copilot_pb2.DiagnoseResponse(
        request_id=x.request_id,
        report=report_to_pb(x.report),
        confidence_score=x.confidence_score,
        requires_manual_review=x.requires_manual_review,
        stages=[stage_status_to_pb(s) for s in x.stages],
        safety_disclaimer=x.safety_disclaimer,
        escalation_reasons=[_REASON[r] for r in x.escalation_reasons],
        trace_id=x.trace_id,
        review_notes=list(x.review_notes),
        equipment_type=x.equipment_type,
        reference_set=x.reference_set,
    )


def past_incident_to_pb(x: d.PastIncident) -> report_pb2.PastIncident:
    return report_pb2.PastIncident(
        request_id=x.request_id,
        created_at=timestamp_to_pb(x.created_at),
        problem_description=x.problem_description,
        referenced_sop_ids=list(x.referenced_sop_ids),
        resolution_notes=x.resolution_notes,
    )


def past_incident_from_pb(m: report_pb2.PastIncident) -> d.PastIncident:
    return d.PastIncident(
        request_id=m.request_id,
        created_at=m.created_at.ToDatetime(UTC),
        problem_description=m.problem_description,
        referenced_sop_ids=tuple(m.referenced_sop_ids),
        resolution_notes=m.resolution_notes,
    )
