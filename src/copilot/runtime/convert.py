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


def citation_to_pb(citation: d.SopCitation) -> common_pb2.SopCitation:
    return common_pb2.SopCitation(
        sop_id=citation.sop_id,
        title=citation.title,
        section=citation.section,
        score=citation.score,
        version=citation.version,
        equipment_types=list(citation.equipment_types),
    )


def citation_from_pb(message: common_pb2.SopCitation) -> d.SopCitation:
    return d.SopCitation(
        sop_id=message.sop_id,
        title=message.title,
        section=message.section,
        score=message.score,
        version=message.version,
        equipment_types=tuple(message.equipment_types),
    )


def step_to_pb(step: d.GuidanceStep) -> common_pb2.GuidanceStep:
    return common_pb2.GuidanceStep(
        text=step.text, sop_ids=list(step.sop_ids), sections=list(step.sections), unsupported=step.unsupported
    )


def step_from_pb(message: common_pb2.GuidanceStep) -> d.GuidanceStep:
    return d.GuidanceStep(
        text=message.text,
        sop_ids=tuple(message.sop_ids),
        sections=tuple(message.sections),
        unsupported=message.unsupported,
    )


def timestamp_to_pb(value: datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp (an aware datetime is converted to UTC; a naive one is taken as UTC)."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(d.as_utc(value))
    return stamp


def _actions_to_pb(actions: tuple[d.RecommendedAction, ...]) -> list[common_pb2.RecommendedAction]:
    return [common_pb2.RecommendedAction(description=a.description, sop_ids=list(a.sop_ids)) for a in actions]


def _actions_from_pb(actions: Iterable[common_pb2.RecommendedAction]) -> tuple[d.RecommendedAction, ...]:
    return tuple(d.RecommendedAction(description=a.description, sop_ids=tuple(a.sop_ids)) for a in actions)


def report_to_pb(report: d.IncidentReport) -> common_pb2.IncidentReport:
    generated = timestamp_to_pb(report.generated_at.astimezone(UTC))
    return common_pb2.IncidentReport(
        summary=report.summary,
        defects=[defect_to_pb(x) for x in report.defects],
        recommended_actions=_actions_to_pb(report.recommended_actions),
        review_steps=_actions_to_pb(report.review_steps),
        review_notes=list(report.review_notes),
        safety_notes=list(report.safety_notes),
        follow_up=list(report.follow_up),
        referenced_sop_ids=list(report.referenced_sop_ids),
        generated_at=generated,
        rendered_text=report.rendered_text,
        citations=[citation_to_pb(c) for c in report.citations],
    )


def report_from_pb(message: common_pb2.IncidentReport) -> d.IncidentReport:
    return d.IncidentReport(
        summary=message.summary,
        defects=tuple(defect_from_pb(x) for x in message.defects),
        recommended_actions=_actions_from_pb(message.recommended_actions),
        review_steps=_actions_from_pb(message.review_steps),
        review_notes=tuple(message.review_notes),
        safety_notes=tuple(message.safety_notes),
        follow_up=tuple(message.follow_up),
        referenced_sop_ids=tuple(message.referenced_sop_ids),
        generated_at=message.generated_at.ToDatetime(tzinfo=UTC),
        rendered_text=message.rendered_text,
        citations=tuple(citation_from_pb(c) for c in message.citations),
    )


# --- vision ---------------------------------------------------------------------------------------


def findings_to_pb(findings: d.VisionFindings) -> vision_pb2.AnalyzeImageResponse:
    return vision_pb2.AnalyzeImageResponse(
        defects=[defect_to_pb(x) for x in findings.defects],
        confidence=findings.confidence,
        anomaly_score=findings.anomaly_score,
        description=findings.description,
        model=findings.model,
        width=findings.width,
        height=findings.height,
        heatmap_png=findings.heatmap_png,
        reference_set=findings.reference_set,
        anomaly_map=anomaly_map_to_pb(findings.anomaly_map) if findings.anomaly_map is not None else None,
        generic_reference_set=findings.generic,
        calibration=calibration_to_pb(findings.calibration) if findings.calibration is not None else None,
    )


def calibration_to_pb(calibration: d.ReferenceCalibration) -> vision_pb2.ReferenceCalibration:
    return vision_pb2.ReferenceCalibration(
        good_references=calibration.good_references,
        calibrated=calibration.calibrated,
        largest_good_score=calibration.largest_good_score,
        median_good_score=calibration.median_good_score,
    )


def calibration_from_pb(message: vision_pb2.ReferenceCalibration) -> d.ReferenceCalibration:
    return d.ReferenceCalibration(
        good_references=message.good_references,
        calibrated=message.calibrated,
        largest_good_score=message.largest_good_score,
        median_good_score=message.median_good_score,
    )


def anomaly_map_to_pb(anomaly_map: d.AnomalyMap) -> vision_pb2.AnomalyMap:
    return vision_pb2.AnomalyMap(width=anomaly_map.width, height=anomaly_map.height, values=anomaly_map.values)


def anomaly_map_from_pb(message: vision_pb2.AnomalyMap) -> d.AnomalyMap:
    return d.AnomalyMap(width=message.width, height=message.height, values=tuple(message.values))


def findings_from_pb(message: vision_pb2.AnalyzeImageResponse) -> d.VisionFindings:
    return d.VisionFindings(
        defects=tuple(defect_from_pb(x) for x in message.defects),
        confidence=message.confidence,
        anomaly_score=message.anomaly_score,
        description=message.description,
        model=message.model,
        width=message.width,
        height=message.height,
        reference_set=message.reference_set,
        generic=message.generic_reference_set,
        anomaly_map=anomaly_map_from_pb(message.anomaly_map) if message.HasField("anomaly_map") else None,
        calibration=calibration_from_pb(message.calibration) if message.HasField("calibration") else None,
    )


def vision_request_to_pb(request: d.VisionRequest) -> vision_pb2.AnalyzeImageRequest:
    return vision_pb2.AnalyzeImageRequest(
        image=common_pb2.Image(data=request.image_data, mime_type=request.image_mime_type),
        image_id=request.image_id,
        equipment_id=request.equipment_id,
        equipment_type=request.reference_set,
    )


# --- knowledge ------------------------------------------------------------------------------------


def chunk_to_pb(chunk: d.SopChunk) -> knowledge_pb2.SopChunk:
    return knowledge_pb2.SopChunk(
        chunk_id=chunk.chunk_id,
        sop_id=chunk.sop_id,
        title=chunk.title,
        section=chunk.section,
        text=chunk.text,
        score=chunk.score,
        version=chunk.version,
        position=chunk.position,
        equipment_types=list(chunk.equipment_types),
    )


def chunk_from_pb(message: knowledge_pb2.SopChunk) -> d.SopChunk:
    return d.SopChunk(
        chunk_id=message.chunk_id,
        sop_id=message.sop_id,
        title=message.title,
        section=message.section,
        text=message.text,
        score=message.score,
        version=message.version,
        position=message.position,
        equipment_types=tuple(message.equipment_types),
    )


_REVIEW = {
    d.ReviewKind.EQUIPMENT_NOT_COVERED: knowledge_pb2.GUIDANCE_REVIEW_KIND_EQUIPMENT_NOT_COVERED,
    d.ReviewKind.EQUIPMENT_MISMATCH: knowledge_pb2.GUIDANCE_REVIEW_KIND_EQUIPMENT_MISMATCH,
    d.ReviewKind.UNSUPPORTED_LANGUAGE: knowledge_pb2.GUIDANCE_REVIEW_KIND_UNSUPPORTED_LANGUAGE,
    d.ReviewKind.UNKNOWN_EQUIPMENT_WEAK_MATCH: knowledge_pb2.GUIDANCE_REVIEW_KIND_UNKNOWN_EQUIPMENT_WEAK_MATCH,
}
_REVIEW_FROM = {v: k for k, v in _REVIEW.items()}


def advice_request_to_pb(request: d.AdviceRequest) -> knowledge_pb2.AdviseRequest:
    return knowledge_pb2.AdviseRequest(
        problem_description=request.problem_description,
        defects=[defect_to_pb(defect) for defect in request.defects],
        plant_id=request.plant_id,
        equipment_id=request.equipment_id,
        equipment_type=request.equipment_type,
    )


def guidance_to_pb(guidance: d.Guidance) -> knowledge_pb2.AdviseResponse:
    return knowledge_pb2.AdviseResponse(
        steps=[step_to_pb(s) for s in guidance.steps],
        citations=[citation_to_pb(c) for c in guidance.citations],
        safety_notes=list(guidance.safety_notes),
        confidence=guidance.confidence,
        fallback=guidance.fallback,
        query=guidance.query,
        generator=guidance.generator,
        model=guidance.model,
        citations_removed=guidance.citations_removed,
        unsupported_steps=guidance.unsupported_steps,
        cached=guidance.cached,
        equipment_type=guidance.equipment_type,
        equipment_source=guidance.equipment_source,
        language=guidance.language,
        reviews=[knowledge_pb2.GuidanceReview(kind=_REVIEW[r.kind], message=r.message) for r in guidance.reviews],
    )


def guidance_from_pb(message: knowledge_pb2.AdviseResponse) -> d.Guidance:
    return d.Guidance(
        steps=tuple(step_from_pb(s) for s in message.steps),
        citations=tuple(citation_from_pb(c) for c in message.citations),
        safety_notes=tuple(message.safety_notes),
        confidence=message.confidence,
        fallback=message.fallback,
        query=message.query,
        generator=message.generator,
        model=message.model,
        citations_removed=message.citations_removed,
        unsupported_steps=message.unsupported_steps,
        cached=message.cached,
        equipment_type=message.equipment_type,
        equipment_source=message.equipment_source,
        language=message.language,
        reviews=tuple(
            d.GuidanceReview(_REVIEW_FROM[r.kind], r.message) for r in message.reviews if r.kind in _REVIEW_FROM
        ),
    )


# --- report ---------------------------------------------------------------------------------------


def report_inputs_to_pb(inputs: d.ReportInputs) -> report_pb2.ComposeReportRequest:
    return report_pb2.ComposeReportRequest(
        request_id=inputs.request_id,
        plant_id=inputs.plant_id,
        equipment_id=inputs.equipment_id,
        problem_description=inputs.problem_description,
        defects=[defect_to_pb(x) for x in inputs.defects],
        guidance=[step_to_pb(s) for s in inputs.guidance],
        citations=[citation_to_pb(c) for c in inputs.citations],
        safety_notes=list(inputs.safety_notes),
        confidence_score=inputs.confidence_score,
        requires_manual_review=inputs.requires_manual_review,
        stage_notes=list(inputs.stage_notes),
        related_incidents=[past_incident_to_pb(x) for x in inputs.related_incidents],
        image_analyzed=inputs.image_analyzed,
        vision_summary=inputs.vision_summary,
        vision_confidence=inputs.vision_confidence,
        review_notes=list(inputs.review_notes),
        equipment_type=inputs.equipment_type,
    )


def report_inputs_from_pb(message: report_pb2.ComposeReportRequest) -> d.ReportInputs:
    return d.ReportInputs(
        request_id=message.request_id,
        plant_id=message.plant_id,
        equipment_id=message.equipment_id,
        problem_description=message.problem_description,
        defects=tuple(defect_from_pb(x) for x in message.defects),
        guidance=tuple(step_from_pb(s) for s in message.guidance),
        citations=tuple(citation_from_pb(c) for c in message.citations),
        safety_notes=tuple(message.safety_notes),
        confidence_score=message.confidence_score,
        requires_manual_review=message.requires_manual_review,
        stage_notes=tuple(message.stage_notes),
        related_incidents=tuple(past_incident_from_pb(x) for x in message.related_incidents),
        image_analyzed=message.image_analyzed,
        vision_summary=message.vision_summary,
        vision_confidence=message.vision_confidence,
        review_notes=tuple(message.review_notes),
        equipment_type=message.equipment_type,
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


def diagnosis_input_from_pb(message: copilot_pb2.DiagnoseRequest) -> d.DiagnosisInput:
    return d.DiagnosisInput(
        plant_id=message.plant_id,
        equipment_id=message.equipment_id,
        problem_description=message.problem_description,
        # the image's own bytes: what follows its end is neither stored, hashed nor sent to vision
        image_data=without_trailing_bytes(message.image.data) if message.HasField("image") else b"",
        image_mime_type=message.image.mime_type if message.HasField("image") else "",
        image_id=message.image_id if message.HasField("image_id") else "",
        equipment_type=message.equipment_type,
        reference_set=message.reference_set,
    )


def stage_to_pb(stage: d.Stage) -> copilot_pb2.Stage:
    return _STAGE[stage]


def stage_status_to_pb(status: d.StageStatus) -> copilot_pb2.StageStatus:
    return copilot_pb2.StageStatus(
        stage=_STAGE[status.stage],
        state=_STATE[status.state],
        error=status.error,
        confidence=status.confidence,
        duration_ms=status.duration_ms,
    )


def stage_event_to_pb(event: d.StageStarted | d.StageFinished) -> copilot_pb2.StreamDiagnoseResponse:
    """A workflow stage event as StreamDiagnose sends it, with the finished stage's partial result."""
    if isinstance(event, d.StageStarted):
        return copilot_pb2.StreamDiagnoseResponse(
            request_id=event.request_id, stage_started=copilot_pb2.StageStarted(stage=stage_to_pb(event.stage))
        )
    finished = copilot_pb2.StageFinished(status=stage_status_to_pb(event.status))
    result = event.result
    if isinstance(result, d.VisionFindings):
        finished.defects.extend(defect_to_pb(defect) for defect in result.defects)
    elif isinstance(result, d.Guidance):
        finished.guidance.extend(step_to_pb(step) for step in result.steps)
        finished.citations.extend(citation_to_pb(citation) for citation in result.citations)
    elif isinstance(result, d.IncidentReport):
        finished.report.CopyFrom(report_to_pb(result))
    return copilot_pb2.StreamDiagnoseResponse(request_id=event.request_id, stage_finished=finished)


def diagnosis_to_pb(diagnosis: d.Diagnosis) -> copilot_pb2.DiagnoseResponse:
    return copilot_pb2.DiagnoseResponse(
        request_id=diagnosis.request_id,
        report=report_to_pb(diagnosis.report),
        confidence_score=diagnosis.confidence_score,
        requires_manual_review=diagnosis.requires_manual_review,
        stages=[stage_status_to_pb(s) for s in diagnosis.stages],
        safety_disclaimer=diagnosis.safety_disclaimer,
        escalation_reasons=[_REASON[r] for r in diagnosis.escalation_reasons],
        trace_id=diagnosis.trace_id,
        review_notes=list(diagnosis.review_notes),
        equipment_type=diagnosis.equipment_type,
        reference_set=diagnosis.reference_set,
    )


def diagnosis_to_bytes(diagnosis: d.Diagnosis) -> bytes:
    """The Diagnosis as a serialized DiagnoseResponse: what the incident history stores and a replay answers."""
    return diagnosis_to_pb(diagnosis).SerializeToString()


def past_incident_to_pb(incident: d.PastIncident) -> report_pb2.PastIncident:
    return report_pb2.PastIncident(
        request_id=incident.request_id,
        created_at=timestamp_to_pb(incident.created_at),
        problem_description=incident.problem_description,
        referenced_sop_ids=list(incident.referenced_sop_ids),
        resolution_notes=incident.resolution_notes,
    )


def past_incident_from_pb(message: report_pb2.PastIncident) -> d.PastIncident:
    return d.PastIncident(
        request_id=message.request_id,
        created_at=message.created_at.ToDatetime(UTC),
        problem_description=message.problem_description,
        referenced_sop_ids=tuple(message.referenced_sop_ids),
        resolution_notes=message.resolution_notes,
    )
